"""The version of swarmtrain: written once, in ``pyproject.toml``, and read from the installed metadata."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("swarmtrain")
except metadata.PackageNotFoundError:  # the source folders on sys.path without any install
    VERSION = "0+unknown"
