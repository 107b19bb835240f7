"""Print the README's settings table from the Settings docstrings (``python scripts/settings_table.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

from swarmtrain.common.settings import Settings

SHOWN_DEFAULTS = {
    "blob_url": "file://$XDG_STATE_HOME/swarmtrain/blobs",
    "state_dir": "$XDG_STATE_HOME/swarmtrain",
}


def table() -> str:
    source = Path(__file__).resolve().parents[1] / "libs/common/swarmtrain/common/settings.py"
    cls = next(n for n in ast.parse(source.read_text()).body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    docs: dict[str, str] = {}
    for node, nxt in zip(cls.body, cls.body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = str(nxt.value.value).split(" (SWARMTRAIN_")[0].replace("\n", " ")  # type: ignore[attr-defined]
    defaults = Settings()
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name in Settings.__struct_fields__:
        default = SHOWN_DEFAULTS.get(name, getattr(defaults, name))
        shown = "—" if default is None else f"`{default}`"
        rows.append(f"| `SWARMTRAIN_{name.upper()}` | {shown} | {' '.join(docs.get(name, '').split())} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
