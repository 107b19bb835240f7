"""The dashboard in a real browser against a real stack: sign up, upload with progress, start a sweep
from the form (after the API's validation message), watch the curves grow while it runs, the
leaderboard, download the model; the same for fedavg with its rounds; compare runs; another user
gets 404. Every page is screenshotted into ``test-artifacts/screenshots/``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import DIGITS, Stack

pytestmark = pytest.mark.e2e
PASSWORD = "correct horse battery staple"
VIEWPORT = {"width": 1280, "height": 900}
# the page's own record of what it showed: (session status, points on the curves), at every change
RECORD = """
window.__samples = [];
document.addEventListener("DOMContentLoaded", () => {
  const b = document.body;
  new MutationObserver(() => window.__samples.push([b.dataset.status || "", Number(b.dataset.points || 0)]))
    .observe(b, { attributes: true, attributeFilter: ["data-status", "data-points"] });
});
"""
DONE_MS = 120_000


@pytest.fixture(scope="module")
def page(browser: Any, stack: Stack, screenshots: Path) -> Iterator[Any]:
    """One user, signed up through the sign-in page; the token lives in this tab's sessionStorage."""
    context = browser.new_context(viewport=VIEWPORT, base_url=stack.url, accept_downloads=True)
    context.add_init_script(RECORD)
    pg = context.new_page()
    pg.goto("/")
    pg.wait_for_url(re.compile(r"/ui/signin$"))
    pg.screenshot(path=screenshots / "01-signin.png")
    form = pg.locator("#signup-form")
    form.locator("input[name=email]").fill(f"ui{uuid.uuid4().hex[:8]}@example.org")
    form.locator("input[name=password]").fill(PASSWORD)
    form.locator("button").click()
    pg.wait_for_url(re.compile(r"/ui/sessions$"))
    token = pg.evaluate("sessionStorage.getItem('swarmtrain.token')")
    assert token and token not in pg.url
    try:
        yield pg
    finally:
        context.close()


def _until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Ask ``check`` (a question to the page) every 0.2 s until it says yes; fail after ``timeout`` s.
    (The page's CSP forbids eval, so Playwright's ``wait_for_function`` cannot poll a string.)"""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)  # the polling interval; the condition itself is what is waited for


def _ready(pg: Any) -> None:
    pg.wait_for_selector("body[data-ready='1']")


def _upload(pg: Any, screenshots: Path) -> None:
    pg.goto("/ui/datasets")
    _ready(pg)
    pg.set_input_files("#upload-form input[name=file]", str(DIGITS))
    pg.click("#upload-form button")
    pg.wait_for_selector("#upload-status:has-text('uploaded: 1797 rows, 64 features, 10 classes')")
    assert pg.locator("#upload-progress").evaluate("p => p.value") == 100
    assert pg.locator("#datasets tbody tr").count() >= 1
    pg.click("#datasets tbody tr")  # the preview: the first rows and the class histogram
    pg.wait_for_selector("#preview:not([hidden]) .preview-rows tbody tr")
    assert pg.locator("#preview .preview-rows tbody tr").count() == 10
    assert pg.locator("#preview-classes .class-bar").count() == 10
    pg.screenshot(path=screenshots / "03-datasets.png", full_page=True)


def _start(pg: Any, strategy: str, **fields: str) -> str:
    pg.goto("/ui/new")
    _ready(pg)
    pg.check(f"input[name=strategy][value={strategy}]")
    for name, value in fields.items():
        pg.fill(f"#session-form [name={name}]", value)
    pg.click("#session-form button[type=submit]")
    pg.wait_for_url(re.compile(r"/ui/sessions/[0-9a-f]{32}$"))
    return str(pg.url.rsplit("/", 1)[1])


def _wait_peers(pg: Any, n: int) -> None:
    _until(
        lambda: pg.evaluate(
            "n => fetch('/peers', {headers: {Authorization: 'Bearer ' + sessionStorage.getItem('swarmtrain.token')}})"
            ".then(r => r.json()).then(ps => ps.filter(p => p.status === 'online').length >= n)",
            n,
        ),
        90,
        f"{n} idle peers",
    )


def _download(pg: Any, tmp_path: Path, name: str) -> bytes:
    with pg.expect_download() as info:
        pg.click("#download")
    path = tmp_path / name
    info.value.save_as(path)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])  # safetensors: a little-endian length, then JSON
    assert data[8:9] == b"{" and 8 + header_len < len(data)
    return data


def test_peers_page_lists_the_swarm(page: Any, screenshots: Path) -> None:
    page.goto("/ui/peers")
    page.wait_for_selector("#peers tbody tr[data-status=online] >> nth=1")
    assert page.locator("#peers tbody tr").count() == 2
    page.screenshot(path=screenshots / "02-peers.png", full_page=True)


@contextlib.contextmanager
def _held(stack: Stack, name: str) -> Iterator[None]:
    """``swarmtrain up``'s child ``name`` SIGSTOPped for the block, then SIGCONTed."""
    pid = int((stack.data_dir / "data" / "run" / f"{name}.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_sweep_live_curves_leaderboard_and_download(page: Any, stack: Stack, screenshots: Path, tmp_path: Path) -> None:
    _upload(page, screenshots)
    page.goto("/ui/new")
    _ready(page)
    page.fill("#session-form [name=num_peers]", "99")
    page.click("#session-form button[type=submit]")
    page.wait_for_selector("#error:has-text('not enough online peers: 99 requested')")
    page.screenshot(path=screenshots / "04-new-session-error.png", full_page=True)

    _wait_peers(page, 2)
    sid = _start(page, "sweep", num_peers="2", epochs="30", batch_size="16", lr="0.003,0.01", hidden="256,128")
    page.wait_for_selector("body[data-points]")  # the first point is on a curve
    _until(
        lambda: page.evaluate(
            "Number(document.body.dataset.points) >= 10 || document.body.dataset.status !== 'running'"
        ),
        60,
        "ten points on the curves",
    )
    page.screenshot(path=screenshots / "05-session-sweep-running.png", full_page=True)
    # the live stream reads the log, the session's figures come from the read models, which may lag
    # (a busy machine): the projector is held while the session ends, so the page sees the end
    # before the read models do, and must read them again until they have it too
    with _held(stack, "projector"):
        page.wait_for_selector("#timeline li[data-type=SessionCompleted]", timeout=DONE_MS)
        assert page.locator("body").get_attribute("data-status") == "running"
    page.wait_for_selector("body[data-status=completed]", timeout=DONE_MS)
    page.wait_for_selector("#leaderboard tr.best")

    samples: list[tuple[str, int]] = page.evaluate("window.__samples")
    final = max(points for _, points in samples)
    assert final == 60  # 2 peers x 30 epochs, every heartbeat on the curves
    while_running = [points for status, points in samples if status == "running" and points > 0]
    assert while_running and min(while_running) < final, "the curves did not grow while the session ran"
    assert page.locator("#chart-loss canvas").count() == 1 and page.locator("#chart-val canvas").count() == 1
    assert page.locator("#leaderboard tbody tr").count() == 2
    assert page.locator("#timeline li[data-type=SessionCompleted]").count() == 1
    assert page.locator("#cancel").is_hidden()
    page.screenshot(path=screenshots / "06-session-sweep.png", full_page=True)
    _download(page, tmp_path, f"{sid}.safetensors")


def test_fedavg_rounds_and_comparison(page: Any, screenshots: Path, tmp_path: Path) -> None:
    if page.locator("body").get_attribute("data-page") is None:
        page.goto("/ui/")
    _wait_peers(page, 2)
    if not page.evaluate(
        "fetch('/datasets', {headers: {Authorization: 'Bearer ' + sessionStorage.getItem('swarmtrain.token')}})"
        ".then(r => r.json()).then(d => d.length)"
    ):
        _upload(page, screenshots)
    page.goto("/ui/new")
    _ready(page)
    page.check("input[name=strategy][value=fedavg]")
    assert page.locator("#session-form [name=rounds]").is_visible()
    sid = _start(page, "fedavg", num_peers="2", epochs="2", batch_size="32", lr="0.003", rounds="3")
    page.wait_for_selector("body[data-status=completed]", timeout=DONE_MS)
    page.wait_for_selector("#rounds tbody tr >> nth=2")
    rows = page.locator("#rounds tbody tr")
    assert rows.count() == 3
    assert re.search(r"\d+\.\d s", rows.nth(0).locator("td").nth(1).inner_text())  # the round's time
    assert page.locator("#timeline li[data-type=RoundClosed]").count() == 3
    assert page.locator("#round-options-text").inner_text() == "mean"  # the form's fedavg: today's rule
    cells = rows.nth(0).locator("td")
    assert cells.nth(9).inner_text() == "mean" and re.fullmatch(r"[\d,. ]+", cells.nth(10).inner_text())
    page.screenshot(path=screenshots / "07-session-fedavg.png", full_page=True)
    _download(page, tmp_path, f"{sid}.safetensors")

    page.goto("/ui/sessions")
    _ready(page)
    boxes = page.locator("#sessions tbody input[type=checkbox]")
    for i in range(boxes.count()):
        boxes.nth(i).check()
    page.wait_for_selector("#chart-compare canvas")
    legend = page.locator("#chart-compare .u-legend").inner_text()
    assert sid[:8] in legend
    page.screenshot(path=screenshots / "08-sessions-compare.png", full_page=True)


def test_another_users_session_is_404(page: Any, browser: Any, stack: Stack, screenshots: Path) -> None:
    mine = page.evaluate(
        "fetch('/sessions', {headers: {Authorization: 'Bearer ' + sessionStorage.getItem('swarmtrain.token')}})"
        ".then(r => r.json())"
    )
    assert mine, "the earlier tests made sessions"
    sid = mine[0]["session_id"]
    email = f"other{uuid.uuid4().hex[:8]}@example.org"
    with httpx.Client(base_url=stack.url) as api:
        assert api.post("/auth/signup", json={"email": email, "password": PASSWORD}).status_code == 201
        token = api.post("/auth/signin", json={"email": email, "password": PASSWORD}).json()["access_token"]
    context = browser.new_context(viewport=VIEWPORT, base_url=stack.url)
    try:
        context.add_init_script(f"sessionStorage.setItem('swarmtrain.token', {token!r})")
        other = context.new_page()
        other.goto(f"/ui/sessions/{sid}")
        other.wait_for_selector("#session-404:not([hidden])")
        assert f"no session '{sid}'" in other.locator("#session-404").inner_text()
        assert other.locator("#session").is_hidden()
        other.screenshot(path=screenshots / "09-other-users-session-404.png")
        resp = other.goto("/ui/sessions/not-an-id")
        assert resp is not None and resp.status == 404
    finally:
        context.close()


SEARCH = {
    "space": {
        "lr": {"log_uniform": [1e-3, 3e-2]},
        "batch_size": {"choice": [32, 64]},
        "model.hidden.0": {"choice": [16, 64]},
    },
    "trials": 6,
    "sampler": "tpe",
    "pruner": {"name": "asha", "min_epochs": 1, "reduction_factor": 2},
    "seed": 5,
}


def _api(pg: Any, method: str, path: str, body: object = None) -> Any:
    """A call of the REST API from the page, with its token: (status, JSON body)."""
    return pg.evaluate(
        "([m, p, b]) => fetch(p, {method: m, headers: {Authorization: 'Bearer ' + sessionStorage.getItem("
        "'swarmtrain.token'), 'Content-Type': 'application/json'}, body: b === null ? undefined : JSON.stringify(b)})"
        ".then(async r => [r.status, await r.json()])",
        [method, path, body],
    )


def test_a_search_session_shows_its_trials_importances_and_best_config(page: Any, screenshots: Path) -> None:
    if page.locator("body").get_attribute("data-page") is None:
        page.goto("/ui/")
    _wait_peers(page, 2)
    status, datasets = _api(page, "GET", "/datasets")
    assert status == 200
    if not datasets:
        _upload(page, screenshots)
        status, datasets = _api(page, "GET", "/datasets")
    body = {
        "dataset_id": datasets[0]["dataset_id"],
        "num_peers": 2,
        "hyperparameters": {"epochs": 4, "batch_size": 32, "lr": 0.003},
        "model": {"kind": "mlp", "hidden": [32]},
        "search": SEARCH,
    }
    status, out = _api(page, "POST", "/sessions", body)
    assert status == 201, out
    sid = out["session_id"]
    page.goto(f"/ui/sessions/{sid}")
    page.wait_for_selector("#search-section:not([hidden])")
    page.wait_for_selector("body[data-status=completed]", timeout=DONE_MS * 2)
    page.wait_for_selector("#importances .bar-row")
    rows = page.locator("#trials tbody tr")
    assert rows.count() == 6
    assert page.locator("#trials tbody tr.pruned").count() == page.locator("#trials .badge.pruned").count()
    assert page.locator("#importances .bar-row").count() == 3  # one bar per dimension of the space
    assert page.locator("#trial-scatter figure").count() == 3  # the figure against each dimension
    assert page.locator("#trial-curves path").count() == 6  # every trial's curve
    assert page.locator("#peers-section").is_hidden()  # a search's figures are its trials', not its peers'
    assert "trial 0" in page.locator("#chart-val .u-legend").inner_text()  # a curve per trial
    first = page.locator("#timeline li[data-type=TrialStarted]").first.inner_text()
    assert re.search(r"trial 0 on \w+: lr=", first), first
    concluded = page.locator("#timeline li[data-type=SearchConcluded]").inner_text()
    assert "best: trial" in concluded, concluded
    best = page.locator("#search-best").inner_text()
    assert best.startswith("Best: trial ") and f"--from-best {sid}" in best
    # every mark of every chart lies inside its chart
    outside = page.evaluate(
        "() => [...document.querySelectorAll('#search-section svg.plot')].flatMap(s => {"
        " const box = s.getBoundingClientRect();"
        " return [...s.querySelectorAll('circle, path, text.pruned')].filter(m => {"
        "  const r = m.getBoundingClientRect();"
        "  return r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1;"
        " }).map(m => m.outerHTML.slice(0, 80)); })"
    )
    assert outside == [], outside
    page.screenshot(path=screenshots / "10-session-search.png", full_page=True)
