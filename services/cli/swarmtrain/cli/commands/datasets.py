"""``swarmtrain datasets upload|ls|show``: a dataset streamed to the gateway, the user's datasets,
and one of them looked at before training (its facts and its preview, as text)."""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path
from typing import Any

from PIL import Image

from swarmtrain.cli.client import ApiError
from swarmtrain.cli.commands.base import Group, client, command
from swarmtrain.cli.output import ProgressBar, listing, one_line_errors, print_json, table
from swarmtrain.common import formats

SHADES = " .:-=+*#%@"
"""Dark to light: a thumbnail printed as text."""
BAR = 40


def register(sub: Group) -> None:
    ds = sub.add_parser("datasets", help="upload, list and look at datasets").add_subparsers(
        dest="action", required=True
    )

    up = command(ds.add_parser("upload", help="upload a dataset (with a progress bar)"), _upload, json=True)
    up.add_argument("file")
    up.add_argument("--label", default="label", help="the label column (default: label)")
    up.add_argument(
        "--format",
        choices=formats.FORMATS,
        help="confirm the format (default: recognised from the content; a .txt corpus needs --format text)",
    )
    up.add_argument("--image-size", metavar="HxW", help="images: resize every image to HxW")
    up.add_argument("--vocab-size", type=int, metavar="N", help="text: train a BPE tokenizer of N tokens at upload")

    command(ds.add_parser("ls", help="list my datasets"), _ls, json=True)

    show = command(ds.add_parser("show", help="a dataset's facts and a preview of it"), _show, json=True)
    show.add_argument("dataset_id")


@one_line_errors()
def _upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ApiError(0, f"no such file: {path}")
    options = {
        name: str(value)
        for name, value in (("format", args.format), ("image_size", args.image_size), ("vocab_size", args.vocab_size))
        if value is not None
    }
    bar = ProgressBar(f"uploading {path.name}")
    with client(args) as api:
        ds = api.upload(path, args.label, bar, options)
    if args.json:
        bar.finish("")
        print_json(ds)
        return 0
    bar.finish(f"dataset {ds['dataset_id']}: {_facts(ds)}")
    return 0


def _facts(ds: dict[str, Any]) -> str:
    if not formats.rules(ds.get("format", "csv")).labelled:
        tokenizer = ds.get("tokenizer") or {}
        return f"{ds['rows']} rows, {ds.get('tokens', 0)} tokens ({tokenizer.get('kind', 'byte')} tokenizer)"
    return f"{ds['rows']} rows, {ds['features']} features, {ds['classes']} classes"


@one_line_errors()
def _ls(args: argparse.Namespace) -> int:
    with client(args) as api:
        rows = api.datasets()
    return listing(
        args,
        rows,
        ["DATASET", "NAME", "ROWS", "FEATURES", "CLASSES", "LABEL", "FORMAT"],
        lambda d: [
            d["dataset_id"],
            d["name"],
            d["rows"],
            d["features"],
            d["classes"],
            d["label_column"],
            d.get("format", "csv"),
        ],
    )


@one_line_errors()
def _show(args: argparse.Namespace) -> int:
    with client(args) as api:
        ds = api.dataset(args.dataset_id)
        look = api.preview(args.dataset_id)
    if args.json:
        print_json({**ds, "preview": look})
        return 0
    shape = "x".join(str(d) for d in ds.get("shape") or [])
    print(f"dataset {ds['dataset_id']}  {ds['name']}  ({ds.get('format', 'csv')}, {ds['size_bytes']} bytes)")
    print(f"  {_facts(ds)}{f', shape {shape}' if shape else ''}, label {ds['label_column']!r}")
    print(f"  sha256 {ds['sha256']}")
    if look["rows"]:
        print("\nfirst rows:")
        table(look["rows"], look["columns"])
    for label, thumbnails in look["thumbnails"].items():
        print(f"\nclass {label}:")
        print("\n".join(_side_by_side([_ascii(t) for t in thumbnails])))
    if look["lines"]:
        print(f"\nfirst lines ({look['tokens']} tokens in all):")
        for line in look["lines"]:
            print(f"  {line}")
    counts: dict[str, int] = look["class_counts"]
    if counts:
        print("\nclasses:")
        most = max(counts.values())
        width = max(len(name) for name in counts)
        for name, n in counts.items():
            print(f"  {name:<{width}}  {'#' * max(1, round(BAR * n / most)):<{BAR}}  {n}")
    return 0


def _ascii(thumbnail: str, side: int = 16) -> list[str]:
    """A base64 PNG thumbnail as lines of text, at most ``side`` characters a side."""
    image = Image.open(io.BytesIO(base64.b64decode(thumbnail))).convert("L")
    image.thumbnail((side, side))
    pixels = list(image.getdata())
    w = image.size[0]
    return [
        "".join(SHADES[min(len(SHADES) - 1, p * len(SHADES) // 256)] for p in pixels[row : row + w])
        for row in range(0, len(pixels), w)
    ]


def _side_by_side(blocks: list[list[str]]) -> list[str]:
    height = max((len(b) for b in blocks), default=0)
    width = [max((len(line) for line in b), default=0) for b in blocks]
    return [
        "  " + "  ".join((b[i] if i < len(b) else "").ljust(w) for b, w in zip(blocks, width, strict=True))
        for i in range(height)
    ]
