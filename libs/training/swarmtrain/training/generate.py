"""Text from a finished language model (``swarmtrain sessions generate``): its model file loaded as
every process loads one (safetensors, never unpickled), the prompt tokenized with the byte
tokenizer, and ``tasks.language_modeling.sample``."""

from __future__ import annotations

from pathlib import Path

from swarmtrain.training.model import load_model
from swarmtrain.training.tasks.language_modeling import byte_tokens, decode_bytes, sample

DEFAULT_CONTEXT = 256
"""The window a model whose spec states no ``context`` is sampled with."""


class NotALanguageModel(ValueError):
    """The model file is not a language model's; the message says what it is."""


def generate_text(source: Path | bytes, prompt: str, tokens: int, temperature: float = 0.8, seed: int = 0) -> str:
    """``tokens`` tokens sampled after ``prompt`` from the language model in ``source``, as text."""
    model, metadata = load_model(source)
    if metadata.task != "language_modeling":
        raise NotALanguageModel(f"the session's model is a {metadata.task} model, not a language model")
    if not prompt:
        raise ValueError("--prompt must not be empty")
    context = int(getattr(metadata.model, "context", DEFAULT_CONTEXT) or DEFAULT_CONTEXT)
    ids = byte_tokens(prompt).tolist()
    return decode_bytes(sample(model, ids, tokens, context=context, temperature=temperature, seed=seed))
