"""Headless Chromium (Debian's ``chromium``) driven by Playwright against a real ``swarmtrain up`` stack.

Playwright's own browser download is not used: the browser is the system's ``/usr/bin/chromium``
(or ``SWARMTRAIN_CHROMIUM``). Without it the tests skip on a developer machine and FAIL in CI
(``CI=true``), where ``.ci/run`` installs it. Screenshots go to ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from swarmtrain.common import servers
from tests.e2e.conftest import Stack

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"


def _chromium() -> str:
    path = os.environ.get("SWARMTRAIN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if in_ci:
            pytest.fail("playwright is not installed (pip install -e '.[dev]')", pytrace=False)
        pytest.skip("playwright is not installed")
    if path is None:
        if in_ci:
            pytest.fail("chromium is missing: CI must install it (apt-get install -y chromium)", pytrace=False)
        pytest.skip("no chromium on this machine (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres_port: int) -> Iterator[Stack]:
    _chromium()  # skip (or fail in CI) before paying for a stack
    name = f"ui{uuid.uuid4().hex[:8]}"
    servers.create_database(postgres_port, name)
    st = Stack(tmp_path_factory.mktemp("stack"), servers.postgres_url(postgres_port, name), peers=2)
    try:
        # Playwright's sync API holds a running loop in this thread: the async wait runs in another
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, st.wait_healthy()).result()
        yield st
    finally:
        assert not st.stop(), "swarmtrain up left processes behind"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
