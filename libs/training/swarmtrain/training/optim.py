"""A run's optimizer steps, from its hyperparameters: the optimizer (AdamW or SGD with momentum,
weight decay), the learning rate's schedule (constant or cosine, with a linear warmup), gradient
clipping and gradient accumulation.

The learning rate of optimizer step k is a pure function of (hyperparameters, k, the run's total
steps): nothing about it lives in the optimizer's state, so a fedavg round that starts a fresh
optimizer at its first step, or a run resumed at step k, follows the same curve as one that never
stopped. With the defaults (AdamW, no decay, constant rate, no clipping, one batch a step) a step
is bit for bit the Adam step sessions trained with before these choices existed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from swarmtrain.common.events import Hyperparameters


def steps_per_epoch(samples: int, hp: Hyperparameters) -> int:
    """Optimizer steps in one pass over ``samples`` rows (the last, partial batch and the last,
    partial accumulation each make one)."""
    batches = max(1, math.ceil(samples / hp.batch_size))
    return math.ceil(batches / hp.grad_accumulation)


def lr_at(hp: Hyperparameters, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run of ``total`` steps."""
    if step < hp.warmup_steps:
        return hp.lr * (step + 1) / hp.warmup_steps
    if hp.lr_schedule == "constant":
        return hp.lr
    span = max(1, total - hp.warmup_steps)
    progress = min(1.0, (step - hp.warmup_steps) / span)
    return hp.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(hp: Hyperparameters, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    return torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)


class Steps:
    """The optimizer of one run and the rules around its steps. ``backward`` takes each batch's
    loss; every ``grad_accumulation`` batches (and at the end of an epoch, ``flush``) it clips,
    sets the step's rate and steps. ``scaler``: fp16's gradient scaler (a step whose gradients
    overflowed is skipped, as torch's scaler does)."""

    def __init__(
        self,
        hp: Hyperparameters,
        model: torch.nn.Module,
        *,
        total: int,
        step: int = 0,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.hp = hp
        self.model = model
        self.optimizer = make_optimizer(hp, model.parameters())
        self.total = total
        """The run's optimizer steps, for the schedule."""
        self.step = step
        """Optimizer steps taken in the run so far (a round's or resumed run's first is not 0)."""
        self.scaler = scaler
        self._pending = 0

    def backward(self, loss: torch.Tensor) -> None:
        """One batch's gradients; steps once ``grad_accumulation`` batches are in."""
        if self._pending == 0:
            self.optimizer.zero_grad(set_to_none=True)
        scaled = loss / self.hp.grad_accumulation if self.hp.grad_accumulation > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()  # type: ignore[no-untyped-call]
        self._pending += 1
        if self._pending == self.hp.grad_accumulation:
            self.flush()

    def flush(self) -> None:
        """Step on the batches taken since the last step, if any (an epoch's end)."""
        if self._pending == 0:
            return
        self._pending = 0
        rate = lr_at(self.hp, self.step, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        if self.hp.grad_clip_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1

    @property
    def lr(self) -> float:
        """The rate the next step takes."""
        return lr_at(self.hp, self.step, self.total)
