"""The images format: a zip or tar (``.tar.gz`` too) of ``<class>/<file>`` PNG or JPEG images,
torchvision's ``ImageFolder`` layout (one folder above the classes is allowed, and hidden files
and ``__MACOSX/`` are skipped). The folder names are the classes.

The check looks at every member's name (no absolute path, no ``..``, no link or device in a tar),
caps the members' number and their declared uncompressed size (a zip reads no more than a member
declares; a tar member's size is its real one), then decodes every image with Pillow: a file that
is not a PNG or JPEG, or does not decode, is refused by name, and so is an image of more than
``max_image_pixels`` (read from its header before its pixels). All images are resized to the
upload's ``image_size`` ``[H, W]``; without one they must share one size (mixed sizes are refused,
with the median size suggested). ``channels`` is 1 when every image is grayscale, else 3 (RGB,
alpha dropped). Both are fixed in the ``DataSpec``, so every peer reads the same pixels.

The reader decodes the members in name order, as the check did: rows are images, features the
pixels ``C x H x W`` (values 0..255), the label the class folder.
"""

from __future__ import annotations

import base64
import io
import tarfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from swarmtrain.common.events import DataSpec
from swarmtrain.training.formats.base import (
    FORMATS,
    MAX_CLASSES,
    PREVIEW_CLASSES,
    PREVIEW_THUMBNAILS,
    Blocks,
    DataError,
    Index,
    Limits,
    Preview,
    Rejected,
    Summary,
    Table,
    UploadOptions,
    block_rows,
    check_classes,
    check_declared_size,
    check_member_name,
    shown_counts,
)

KINDS = ("PNG", "JPEG")
THUMBNAIL = 64
"""A preview's thumbnails are at most this many pixels a side."""
GRAY = frozenset({"1", "L", "LA", "I", "I;16", "F"})


@dataclass(frozen=True)
class Member:
    name: str
    """The member's name in the archive."""
    label: str
    """Its class: the folder it is in."""


def _skipped(name: str) -> bool:
    parts = name.split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _layout(names: list[str]) -> list[Member]:
    """The images of ``names`` (files only) as ``<class>/<file>``, under at most one common folder."""
    files = [n for n in names if not _skipped(n)]
    if not files:
        raise Rejected("the archive holds no images: it needs <class>/<file> members")
    split = [n.split("/") for n in files]
    if all(len(p) == 3 for p in split) and len({p[0] for p in split}) == 1:
        split = [p[1:] for p in split]
    bad = next((n for n, p in zip(files, split, strict=True) if len(p) != 2 or not p[0] or not p[1]), None)
    if bad is not None:
        raise Rejected(f"member {bad[:200]!r} is not <class>/<file>: images go in one folder per class")
    return sorted((Member(n, p[0]) for n, p in zip(files, split, strict=True)), key=lambda m: m.name)


class _Archive:
    """A zip or a tar, read member by member with their sizes checked first."""

    def __init__(self, source: BinaryIO | Path, limits: Limits) -> None:
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        if zipfile.is_zipfile(source):
            try:
                self._zip = zipfile.ZipFile(source)  # closed by close()
            except (zipfile.BadZipFile, OSError) as exc:
                raise Rejected(f"not a valid zip archive: {exc}") from None
            infos = self._zip.infolist()
            names = [i.filename for i in infos]
            self.files = [i.filename for i in infos if not i.is_dir()]
            sizes = [i.file_size for i in infos]
        else:
            try:
                if isinstance(source, Path):
                    self._tar = tarfile.open(source, mode="r:*")  # noqa: SIM115 (closed by close())
                else:
                    source.seek(0)
                    self._tar = tarfile.open(fileobj=source, mode="r:*")  # noqa: SIM115
                members = self._tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise Rejected(f"not a zip or tar archive of images: {exc}") from None
            names = [t.name for t in members]
            for t in members:
                check_member_name(t.name)
                if not (t.isfile() or t.isdir()):
                    raise Rejected(f"member {t.name[:200]!r} is a link or a device: only files are read")
            self.files = [t.name for t in members if t.isfile()]
            sizes = [t.size for t in members if t.isfile()]
        if len(names) > limits.max_members:
            raise Rejected(f"the archive has {len(names):,} members: at most {limits.max_members:,}")
        for name in names:
            check_member_name(name)
        check_declared_size(sum(sizes), limits)

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(name)
            assert self._tar is not None
            member = self._tar.extractfile(name)
            if member is None:
                raise Rejected(f"member {name[:200]!r} cannot be read")
            with member:
                return member.read()
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:  # a CRC error, a cut archive
            raise Rejected(f"member {name[:200]!r} cannot be read: {exc}") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()


@contextmanager
def _archive(source: BinaryIO | Path, limits: Limits) -> Iterator[_Archive]:
    archive = _Archive(source, limits)
    try:
        yield archive
    finally:
        archive.close()


def _open(raw: bytes, name: str, limits: Limits) -> Image.Image:
    """The image of member ``name``, its pixels decoded; ``Rejected`` for what is not a PNG or JPEG."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=list(KINDS))
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise Rejected(f"image {name[:200]!r} is {width}x{height}: at most {limits.max_image_pixels:,} pixels")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Rejected(f"member {name[:200]!r} is not a PNG or JPEG image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise Rejected(f"image {name[:200]!r} does not decode: {str(exc)[:200]}") from None
    return image


def _pixels(image: Image.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """``image`` as ``C x H x W`` uint8, converted to ``channels`` and resized to ``size`` (H, W)."""
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None, :, :] if channels == 1 else np.moveaxis(array, 2, 0)


def check_images(stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
    with _archive(stream, limits) as archive:
        members = _layout(archive.files)
        sizes: Counter[tuple[int, int]] = Counter()
        gray = True
        counts: Counter[str] = Counter()
        for member in members:
            image = _open(archive.read(member.name), member.name, limits)
            sizes[(image.size[1], image.size[0])] += 1
            gray = gray and image.mode in GRAY
            counts[member.label] += 1
            if len(counts) > MAX_CLASSES:
                raise Rejected(f"more than {MAX_CLASSES} class folders")
    size = options.image_size
    if size is None:
        if len(sizes) > 1:
            heights = sorted(h for (h, _), n in sizes.items() for _ in range(n))
            widths = sorted(w for (_, w), n in sizes.items() for _ in range(n))
            median = f"{heights[len(heights) // 2]}x{widths[len(widths) // 2]}"
            shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:5])
            raise Rejected(
                f"the images have {len(sizes)} sizes ({shown}{', ...' if len(sizes) > 5 else ''}): give image_size"
                f" (HxW) to resize them to, e.g. image_size={median}, their median"
            )
        size = next(iter(sizes))
    check_classes(counts, len(members), "the class folders")
    channels = 1 if gray else 3
    return Summary(
        rows=len(members),
        features=channels * size[0] * size[1],
        classes=len(counts),
        columns=sorted(counts),
        label_column="class",
        shape=[channels, size[0], size[1]],
        class_counts=shown_counts(counts),
        data=DataSpec(format="images", image_size=[size[0], size[1]], channels=1 if gray else 3),
    )


_READ_ALL = Limits(max_uncompressed_bytes=1 << 62, max_members=1 << 31)
"""A stored dataset was checked at upload: the reader does not refuse it for its size."""


def _size(spec: DataSpec) -> tuple[int, int]:
    if spec.image_size is None or spec.channels not in (1, 3):
        raise DataError("an images dataset needs its image_size and channels (fixed at upload)")
    return spec.image_size[0], spec.image_size[1]


def load_images(path: Path, spec: DataSpec) -> Table:
    index = index_images(path, spec)
    x = np.empty((index.rows, len(index.feature_names)), dtype=np.float32)
    for rows, block in scan_images(path, spec, np.arange(index.rows)):
        x[rows] = block
    return Table(
        features=x,
        labels=index.labels,
        classes=index.classes,
        feature_names=index.feature_names,
        label_column="class",
    )


def index_images(path: Path, spec: DataSpec) -> Index:
    """The members' names (their class folders): no image is decoded."""
    size = _size(spec)
    try:
        with _archive(path, _READ_ALL) as archive:
            members = _layout(archive.files)
    except Rejected as exc:
        raise DataError(str(exc)) from None
    classes = sorted({m.label for m in members})
    index = {c: i for i, c in enumerate(classes)}
    return Index(
        labels=np.asarray([index[m.label] for m in members], dtype=np.int64).reshape(-1),
        classes=classes,
        feature_names=[f"x{i}" for i in range(spec.channels * size[0] * size[1])],
        label_column="class",
    )


def scan_images(path: Path, spec: DataSpec, rows: np.ndarray) -> Blocks:
    """Row ``i`` is the ``i``-th member in name order: only ``rows``' members are read and decoded,
    in that order (a tar's forward), a block of images at a time."""
    size = _size(spec)
    width = spec.channels * size[0] * size[1]
    step = block_rows(width * 4)
    try:
        with _archive(path, _READ_ALL) as archive:
            members = _layout(archive.files)
            for start in range(0, len(rows), step):
                wanted = rows[start : start + step]
                block = np.empty((len(wanted), width), dtype=np.float32)
                for at, row in enumerate(wanted.tolist()):
                    name = members[row].name
                    image = _open(archive.read(name), name, Limits(max_image_pixels=1 << 40))
                    block[at] = _pixels(image, spec.channels, size).reshape(-1)
                yield wanted, block
    except Rejected as exc:
        raise DataError(str(exc)) from None


class ImagesFormat:
    """``images``: ``<class>/<file>`` PNG or JPEG in a zip or tar, resized to one size."""

    def check(self, stream: BinaryIO, options: UploadOptions, limits: Limits) -> Summary:
        return check_images(stream, options, limits)

    def load(self, path: Path, spec: DataSpec, label_column: str) -> Table:
        return load_images(path, spec)

    def index(self, path: Path, spec: DataSpec, label_column: str) -> Index:
        return index_images(path, spec)

    def scan(self, path: Path, spec: DataSpec, label_column: str, rows: np.ndarray) -> Blocks:
        return scan_images(path, spec, rows)

    def preview(self, path: Path, spec: DataSpec, label_column: str) -> Preview:
        thumbnails: dict[str, list[str]] = {}
        with _archive(path, _READ_ALL) as archive:
            for member in _layout(archive.files):
                if member.label not in thumbnails:
                    if len(thumbnails) >= PREVIEW_CLASSES:
                        continue
                    thumbnails[member.label] = []
                shown = thumbnails[member.label]
                if len(shown) >= PREVIEW_THUMBNAILS:
                    continue
                image = _open(archive.read(member.name), member.name, Limits(max_image_pixels=1 << 40))
                image = image.convert("L" if spec.channels == 1 else "RGB")
                image.thumbnail((THUMBNAIL, THUMBNAIL))
                out = io.BytesIO()
                image.save(out, format="PNG")
                shown.append(base64.b64encode(out.getvalue()).decode())
        return Preview(thumbnails=thumbnails)


FORMATS.add("images", ImagesFormat())
