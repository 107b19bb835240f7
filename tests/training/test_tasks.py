"""The task registry: every contract task has its training halves and its facts, and each task's
loss, running score and evaluation compute what it says (classification exactly as before tasks)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from swarmtrain.common import tasks as rules
from swarmtrain.common.models import DataShape, MlpSpec
from swarmtrain.common.registry import UnknownName
from swarmtrain.training import tasks
from swarmtrain.training.evaluation import evaluate
from swarmtrain.training.generate import NotALanguageModel, generate_text
from swarmtrain.training.model import ModelMetadata, build_model, model_bytes
from swarmtrain.training.tasks.language_modeling import byte_tokens, decode_bytes, sample, windows
from swarmtrain.training.tasks.regression import Rescale, r_squared


def test_every_contract_task_is_registered_with_its_facts() -> None:
    assert sorted(tasks.TASKS.list()) == sorted(rules.TASKS) == ["classification", "language_modeling", "regression"]
    with pytest.raises(UnknownName, match="unknown task 'ranking'"):
        tasks.task("ranking")
    assert rules.rules("regression").outputs(0) == 1
    assert rules.rules("classification").outputs(7) == 7
    assert rules.rules("regression").headline_of(4.0, 0.5) == 4.0  # MSE, lower is better
    assert rules.rules("language_modeling").headline_of(math.log(20.0), 0.1) == pytest.approx(20.0)


def test_classification_is_the_evaluation_of_before_tasks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(5000, 5), torch.randint(0, 3, (5000,))  # more than one evaluation batch
    measured = tasks.task("classification").evaluate(model, x, y)
    assert (measured.loss, measured.score) == evaluate(model, x, y)
    with torch.no_grad():
        logits = model(x)
    assert measured.loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert measured.score == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert measured.figures == {}
    task = tasks.task("classification")
    assert task.epoch_score(task.batch_score(logits, y), y) == pytest.approx(measured.score)


def test_regression_figures_are_mse_mae_rmse_and_r2() -> None:
    task = tasks.task("regression")
    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.arange(10, dtype=torch.float32) * 2 + 1
    exact = nn.Linear(1, 1)
    with torch.no_grad():
        exact.weight.fill_(2.0)
        exact.bias.fill_(0.0)  # off by one everywhere
    measured = task.evaluate(exact, x, y)
    assert measured.loss == pytest.approx(1.0)
    assert measured.figures["mae"] == pytest.approx(1.0)
    assert measured.figures["rmse"] == pytest.approx(1.0)
    sst = float(((y - y.mean()) ** 2).sum())
    assert measured.score == measured.figures["r2"] == pytest.approx(1 - 10.0 / sst)
    with torch.no_grad():
        assert task.loss(exact(x), y).item() == pytest.approx(1.0)
        assert task.epoch_score(task.batch_score(exact(x), y), y) == pytest.approx(measured.score)
    assert r_squared(sst, y) == pytest.approx(0.0)  # the mean's error: R² 0
    assert r_squared(5.0, torch.ones(4)) == 0.0  # constant targets


def test_rescale_starts_a_regression_at_the_targets_mean() -> None:
    task = tasks.task("regression")
    model = nn.Sequential(nn.Linear(3, 1), *task.head())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    targets = torch.tensor([100.0, 200.0, 300.0])
    task.fit(model, targets)
    assert isinstance(model[1], Rescale)
    out = model(torch.randn(4, 3))
    assert torch.allclose(out, torch.full((4, 1), 200.0))
    assert float(model[1].std) == pytest.approx(float(targets.std(correction=0)))


def test_windows_are_the_corpus_shifted_by_one() -> None:
    tokens = byte_tokens("hello, world")
    assert tokens.tolist() == list(b"hello, world")
    x, y = windows(tokens, 4)
    assert x.shape == y.shape == (2, 4) and x.dtype == torch.long  # (12 - 1) // 4 windows
    assert bytes(x[0].tolist()) == b"hell" and bytes(y[0].tolist()) == b"ello"
    assert bytes(x[1].tolist()) == b"o, w" and bytes(y[1].tolist()) == b", wo"
    with pytest.raises(ValueError, match="no window"):
        windows(byte_tokens("abc"), 8)


class Bigram(nn.Module):
    """A language model of the task's interface: (batch, context) ids -> (batch, context, vocab) logits."""

    def __init__(self, vocab: int = 256) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.table(ids)
        return out


def _trained_bigram(text: str, steps: int = 300) -> Bigram:
    torch.manual_seed(0)
    model = Bigram()
    task = tasks.task("language_modeling")
    x, y = windows(byte_tokens(text), 16)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
    return model


def test_language_modeling_loss_perplexity_and_token_rate() -> None:
    task = tasks.task("language_modeling")
    text = "abcd" * 200
    x, y = windows(byte_tokens(text), 16)
    untrained = Bigram()
    fresh = task.evaluate(untrained, x, y)
    assert fresh.loss is not None and fresh.figures["perplexity"] == pytest.approx(math.exp(fresh.loss))
    trained = task.evaluate(_trained_bigram(text), x, y)
    assert trained.loss is not None and trained.loss < 0.1 < fresh.loss  # the cycle is learned
    assert trained.score == 1.0 and trained.figures["perplexity"] < 1.2
    with torch.no_grad():
        flat = nn.functional.cross_entropy(untrained(x).reshape(-1, 256), y.reshape(-1))
    assert fresh.loss == pytest.approx(float(flat), rel=1e-5)
    assert task.throughput(100.0, x) == {"tokens_per_s": 1600.0}
    assert task.outputs(256) == 256


def test_sample_follows_the_model_and_its_seed() -> None:
    model = _trained_bigram("abcd" * 200)
    greedy = sample(model, list(b"a"), 8, context=16, temperature=0.0)
    assert decode_bytes(greedy) == "bcdabcda"
    one = sample(model, list(b"ab"), 50, context=16, temperature=3.0, seed=1)
    assert one == sample(model, list(b"ab"), 50, context=16, temperature=3.0, seed=1)
    assert one != sample(model, list(b"ab"), 50, context=16, temperature=3.0, seed=2)
    assert len(one) == 50 and all(0 <= i < 256 for i in one)
    with pytest.raises(ValueError, match="prompt"):
        sample(model, [], 5, context=16)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, [1], 5, context=16, temperature=-1.0)


def test_generate_refuses_a_model_that_is_no_language_model() -> None:
    model = build_model(MlpSpec(hidden=[4]), 3, 0, DataShape(features=3, classes=0, task="regression"))
    meta = ModelMetadata.for_spec(
        MlpSpec(hidden=[4]), classes=[], feature_names=["a", "b", "c"], label_column="y", task="regression"
    )
    with pytest.raises(NotALanguageModel, match="a regression model, not a language model"):
        generate_text(model_bytes(model, meta), "hello", 5)
