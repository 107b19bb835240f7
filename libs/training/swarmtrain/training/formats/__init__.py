"""The data formats: one module a format, holding its upload check and its reader (``base.Format``).

Importing the package registers every format in ``base.FORMATS``: each module is imported here by
name, and the names must be the contract's (``events.DataFormat``; their facts: ``common.formats``).
Adding a format: its name in the contract, its facts in ``common.formats``, and one module here.
"""

from __future__ import annotations

from swarmtrain.common.formats import FORMATS as NAMES
from swarmtrain.training.formats import csv, images, npz, parquet, text
from swarmtrain.training.formats.base import (
    FORMATS,
    Blocks,
    DataError,
    Format,
    Index,
    Limits,
    Preview,
    Rejected,
    Summary,
    Table,
    UploadOptions,
)

MODULES = (csv, parquet, npz, images, text)
FORMATS.check_names(NAMES)

__all__ = [
    "FORMATS",
    "MODULES",
    "Blocks",
    "DataError",
    "Format",
    "Index",
    "Limits",
    "Preview",
    "Rejected",
    "Summary",
    "Table",
    "UploadOptions",
]
