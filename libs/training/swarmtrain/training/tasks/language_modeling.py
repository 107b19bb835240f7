"""``language_modeling``: next-token cross-entropy over context windows of the tokenized corpus;
the score is next-token accuracy, with perplexity and tokens/s reported.

A row is one window: ``x`` the ``context`` tokens from a position, ``y`` the same shifted by one
(:func:`windows`). A model for this task maps a LongTensor ``(batch, context)`` to logits
``(batch, context, vocab)`` (``DataShape.vocab``; the ``transformer`` kind's causal decoder).
:func:`sample` draws text from such a model (``swarmtrain sessions generate``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from swarmtrain.training.tasks.base import EVAL_BATCH, TASKS, Evaluation

MAX_PERPLEXITY_LOSS = 700.0
"""exp() of a larger loss overflows a float: the perplexity reported is capped there."""


def byte_tokens(text: str) -> torch.Tensor:
    """The byte tokenizer (vocabulary 256): a token per UTF-8 byte, as a 1-D LongTensor."""
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()


def windows(tokens: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``tokens`` (1-D): ``x`` (rows, context) and ``y``, ``x`` shifted
    by one token. ``(len - 1) // context`` rows; a ``ValueError`` when that is none."""
    if context < 1:
        raise ValueError(f"context must be at least 1, got {context}")
    rows = (int(tokens.shape[0]) - 1) // context
    if rows < 1:
        raise ValueError(f"a corpus of {int(tokens.shape[0])} tokens holds no window of {context} tokens and the next")
    span = rows * context
    return tokens[:span].reshape(rows, context).long(), tokens[1 : span + 1].reshape(rows, context).long()


def _flat(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)


class LanguageModeling:
    name = "language_modeling"

    def outputs(self, classes: int) -> int:
        return classes  # the vocabulary

    def head(self) -> list[nn.Module]:
        return []

    def fit(self, model: nn.Module, targets: torch.Tensor) -> None:
        return None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(*_flat(outputs, targets))

    def batch_score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.detach().argmax(dim=-1) == targets).sum()

    def epoch_score(self, total: torch.Tensor, targets: torch.Tensor) -> float:
        return int(total.item()) / max(int(targets.numel()), 1)

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Evaluation:
        tokens = int(y.numel())
        if not tokens:
            return Evaluation(None, None)
        model.eval()
        loss_sum = 0.0
        correct = 0
        rows = max(1, EVAL_BATCH // max(int(y.shape[1]), 1))
        with torch.inference_mode():
            for start in range(0, int(y.shape[0]), rows):
                logits = model(x[start : start + rows])
                yb = y[start : start + rows]
                loss_sum += float(nn.functional.cross_entropy(*_flat(logits, yb), reduction="sum").item())
                correct += int((logits.argmax(dim=-1) == yb).sum().item())
        loss = loss_sum / tokens
        return Evaluation(loss, correct / tokens, {"perplexity": math.exp(min(loss, MAX_PERPLEXITY_LOSS))})

    def throughput(self, samples_per_s: float, x: torch.Tensor) -> dict[str, float]:
        return {"tokens_per_s": samples_per_s * int(x.shape[1])} if x.dim() == 2 else {}


def sample(
    model: nn.Module,
    prompt: list[int],
    tokens: int,
    *,
    context: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """``tokens`` token ids drawn from ``model`` after ``prompt`` (at least one id), each from the
    last ``context`` ids: the argmax at temperature 0, else from softmax(logits / temperature) with
    a generator seeded by ``seed`` (the same ids for the same model, prompt and seed)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    model.eval()
    with torch.inference_mode():
        for _ in range(tokens):
            window = torch.tensor([ids[-context:]], dtype=torch.long)
            logits = model(window)[0, -1].float()
            if temperature == 0:
                ids.append(int(logits.argmax().item()))
                continue
            probs = torch.softmax(logits / temperature, dim=-1)
            ids.append(int(torch.multinomial(probs, 1, generator=generator).item()))
    return ids[len(prompt) :]


def decode_bytes(ids: list[int]) -> str:
    """Byte-tokenizer ids as text (bytes that are not UTF-8 replaced)."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


TASKS.add("language_modeling", LanguageModeling())
