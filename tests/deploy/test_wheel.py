"""What a user installs works: the sdist and the wheel built from it, in a virtualenv of their own.

Every other test runs from the editable install, which sees the source folders whatever the
packaging says; these run the wheel, as ``pip install swarmtrain`` would: built once per session
(``python -m build``: the sdist, then the wheel from the sdist), installed into a fresh virtualenv
with nothing else on its path (CPU torch first, as ``make setup`` does where there is no GPU), and
run from a folder outside the checkout. The virtualenv serves every test here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import tomllib
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from swarmtrain.common import servers
from tests.cli.test_listen import Listening, join_and_train

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TORCH_CPU = os.environ.get("TORCH_CPU", "torch==2.13.0")
"""The Makefile's ``TORCH_CPU``: the CPU build of torch, installed before the wheel."""

pytestmark = pytest.mark.timeout(900)


def _source_files() -> set[str]:
    """Every file a package folder holds, as its path inside the installed ``swarmtrain`` namespace."""
    files: set[str] = set()
    for part in [*ROOT.glob("libs/*/swarmtrain"), *ROOT.glob("services/*/swarmtrain")]:
        for path in part.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add("swarmtrain/" + path.relative_to(part).as_posix())
    return files


def _clean_env(home: Path) -> dict[str, str]:
    """No swarmtrain setting, no PYTHONPATH, a home of its own: nothing of this checkout reaches it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SWARMTRAIN_", "PYTHON", "VIRTUAL_ENV")) and k not in {"PYTEST_CURRENT_TEST"}
    }
    return {**env, "HOME": str(home), "XDG_STATE_HOME": str(home / "state"), "SWARMTRAIN_TORCH_THREADS": "1"}


@dataclass(frozen=True)
class Installed:
    wheel: Path
    sdist: Path
    venv: Path
    home: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def swarmtrain(self) -> list[str]:
        return [str(self.venv / "bin" / "swarmtrain")]

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.home, env=_clean_env(self.home), capture_output=True, text=True, timeout=timeout
        )


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    # not under pytest's 0700 temporary folder: run as root, the embedded PostgreSQL of
    # `swarmtrain demo` drops to an unprivileged user, who must reach pgserver's binaries in the venv
    root = Path(tempfile.mkdtemp(prefix="swarmtrain-wheel-"))
    root.chmod(0o755)
    try:
        yield _install(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _install(root: Path) -> Installed:
    dist = root / "dist"
    # no --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist, so a file
    # missing from the sdist is missing from the wheel too
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # no system site-packages
    python = venv / "bin" / "python"
    if shutil.which("nvidia-smi") is None:
        _pip(python, TORCH_CPU)
    _pip(python, str(wheel))
    home = root / "home"
    home.mkdir()
    return Installed(wheel, sdist, venv, home)


def test_the_sdist_and_the_wheel_carry_every_file_of_every_package(installed: Installed) -> None:
    expected = _source_files()
    assert {"swarmtrain/projector/schema.sql", "swarmtrain/cli/data/digits.csv"} <= expected
    assert any(f.startswith("swarmtrain/gateway/dashboard/templates/") for f in expected)
    assert any(f.startswith("swarmtrain/gateway/dashboard/static/") for f in expected)
    with zipfile.ZipFile(installed.wheel) as whl:
        in_wheel = {n for n in whl.namelist() if n.startswith("swarmtrain/")}
    assert in_wheel == expected, f"missing {sorted(expected - in_wheel)}, extra {sorted(in_wheel - expected)}"
    with tarfile.open(installed.sdist) as tar:
        names = tar.getnames()
    top = f"swarmtrain-{PROJECT['version']}/"
    in_sdist = {n.removeprefix(top) for n in names}
    for part in [*ROOT.glob("libs/*/swarmtrain"), *ROOT.glob("services/*/swarmtrain")]:
        folder = part.relative_to(ROOT).as_posix()
        assert any(n.startswith(folder + "/") for n in in_sdist), f"{folder} is not in the sdist"
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_every_module_imports_from_the_installed_wheel_alone(installed: Installed) -> None:
    script = textwrap.dedent(
        """
        import importlib, pathlib, sys
        import swarmtrain
        [where] = swarmtrain.__path__  # one folder: the installed one, no source folder beside it
        root = pathlib.Path(where)
        assert pathlib.Path(sys.prefix) in root.parents, (where, sys.prefix)
        names = sorted(
            ".".join(("swarmtrain", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
            for p in root.rglob("*.py")
        )
        for name in names:
            module = importlib.import_module(name)
            assert pathlib.Path(sys.prefix) in pathlib.Path(module.__file__).parents, module.__file__
        print(len(names))
        """
    )
    done = installed.run(str(installed.python), "-I", "-c", script)
    assert done.returncode == 0, done.stderr[-4000:]
    count = int(done.stdout.split()[-1])
    assert count == len([f for f in _source_files() if f.endswith(".py")])


def test_swarmtrain_version_prints_the_one_version(installed: Installed) -> None:
    done = installed.run(*installed.swarmtrain, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"swarmtrain {PROJECT['version']}"


def test_swarmtrain_demo_completes_from_the_wheel(installed: Installed) -> None:
    done = installed.run(*installed.swarmtrain, "demo", "--peers", "1", timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "completed" in out and "stack stopped" in out, out[-3000:]
    [model] = installed.home.glob("swarmtrain-demo-*.safetensors")
    assert model.stat().st_size > 0
    model.unlink()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def wheel_stack(
    installed: Installed, tmp_path_factory: pytest.TempPathFactory, postgres_port: int
) -> AsyncIterator[Listening]:
    """``swarmtrain up --listen``, the installed wheel's."""
    name = "wheelstack"
    servers.create_database(postgres_port, name)
    st = Listening(
        tmp_path_factory.mktemp("wheel-listen"), servers.postgres_url(postgres_port, name), installed.swarmtrain
    )
    try:
        st.announcement = await st.wait_up()
        yield st
    finally:
        left = st.stop()
        assert not left, f"swarmtrain up left processes behind: {left}"


async def test_a_peer_from_the_wheel_joins_a_listening_stack_and_trains(
    installed: Installed, wheel_stack: Listening, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """The peer machine of "Many machines": the wheel installed there, the line ``invite`` printed."""
    await join_and_train(wheel_stack, procs, tmp_path, installed.swarmtrain)
