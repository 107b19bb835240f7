"""How every command prints: JSON, a table, a number, a short id, a progress bar, and an error on one
line (the API's problem detail, exit status 1 by default), never a traceback."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from swarmtrain.cli.client import ApiError, Json

NONE = "-"
"""What a table shows for a value that is not there."""
Handler = Callable[[argparse.Namespace], int]


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def table(rows: list[list[Any]], headers: list[str], out: TextIO | None = None) -> None:
    """Left-aligned columns under a header and a rule; None shows as ``NONE``."""
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [[NONE if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def listing(args: argparse.Namespace, rows: list[Json], headers: list[str], cells: Callable[[Json], list[Any]]) -> int:
    """A list command's output: the API's JSON as it came with ``--json``, else a table."""
    if args.json:
        print_json(rows)
    else:
        table([cells(row) for row in rows], headers)
    return 0


def fmt(x: float | None, digits: int = 3) -> str:
    return NONE if x is None else f"{x:.{digits}f}"


def short(value: str | None) -> str:
    """An id as tables show it: its first 8 characters."""
    return (value or "")[:8]


class ProgressBar:
    """A one-line progress bar on stderr when it is a terminal; otherwise only the final line."""

    def __init__(self, label: str, out: TextIO | None = None) -> None:
        self.label, self.out = label, out or sys.stderr
        self.tty = self.out.isatty()
        self._last = -1.0

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        if self.tty and (frac >= 1.0 or frac - self._last >= 0.01):
            self._last = frac
            filled = int(30 * frac)
            self.out.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {frac:6.1%} {done / 1e6:7.2f} MB")
            self.out.flush()

    def finish(self, text: str) -> None:
        self.out.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.out.flush()


def one_line_errors(exit_code: int = 1) -> Callable[[Handler], Handler]:
    """An ``ApiError`` as ``swarmtrain: error: ...`` on stderr with ``exit_code``; Ctrl-C as 130."""

    def wrap(func: Handler) -> Handler:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            try:
                return func(args)
            except ApiError as exc:
                print(f"swarmtrain: error: {exc}", file=sys.stderr)
                return exit_code
            except KeyboardInterrupt:
                print("swarmtrain: interrupted", file=sys.stderr)
                return 130

        return run

    return wrap
