"""The deterministic training code more than one process runs: the same on every machine.

Peers train with it, the scheduler recomputes a fork's starting model and measures a finished one
with it, the CLI replays and backtests rounds with it. Nothing here does networking or reads the
log: a caller hands in the bytes, the dataset and the facts.

- ``formats``: one module a data format, its upload check and its reader side by side.
- ``data``: a dataset as tensors (its format's reader), the seeded train/validation split, shards' rows.
- ``models``: one module a model kind (``mlp``, ``cnn``), each builder registered in ``MODELS``.
- ``model``: a model (the standardization, then its kind's layers) and its safetensors file;
  ``tensorfile``: the file format itself.
- ``init``: a session's seeded starting model (standardisation fitted on the training split).
- ``evaluation``: a model's loss and accuracy on a split; the scheduler's check of a finished model.
- ``averaging``, ``aggregators``, ``compression``, ``outer``, ``rounds``: one fedavg round, pure.
- ``sharding``: how the training rows are cut into shards.
"""
