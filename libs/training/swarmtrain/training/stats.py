"""The streamed ``Standardize`` rule: per-feature mean and standard deviation of the training rows,
computed from rows fed in ascending row order without holding them all (``events.DataRead``
``shard``).

The rows are cut into fixed chunks of :data:`CHUNK_ROWS` (the last one shorter) whatever blocks
they arrive in; each chunk's mean and sum of squared deviations are taken in float64 and combined
chunk after chunk (Chan et al.'s pairwise update). So the result depends only on the rows and
their order: a peer streaming its file block by block and a replay holding the whole dataset in
memory get the same bits. A (near-)constant feature gets std 1, as ``Standardize.fit`` gives it.
"""

from __future__ import annotations

import numpy as np
import torch

from swarmtrain.training.model import MIN_STD

CHUNK_ROWS = 1 << 14
"""Rows a chunk: the unit the statistics are combined in (part of the rule: never change it)."""


class StreamedStats:
    """Feed rows with :meth:`add` (float32, ``(rows, features)``, ascending row order), then read
    :meth:`result`."""

    def __init__(self, n_features: int) -> None:
        self._buffer = np.empty((CHUNK_ROWS, n_features), dtype=np.float64)
        self._filled = 0
        self._n = 0
        self._mean = np.zeros(n_features, dtype=np.float64)
        self._m2 = np.zeros(n_features, dtype=np.float64)

    def add(self, rows: np.ndarray) -> None:
        at = 0
        while at < len(rows):
            take = min(CHUNK_ROWS - self._filled, len(rows) - at)
            self._buffer[self._filled : self._filled + take] = rows[at : at + take]
            self._filled += take
            at += take
            if self._filled == CHUNK_ROWS:
                self._flush()

    def _flush(self) -> None:
        if not self._filled:
            return
        chunk = self._buffer[: self._filled]
        k = self._filled
        mean = chunk.mean(axis=0)
        m2 = np.square(chunk - mean).sum(axis=0)
        n = self._n + k
        delta = mean - self._mean
        self._mean = self._mean + delta * (k / n)
        self._m2 = self._m2 + m2 + np.square(delta) * (self._n * k / n)
        self._n = n
        self._filled = 0

    @property
    def rows(self) -> int:
        return self._n + self._filled

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as float32 tensors (population std; below ``MIN_STD``: 1)."""
        self._flush()
        if not self._n:
            raise ValueError("no rows to standardize on")
        mean = torch.from_numpy(self._mean.astype(np.float32))
        std = torch.from_numpy(np.sqrt(self._m2 / self._n).astype(np.float32))
        return mean, torch.where(std < MIN_STD, torch.ones_like(std), std)


def streamed_stats(features: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule over ``features``' rows ``rows`` (any order: they are taken ascending), in memory."""
    ordered = np.sort(rows.numpy().astype(np.int64))
    stats = StreamedStats(int(features.shape[1]))
    x = features.numpy()
    for start in range(0, len(ordered), CHUNK_ROWS):
        stats.add(x[ordered[start : start + CHUNK_ROWS]])
    return stats.result()
