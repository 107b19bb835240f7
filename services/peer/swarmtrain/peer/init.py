"""A session's starting model (``Train.init_url``): fine-tuning an earlier session's model, or a
fork's round. The peer fetches it through its signed URL, checks its sha256, and loads its tensors
into the freshly built model (after the standardization is fitted, before any training): every
tensor of the model, with the same names, shapes and dtypes, or the job fails."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from swarmtrain.common.events import Train
from swarmtrain.peer import tensorfile
from swarmtrain.peer.averaging import Tensors, check_update
from swarmtrain.peer.data import DataError

if TYPE_CHECKING:
    from swarmtrain.peer.strategies import JobContext


def apply_init(model: nn.Module, init: Mapping[str, torch.Tensor]) -> None:
    """Load ``init`` into ``model``; a DataError if its tensors do not fit the model."""
    reference = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}
    reason = check_update(init, reference)
    if reason is not None:
        raise DataError(f"the starting model does not fit this model: {reason}")
    model.load_state_dict({name: t.clone() for name, t in init.items()}, strict=True)


async def fetch_init(command: Train, ctx: JobContext) -> Tensors | None:
    """The command's starting model's tensors, or None when it trains from seeded weights."""
    if not command.init_uri:
        return None
    if not command.init_url or not command.init_sha256:
        raise DataError("the Train names a starting model but carries no signed URL or sha256 for it")

    def fetch() -> Tensors:
        fd, name = tempfile.mkstemp(dir=ctx.tmp_dir, suffix=".safetensors")
        os.close(fd)
        tmp = Path(name)
        try:
            ctx.download(command.init_url, tmp, command.init_sha256)
            try:
                return tensorfile.loads(tmp.read_bytes())
            except Exception as exc:  # untrusted bytes
                raise DataError(f"the starting model is not a safetensors file: {type(exc).__name__}") from None
        finally:
            tmp.unlink(missing_ok=True)

    return await asyncio.to_thread(fetch)
