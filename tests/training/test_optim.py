"""A run's optimizer steps from its hyperparameters: the defaults train bit for bit as before the
choices existed; the schedule, clipping and accumulation do what their names say."""

from __future__ import annotations

import itertools
import math
import threading

import msgspec
import pytest
import torch
from torch import nn

from swarmtrain.common.events import Hyperparameters
from swarmtrain.peer.trainer import run_epoch
from swarmtrain.training.optim import Steps, lr_at, steps_per_epoch

HP = Hyperparameters(epochs=2, batch_size=16, lr=0.01)


def data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def train(hp: Hyperparameters, epochs: int = 2) -> dict[str, torch.Tensor]:
    m, (x, y) = model(), data()
    steps = Steps(hp, m, total=epochs * steps_per_epoch(len(y), hp))
    shuffle = torch.Generator().manual_seed(1)
    for epoch in range(1, epochs + 1):
        run_epoch(m, steps, x, y, hp.batch_size, shuffle, threading.Event(), epoch)
    return m.state_dict()


def test_the_defaults_are_the_adam_loop_sessions_trained_with_bit_for_bit() -> None:
    m, (x, y) = model(), data()
    adam = torch.optim.Adam(m.parameters(), lr=HP.lr)
    shuffle = torch.Generator().manual_seed(1)
    for _ in range(2):
        perm = torch.randperm(len(y), generator=shuffle)
        xs, ys = x[perm], y[perm]
        for start in range(0, len(y), HP.batch_size):
            loss = nn.functional.cross_entropy(m(xs[start : start + 16]), ys[start : start + 16])
            adam.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            adam.step()
    ours = train(HP)
    assert all(torch.equal(ours[k], v) for k, v in m.state_dict().items())


def test_stored_hyperparameters_decode_to_the_defaults_and_encode_as_they_were() -> None:
    old = b'{"epochs":2,"batch_size":16,"lr":0.01}'
    hp = msgspec.json.decode(old, type=Hyperparameters)
    assert hp == HP and (hp.optimizer, hp.weight_decay, hp.grad_accumulation) == ("adamw", 0.0, 1)
    assert msgspec.json.encode(hp) == old


@pytest.mark.parametrize(
    "change",
    [
        {"optimizer": "sgd"},
        {"weight_decay": 0.1},
        {"lr_schedule": "cosine"},
        {"warmup_steps": 4},
        {"grad_clip_norm": 0.01},
    ],
)
def test_each_choice_changes_the_training(change: dict[str, object]) -> None:
    base = train(HP)
    other = train(msgspec.structs.replace(HP, **change))
    assert any(not torch.equal(base[k], other[k]) for k in base)


def test_the_schedule_warms_up_then_follows_a_cosine_to_zero() -> None:
    hp = msgspec.structs.replace(HP, lr=1.0, lr_schedule="cosine", warmup_steps=4)
    rates = [lr_at(hp, k, 20) for k in range(20)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert rates[4] == 1.0 and all(a > b for a, b in itertools.pairwise(rates[4:]))
    assert rates[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_at(hp, 40, 20) == 0.0
    constant = msgspec.structs.replace(HP, lr=0.3)
    assert {lr_at(constant, k, 20) for k in range(20)} == {0.3}


def test_a_resumed_or_fresh_round_optimizer_follows_the_same_rates() -> None:
    hp = msgspec.structs.replace(HP, lr_schedule="cosine", warmup_steps=3)
    whole = Steps(hp, model(), total=30)
    seen = []
    for _ in range(30):
        seen.append(whole.lr)
        whole.step += 1
    later = Steps(hp, model(), total=30, step=12)
    assert later.lr == seen[12]


def test_accumulating_two_batches_is_one_batch_twice_as_large() -> None:
    sgd = msgspec.structs.replace(HP, optimizer="sgd", momentum=0.0)
    big = train(msgspec.structs.replace(sgd, batch_size=32), epochs=1)
    small = train(msgspec.structs.replace(sgd, batch_size=16, grad_accumulation=2), epochs=1)
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=1e-5, atol=1e-6)
    assert steps_per_epoch(96, msgspec.structs.replace(HP, grad_accumulation=2)) == 3
    assert steps_per_epoch(97, msgspec.structs.replace(HP, grad_accumulation=2)) == 4


def test_clipping_bounds_each_step() -> None:
    hp = Hyperparameters(epochs=1, batch_size=96, lr=1.0, optimizer="sgd", momentum=0.0, grad_clip_norm=0.5)
    m, (x, y) = model(), data()
    before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
    steps = Steps(hp, m, total=1)
    steps.backward(nn.functional.cross_entropy(m(x) * 100, y))
    after = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert steps.step == 1
    assert float((after - before).norm()) == pytest.approx(0.5, rel=1e-4)
