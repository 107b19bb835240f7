"""The docs match the code: every setting is in the README's table, the quick start is two commands."""

from __future__ import annotations

import re
from pathlib import Path

from swarmtrain.common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme_table() -> None:
    documented = set(re.findall(r"^\| `(SWARMTRAIN_[A-Z0-9_]+)` \|", README, flags=re.M))
    expected = {f"SWARMTRAIN_{name.upper()}" for name in Settings.__struct_fields__}
    assert documented == expected, "run `python scripts/settings_table.py` and paste it into README.md"


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    quick = README.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
