"""Read a collection of files (a folder or a tar archive) without extracting it.

A *collection* is a flat mapping ``relpath -> Locator`` where a :class:`Locator` says where the
bytes of one file live: ``(path, offset, size)`` in a plain file on disk. That is all a worker
process needs to read an image with one ``seek`` + ``read``, so the same code serves

- a folder (``<root>/n01440764/n01440764_10026.JPEG``),
- an uncompressed tar (member data offsets come from ``tarfile``'s ``offset_data``),
- a tar of per-class tars (``ILSVRC2012_img_train.tar`` holds ``n01440764.tar`` ...): every member
  named ``*.tar`` is opened in place and its members appear under ``<stem>/`` (offsets add up),
- a gzip-compressed tar (``*.tar.gz`` / ``*.tgz``): gzip has no random access, so it is
  decompressed once into a temporary ``.tar`` (streamed, never into individual files), which the
  caller removes with :meth:`Collection.close`.

Used by ``pipeline.shards.sources``; not run on its own.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.shards import tarscan

GZIP_MAGIC = b"\x1f\x8b"  # RFC 1952 §2.3.1: ID1 ID2


@dataclass(frozen=True)
class Locator:
    """Bytes ``[offset, offset + size)`` of the plain file ``path``."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class Collection:
    """Files of a folder or archive: ``files[relpath] = Locator``; ``relpath`` uses ``/``."""

    root: str
    files: dict[str, Locator]
    is_archive: bool
    dirs: set[str] = field(default_factory=set)  # folders seen, also empty ones (an empty class)
    _temp_dirs: list[str] = field(default_factory=list)
    # archive members that are not read, with the reason (links, devices, names leaving the archive):
    # build-shards lists them among its skipped inputs
    ignored: list[dict] = field(default_factory=list)

    def read(self, relpath: str) -> bytes:
        return self.files[relpath].read()

    def close(self) -> None:
        for d in self._temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._temp_dirs.clear()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_tar_path(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def _is_hidden(relpath: str) -> bool:
    # macOS resource forks and dot files are never images (".DS_Store", "._x.JPEG", "__MACOSX/").
    parts = relpath.split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _normalize(name: str) -> str:
    """``./a//b`` -> ``a/b``: tar member names come with or without a leading ``./``."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


MEMBER_KINDS = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
                b"4": "a block device", b"6": "a fifo"}


def _read_tar(tar_path: str, base_offset: int, size: int | None, prefix: str, out: dict[str, Locator],
              dirs: set[str], ignored: list[dict]):
    """Add the regular members of the tar at ``tar_path[base_offset:]`` to ``out``; recurse into ``*.tar``."""
    with open(tar_path, "rb") as f:
        try:
            try:
                members = tarscan.scan(f, base_offset, size)
            except tarscan.UnsupportedTar:
                members = tarscan.scan_with_tarfile(f, base_offset, size)
        except (tarfile.TarError, ValueError) as exc:
            where = f"{tar_path}::{prefix}" if prefix else tar_path
            raise ValueError(f"{where} is not a readable tar: {exc}") from exc
    if prefix:
        dirs.add(prefix)
    for name, kind, offset, length in members:
        rel = _normalize(name)
        full = f"{prefix}/{rel}" if prefix else rel
        if ".." in rel.split("/"):  # before the hidden-file rule, which would drop it silently
            ignored.append({"source": full, "reason": "tar member name leaves the archive ('..'); not read"})
        elif not rel or _is_hidden(rel):
            continue
        elif kind == tarscan.DIRECTORY:
            dirs.add(full)
        elif kind not in tarscan.REGULAR:  # links, devices, fifos: not image data
            what = MEMBER_KINDS.get(kind, f"of tar type {kind!r}")
            ignored.append({"source": full, "reason": f"tar member is {what}, not a file; not read"})
        elif rel.lower().endswith(".tar"):  # tar of per-class tars: n01440764.tar -> n01440764/...
            _read_tar(tar_path, offset, length, full[: -len(".tar")], out, dirs, ignored)
        else:
            out[full] = Locator(tar_path, offset, length)


def _gunzip_to_temp(path: str, temp_dirs: list[str]) -> str:
    tmp_dir = tempfile.mkdtemp(prefix="build-shards-gz-")
    temp_dirs.append(tmp_dir)
    target = os.path.join(tmp_dir, Path(path).name.rsplit(".", 1)[0] + ".tar")
    with gzip.open(path, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)
    return target


def within(path: Path, roots) -> bool:
    """``path`` (resolved) is one of ``roots`` or lies under one of them."""
    return any(path.is_relative_to(r) for r in roots)


def _walk_folder(
    root: Path, out: dict[str, Locator], dirs: set[str], ignored: list[dict], allowed: tuple[Path, ...] = ()
) -> None:
    """Every file under ``root``. A link is followed only when it resolves inside ``root`` (or an
    ``allowed`` root); one that leaves them is listed in ``ignored``, and a linked folder still names
    its class (empty), so that the class table does not shift."""
    stack, roots = [root], (root, *allowed)
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith(".") or entry.name == "__MACOSX":
                    continue
                if entry.is_symlink():
                    target = Path(os.path.realpath(entry.path))
                    if not within(target, roots):
                        rel = Path(entry.path).relative_to(root).as_posix()
                        if entry.is_dir(follow_symlinks=True):
                            dirs.add(rel)
                        ignored.append({
                            "source": rel,
                            "reason": f"outside {root}: a link to {target}; not read (pass --allow-outside "
                            "ROOT to read files under ROOT)",
                        })
                        continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                    dirs.add(Path(entry.path).relative_to(root).as_posix())
                elif entry.is_file(follow_symlinks=True):
                    rel = Path(entry.path).relative_to(root).as_posix()
                    if entry.name.lower().endswith(".tar"):
                        _read_tar(entry.path, 0, None, rel[: -len(".tar")], out, dirs, ignored)
                    else:
                        out[rel] = Locator(entry.path, 0, entry.stat().st_size)


def open_collection(source: str | Path, allow_outside=()) -> Collection:
    """Index a folder or tar archive (``.tar``, ``.tar.gz``, ``.tgz``, nested per-class tars);
    ``allow_outside``: roots a folder's links may lead into."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    files: dict[str, Locator] = {}
    dirs: set[str] = set()
    temp_dirs: list[str] = []
    ignored: list[dict] = []
    try:
        if source.is_dir():
            allowed = tuple(Path(r).resolve() for r in allow_outside)
            _walk_folder(source.resolve(), files, dirs, ignored, allowed)
            return Collection(
                str(source.resolve()), dict(sorted(files.items())), False, dirs, temp_dirs, ignored
            )
        with open(source, "rb") as f:
            magic = f.read(2)
        tar_path = str(source.resolve())
        if magic == GZIP_MAGIC:
            tar_path = _gunzip_to_temp(tar_path, temp_dirs)
        _read_tar(tar_path, 0, None, "", files, dirs, ignored)
    except BaseException:
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        raise
    return Collection(str(source.resolve()), dict(sorted(files.items())), True, dirs, temp_dirs, ignored)


def sub_collection(coll: Collection, subdir: str) -> Collection:
    """The part of ``coll`` under ``subdir`` (e.g. ``train`` of ``cifar10-jpg.tar.gz``), re-rooted there."""
    prefix = _normalize(subdir) + "/"
    files = {rel[len(prefix):]: loc for rel, loc in coll.files.items() if rel.startswith(prefix)}
    dirs = {d[len(prefix):] for d in coll.dirs if d.startswith(prefix)}
    ignored = [
        {**i, "source": i["source"][len(prefix):]} for i in coll.ignored if i["source"].startswith(prefix)
    ]
    return Collection(f"{coll.root}::{prefix[:-1]}", files, coll.is_archive, dirs, coll._temp_dirs, ignored)

