"""``swarmtrain datasets upload|ls``: a training CSV streamed to the gateway, and the user's datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from swarmtrain.cli.client import ApiError
from swarmtrain.cli.commands.base import Group, client, command
from swarmtrain.cli.output import ProgressBar, listing, one_line_errors, print_json


def register(sub: Group) -> None:
    ds = sub.add_parser("datasets", help="upload and list datasets").add_subparsers(dest="action", required=True)

    up = command(ds.add_parser("upload", help="upload a training CSV (with a progress bar)"), _upload, json=True)
    up.add_argument("file")
    up.add_argument("--label", default="label", help="the label column (default: label)")

    command(ds.add_parser("ls", help="list my datasets"), _ls, json=True)


@one_line_errors()
def _upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ApiError(0, f"no such file: {path}")
    bar = ProgressBar(f"uploading {path.name}")
    with client(args) as api:
        ds = api.upload(path, args.label, bar)
    if args.json:
        bar.finish("")
        print_json(ds)
        return 0
    bar.finish(f"dataset {ds['dataset_id']}: {ds['rows']} rows, {ds['features']} features, {ds['classes']} classes")
    return 0


@one_line_errors()
def _ls(args: argparse.Namespace) -> int:
    with client(args) as api:
        rows = api.datasets()
    return listing(
        args,
        rows,
        ["DATASET", "NAME", "ROWS", "FEATURES", "CLASSES", "LABEL"],
        lambda d: [d["dataset_id"], d["name"], d["rows"], d["features"], d["classes"], d["label_column"]],
    )
