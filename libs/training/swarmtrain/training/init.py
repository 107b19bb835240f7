"""A session's starting model, the same on every machine that builds it.

- :func:`initial_model`: the model built from ``torch.manual_seed(seed)`` with its ``Standardize``
  fitted on the whole training split (not a shard): what every peer of a session starts from, what
  the scheduler recomputes a fork from and ``replay-round`` walks from (:func:`initial_weights`).
- :func:`apply_init`: a session that starts from an earlier model (``Train.init_url``: fine-tuning
  an earlier session's model, or a fork's round) loads its tensors into that freshly built model
  (after the standardization is fitted, before any training): every tensor of the model, with the
  same names, shapes and dtypes, or the job fails. The peer fetches it through its signed URL and
  checks its sha256 (``JobContext.fetch_init``)."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch
from torch import nn

from swarmtrain.common.events import DataRead, ModelSpec, SessionRequested
from swarmtrain.common.models import DataShape
from swarmtrain.training import tasks
from swarmtrain.training.averaging import Tensors, check_update
from swarmtrain.training.data import DataError, Dataset, split_indices
from swarmtrain.training.model import Standardize, build_model
from swarmtrain.training.stats import streamed_stats

# Model initialisation seeds torch's global generator; the lock keeps two trainings in one process
# from interleaving there, fork_rng keeps everyone else's random state as it was.
_init_lock = threading.Lock()


def data_shape(data: Dataset) -> DataShape:
    """The ``DataShape`` a model of ``data`` is built on: its features and classes, its image
    (``Dataset.image``), and a text dataset's vocabulary and task where the dataset carries them."""
    return DataShape(
        features=int(data.features.shape[1]),
        classes=len(data.classes),
        task=data.target,
        vocab=data.vocab,
        image=data.image,
    )


def seeded_model(
    spec: ModelSpec, n_features: int, n_classes: int, seed: int, shape: DataShape | None = None
) -> nn.Sequential:
    """``build_model`` from ``torch.manual_seed(seed)``: the same initial weights on every machine.

    A spec that does not fit the data (a cnn's ``input_shape``) is a DataError.
    """
    with _init_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return build_model(spec, n_features, n_classes, shape)
        except ValueError as exc:
            raise DataError(str(exc)) from None


def initial_model(spec: ModelSpec, data: Dataset, train_idx: torch.Tensor, seed: int) -> nn.Sequential:
    """A session's seeded model with its ``Standardize`` fitted on ``data``'s training rows
    ``train_idx`` (the whole training split, never a shard): the same on every machine."""
    model = seeded_model(spec, data.features.shape[1], len(data.classes), seed, data_shape(data))
    standardize = model[0]
    if isinstance(standardize, Standardize):  # a model of token ids has none
        standardize.fit(data.features[train_idx])
    tasks.task(data.target).fit(model, data.labels[train_idx])  # a regression's target scale
    return model


def fitted_model(
    spec: ModelSpec, n_features: int, n_classes: int, mean: torch.Tensor, std: torch.Tensor, seed: int
) -> nn.Sequential:
    """A session's seeded model with its ``Standardize`` set to ``(mean, std)``: the streamed rule's
    statistics (``training.stats``), as a peer that reads only its shard has them."""
    model = seeded_model(spec, n_features, n_classes, seed)
    standardize = model[0]
    assert isinstance(standardize, Standardize)
    with torch.no_grad():
        standardize.mean.copy_(mean)
        standardize.std.copy_(std)
    return model


def session_model(
    spec: ModelSpec, data: Dataset, train_idx: torch.Tensor, seed: int, data_read: DataRead
) -> nn.Sequential:
    """The starting model of a session whose peers read ``data_read``: :func:`initial_model` for
    ``whole``, :func:`fitted_model` with the streamed statistics for ``shard`` (a classification
    without its own validation set: the gateway reads every other session ``whole``)."""
    if data_read == "whole" or data.vocab:  # token ids: nothing to standardize, the same either way
        return initial_model(spec, data, train_idx, seed)
    mean, std = streamed_stats(data.features, train_idx)
    return fitted_model(spec, data.features.shape[1], len(data.classes), mean, std, seed)


def initial_weights(data: Dataset, request: SessionRequested) -> Tensors:
    """The weights ``request``'s peers start from (:func:`session_model`), on the CPU."""
    if request.validation is not None:  # its own validation set: every row of the dataset trains
        train_idx = torch.arange(len(data))
    else:
        train_idx, _ = split_indices(len(data), request.validation_split, request.seed)
    model = session_model(request.model, data, train_idx, request.seed, request.data_read)
    return {name: t.detach().to("cpu").clone() for name, t in model.state_dict().items()}


def apply_init(model: nn.Module, init: Mapping[str, torch.Tensor]) -> None:
    """Load ``init`` into ``model``; a DataError if its tensors do not fit the model."""
    reference = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}
    reason = check_update(init, reference)
    if reason is not None:
        raise DataError(f"the starting model does not fit this model: {reason}")
    model.load_state_dict({name: t.clone() for name, t in init.items()}, strict=True)
