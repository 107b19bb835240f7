"""The fault suite: the platform as real processes, one fault per test, the checker's three zeros.

``make faults`` runs this folder alone. Each module shares one stack (starting one costs seconds on
two cores); a test hurts it, waits for its session to end, checks, and leaves the stack whole
again. What each test measured (recovery, session end, the checker's counts) is printed at the end
of the run and, with ``SWARMTRAIN_FAULTS_REPORT=path``, written there as JSON lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Api, FaultStack

RESULTS: list[dict[str, Any]] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: the fault suite (tests/faults): real processes, one fault each")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def record() -> Iterator[dict[str, Any]]:
    """What a test measured, for the table in docs/faults.md (never asserted on)."""
    entry: dict[str, Any] = {}
    yield entry
    if entry:
        RESULTS.append(entry)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section("fault suite: measured")
    for entry in RESULTS:
        terminalreporter.write_line(json.dumps(entry))
    if path := os.environ.get("SWARMTRAIN_FAULTS_REPORT"):
        with Path(path).open("a") as out:
            for entry in RESULTS:
                out.write(json.dumps(entry) + "\n")


def make_stack(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: Any) -> Iterator[FaultStack]:
    stack = FaultStack(tmp_path_factory.mktemp(name), **kwargs)
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    yield from make_stack(tmp_path_factory, "faults", peers=2)


@pytest.fixture(scope="module")
def api(stack: FaultStack) -> Iterator[Api]:
    client = Api(stack.url)
    yield client
    client.client.close()


@pytest.fixture(scope="module")
def dataset(api: Api) -> str:
    return api.upload()
