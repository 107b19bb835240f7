"""A peer's part in a sweep: train the whole dataset with its own hyperparameters, publish the model.

1. One training of ``command.model`` on the training split (``validation_split`` held out, both
   from ``seed``), in a worker thread; each epoch is reported as a ``Heartbeat``
   (``<session>.<peer>.epoch<N>``).
2. The trained model (safetensors, with its metadata) is PUT to ``command.output_url``, the signed
   URL of ``command.output_uri``.
   With ``checkpoint_every`` (``Hyperparameters``), every such epoch's state (``peer.checkpoint``)
   is PUT to ``command.checkpoint_urls[epoch]`` and reported as ``CheckpointSaved``; a ``Train``
   that names one (``resume_uri``, re-sent to a restarted peer) goes on after its epoch.
3. ``PeerDone`` (``<session>.<peer>.done``) names ``output_uri`` with the sha256 of the bytes sent
   and the last epoch's figures.

In a search a peer takes one ``Train`` per trial, in turn: each names its trial (``Train.trial``),
its own ``output_uri``, and the ids of its reports extend the ``Train``'s id
(``<train id>.epoch<N>``, ``<train id>.done``), so two trials of one peer never share one. A
pruned trial is stopped by a ``Stop`` naming it (the peer's service ends that job only).

A stopped job raises ``TrainingStopped`` from the training and reports nothing more; a non-finite
loss raises ``Diverged`` (the peer reports ``PeerFailed``) before any figure of that epoch goes out.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from swarmtrain.common import blob
from swarmtrain.common.events import PeerDone, Train
from swarmtrain.common.logging import get_logger
from swarmtrain.peer import trainer
from swarmtrain.peer.strategies.base import STRATEGIES, JobContext
from swarmtrain.peer.trainer import TrainJob, TrainResult
from swarmtrain.training.model import save_model

log = get_logger("swarmtrain.peer")


@STRATEGIES.register("sweep")
async def run(command: Train, ctx: JobContext) -> None:
    """Train (from the checkpoint the ``Train`` names, if any), upload the model, report ``PeerDone``."""
    init = await ctx.fetch_init(command)
    resume = await ctx.fetch_checkpoint(command)
    if resume is not None:
        log.info("resuming from a checkpoint", epoch=command.resume_epoch, checkpoint=command.resume_uri)
    job = TrainJob(
        csv_path=ctx.dataset,
        label_column=command.label_column,
        data=command.data,
        model=command.model,
        hyperparameters=command.hyperparameters,
        validation_split=command.validation_split,
        seed=command.seed,
        device=str(ctx.device),
        torch_threads=ctx.settings.torch_threads,
        init=init,
        dataset_sha256=command.dataset_sha256,
        precision=command.precision,
        validation_path=ctx.validation,
        validation_sha256=command.validation_sha256 or None,
        resume=resume,
    )
    on_checkpoint = ctx.checkpointing(command, asyncio.get_running_loop())
    result = await ctx.train_reporting(command, lambda on_epoch: trainer.train(job, on_epoch, ctx.stop, on_checkpoint))

    ref = await asyncio.to_thread(_upload, ctx, command.output_url, result)
    final = result.final
    done = PeerDone(
        event_id=f"{command.session_id}.{ctx.peer_id}.done" if command.trial is None else f"{command.event_id}.done",
        session_id=command.session_id,
        peer_id=ctx.peer_id,
        trial=command.trial,
        model_uri=command.output_uri,
        model_sha256=ref.sha256,
        epochs=final.epoch,
        loss=final.loss,
        accuracy=final.accuracy,
        val_loss=final.val_loss,
        val_accuracy=final.val_accuracy,
        train_seconds=result.train_seconds,
    )
    await ctx.report(done)
    log.info(
        "training done",
        val_accuracy=final.val_accuracy,
        train_seconds=round(result.train_seconds, 3),
        model=command.output_uri,
    )


def _upload(ctx: JobContext, url: str, result: TrainResult) -> blob.BlobRef:
    """The model file, written to a temporary file under the state folder, then PUT to ``url``."""
    fd, name = tempfile.mkstemp(dir=ctx.tmp_dir, suffix=".safetensors")
    os.close(fd)
    tmp = Path(name)
    try:
        save_model(result.model, tmp, result.metadata)
        return ctx.upload(url, tmp)
    finally:
        tmp.unlink(missing_ok=True)
