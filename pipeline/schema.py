"""The shard contract shared by the write side (``build-shards``) and the read side (loaders).

A shard folder holds, for each split (``train``, ``val``, ...)::

    <split>-NNNNNN.tar   WebDataset tar; each sample has the components below
    <split>-NNNNNN.idx   DALI index of that tar (the format ``wds2idx`` writes)
    manifest.json        classes, per-shard counts + sha256, build parameters, skipped files

Sample components (``<key>.<ext>``):

- ``jpg``:  RGB JPEG bytes (baseline or progressive)
- ``cls``:  class index as ASCII decimal (the WebDataset convention, readable by any tool)
- ``lbl``:  the same class index as 4 bytes, little-endian int32, so that DALI's
            ``fn.readers.webdataset(ext=[..., "lbl"], dtypes=[..., types.INT32])`` reads labels
            without a Python callback in the hot path
- ``json``: source path, class name/synset (optional metadata, never read in the hot path)

A shard location is a folder or an object-store prefix (``s3://bucket/prefix``, ``pipeline.storage``):
``load_manifest``, ``manifest_sha256`` and ``split_files`` take either.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
IMAGE_EXT = "jpg"
CLASS_EXT = "cls"
LABEL_EXT = "lbl"
META_EXT = "json"
SAMPLE_EXTS = (IMAGE_EXT, CLASS_EXT, LABEL_EXT, META_EXT)
INDEX_VERSION = "v1.2"  # DALI tools/wds2idx.py IndexCreator.index_file_version


class ShardFormatError(ValueError):
    """A shard folder or manifest does not follow the contract; the message says what and where."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.idx"


def encode_label(label: int) -> tuple[bytes, bytes]:
    """``(cls, lbl)`` component bytes for a class index."""
    if label < 0:
        raise ValueError(f"class index must be >= 0, got {label}")
    return str(label).encode("ascii"), struct.pack("<i", label)


def decode_lbl(data: bytes) -> int:
    return struct.unpack("<i", data)[0]


@dataclass(frozen=True)
class ClassInfo:
    index: int
    name: str  # folder name or synset (e.g. "n01440764" or "airplane")
    description: str = ""  # human name where a words file was given ("tench, Tinca tinca")


@dataclass(frozen=True)
class ShardInfo:
    tar: str  # file name relative to the shard folder
    index: str  # DALI index file name
    count: int  # samples in the tar
    sha256: str  # of the tar file
    bytes: int


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[ShardInfo, ...]
    skipped: tuple[dict, ...] = ()  # {"source": ..., "reason": ...}
    params: dict = field(default_factory=dict)  # build parameters of this split

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)


@dataclass(frozen=True)
class Manifest:
    classes: tuple[ClassInfo, ...]
    splits: dict[str, SplitInfo]
    version: int = MANIFEST_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ShardFormatError(
                f"split {name!r} is not in the manifest (have: {', '.join(sorted(self.splits)) or 'none'})"
            )
        return self.splits[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "classes": [c.__dict__ for c in self.classes],
            "splits": {
                name: {
                    "num_samples": s.num_samples,
                    "shards": [sh.__dict__ for sh in s.shards],
                    "skipped": list(s.skipped),
                    "params": s.params,
                }
                for name, s in sorted(self.splits.items())
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        try:
            classes = tuple(ClassInfo(**c) for c in data["classes"])
            splits = {
                name: SplitInfo(
                    shards=tuple(ShardInfo(**sh) for sh in s["shards"]),
                    skipped=tuple(s.get("skipped", ())),
                    params=dict(s.get("params", {})),
                )
                for name, s in data["splits"].items()
            }
            version = int(data.get("version", MANIFEST_VERSION))
        except (KeyError, TypeError) as exc:
            raise ShardFormatError(f"{where}: malformed manifest ({exc!r})") from exc
        if [c.index for c in classes] != list(range(len(classes))):
            raise ShardFormatError(f"{where}: class indices must be 0..N-1 in order")
        return cls(classes=classes, splits=splits, version=version)


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (sorted keys, stable bytes for identical content)."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def load_manifest(folder: str | Path) -> Manifest:
    if not str(folder).strip():
        raise ShardFormatError(
            "no shard folder given (data.shards is empty): set it to a folder made by `build-shards`"
        )
    if storage.is_remote(folder):
        data = _remote_manifest_bytes(str(folder))
        where = storage.join(str(folder), MANIFEST_NAME)
    else:
        path = Path(folder) / MANIFEST_NAME
        if not Path(folder).is_dir():
            raise ShardFormatError(f"shard folder {folder} does not exist; build it with `build-shards`")
        if not path.is_file():
            raise ShardFormatError(f"{path} is missing: is {folder} a shard folder made by `build-shards`?")
        data, where = path.read_bytes(), str(path)
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardFormatError(f"{where}: not valid JSON ({exc})") from exc
    return Manifest.from_dict(parsed, where=where)


def _remote_manifest_bytes(url: str) -> bytes:
    """The manifest of a prefix, once per process (the loaders, the worker and tracking all ask)."""
    if url not in _REMOTE_MANIFESTS:
        try:
            _REMOTE_MANIFESTS[url] = storage.client_for(url).get(MANIFEST_NAME)
        except storage.ObjectStoreError as exc:
            hint = f": is {url} a shard set uploaded by `build-shards SRC {url}`?"
            hint = hint if "no such object" in str(exc) else ""
            raise ShardFormatError(f"{exc}{hint}") from None
    return _REMOTE_MANIFESTS[url]


_REMOTE_MANIFESTS: dict[str, bytes] = {}


def forget_remote(url: str | None = None) -> None:
    """Read remote manifests and listings again (after an upload, or in tests)."""
    if url is None:
        _REMOTE_MANIFESTS.clear()
        _REMOTE_LISTINGS.clear()
    else:
        _REMOTE_MANIFESTS.pop(str(url), None)
        _REMOTE_LISTINGS.pop(str(url), None)


def manifest_sha256(folder: str | Path) -> str:
    """Hash of ``manifest.json``: identifies a shard set in MLflow tags and promotion gates."""
    if storage.is_remote(folder):
        return hashlib.sha256(_remote_manifest_bytes(str(folder))).hexdigest()
    return hashlib.sha256((Path(folder) / MANIFEST_NAME).read_bytes()).hexdigest()


_REMOTE_LISTINGS: dict[str, dict[str, tuple[int, str]]] = {}


def remote_listing(url: str) -> dict[str, tuple[int, str]]:
    """Every object under a prefix: name -> ``(size, ETag)``, one LIST per process."""
    if url not in _REMOTE_LISTINGS:
        try:
            _REMOTE_LISTINGS[url] = storage.client_for(url).list()
        except storage.ObjectStoreError as exc:
            raise ShardFormatError(str(exc)) from None
    return _REMOTE_LISTINGS[url]


def split_files(folder: str | Path, split: str) -> tuple[list[str], list[str]]:
    """Absolute tar and index paths (URLs on object storage) of a split, in manifest order; errors
    name a missing file."""
    info = load_manifest(folder).split(split)
    if storage.is_remote(folder):
        listing = remote_listing(str(folder))
        for sh in info.shards:
            for name in (sh.tar, sh.index):
                if name not in listing:
                    where = storage.join(str(folder), name)
                    raise ShardFormatError(f"{where} listed in the manifest is missing")
        return (
            [storage.join(str(folder), sh.tar) for sh in info.shards],
            [storage.join(str(folder), sh.index) for sh in info.shards],
        )
    folder = Path(folder).resolve()
    tars, idxs = [], []
    for sh in info.shards:
        for name in (sh.tar, sh.index):
            if not (folder / name).is_file():
                raise ShardFormatError(f"{folder / name} listed in the manifest is missing")
        tars.append(str(folder / sh.tar))
        idxs.append(str(folder / sh.index))
    return tars, idxs


def read_index(path: str | Path) -> tuple[int, list[list[tuple[str, int, int, str]]]]:
    """A DALI v1.2 index: ``(declared count, per sample [(ext, data offset, size, member name), ...])``;
    ValueError names the line that breaks the format."""
    return parse_index(Path(path).read_text(encoding="utf-8"))


def parse_index(text: str) -> tuple[int, list[list[tuple[str, int, int, str]]]]:
    """``read_index`` of an index's text."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"first line must be '{INDEX_VERSION} <count>', got {lines[:1]}")
    samples = []
    for n, line in enumerate(lines[1:], start=2):
        tok = line.split()
        if not tok:
            continue
        if len(tok) % 4:
            raise ValueError(f"line {n}: expected groups of 'ext offset size name'")
        groups = range(0, len(tok), 4)
        samples.append([(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in groups])
    return int(head[1]), samples


def truncated_samples(
    tar: str | Path, idx: str | Path, entries: list | None = None, size: int | None = None
) -> list[tuple[str, str]]:
    """``(key, reason)`` of every sample whose bytes, by the index's offsets, extend past the end of
    the tar: what a cut-off copy or an interrupted transfer leaves. Reads the index (unless its
    ``entries`` are given) and one stat (unless the tar's ``size`` is given)."""
    if size is None:
        size = Path(tar).stat().st_size
    if entries is None:
        _, entries = read_index(idx)
    out = []
    for sample in entries:
        end = max(offset + length for _, offset, length, _ in sample)
        if end > size:
            key = sample[0][3].partition(".")[0]
            out.append((key, f"truncated: its data ends at byte {end} but {Path(tar).name} has {size} bytes"))
    return out
