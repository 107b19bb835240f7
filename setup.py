"""Package discovery by rule, so the wheel can never miss a package or a data file.

Every folder ``libs/<name>/`` and ``services/<name>/`` holds one part of the ``swarmtrain``
namespace (``libs/common/swarmtrain/common``, ``services/gateway/swarmtrain/gateway``, ...): every
folder below them ships, mapped from where it lives, and every file in those folders (``MANIFEST.in``
grafts them; setuptools' ``include-package-data`` keeps what lies inside a package): the modules,
and as package data the templates, static files, SQL and the sample CSV. A folder of data alone
(``dashboard/templates``) is a namespace package, as setuptools wants it.
Everything else about the distribution is in ``pyproject.toml``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).parent
NAMESPACE = "swarmtrain"


def discovered() -> dict[str, str]:
    """Each package of every ``libs/*/swarmtrain`` and ``services/*/swarmtrain``, mapped to its folder."""
    found: dict[str, str] = {}
    for part in sorted([*HERE.glob(f"libs/*/{NAMESPACE}"), *HERE.glob(f"services/*/{NAMESPACE}")]):
        where = part.relative_to(HERE).as_posix()
        for package in find_namespace_packages(where=where, exclude=["*__pycache__*"]):
            name = f"{NAMESPACE}.{package}"
            if name in found:
                raise SystemExit(f"{name} is in both {found[name]} and {where}: one folder a package")
            found[name] = f"{where}/{package.replace('.', '/')}"
    return found


PACKAGES = {NAMESPACE: f"libs/api/{NAMESPACE}"} | discovered()
"""``swarmtrain`` itself (its ``load_model``) is ``libs/api/swarmtrain``; its parts map from their folders."""
setup(packages=sorted(PACKAGES), package_dir=PACKAGES)
