"""The output folder: what may be in it, and which class list a new split must agree with.

A shard folder holds only ``manifest.json``, ``<split>-NNNNNN.tar`` / ``.idx`` and the resume
records ``.build-<split>.jsonl`` (plus their ``.tmp`` files while being written). Anything else is
*foreign*: ``build-shards`` refuses to write there rather than mix its output with other files.
Used by ``pipeline.shards.build`` and ``pipeline.shards.verify``; not run on its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.schema import MANIFEST_NAME, ClassInfo, Manifest, ShardFormatError, load_manifest
from pipeline.shards.classes import SourceError

SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")
OWN_FILE_RE = re.compile(
    r"(?:manifest\.json|(?P<split>[A-Za-z0-9_]+)-\d{6}\.(?:tar|idx)|\.build-(?P<state>[A-Za-z0-9_]+)\.jsonl)"
    r"(?:\.tmp)?"
)


def check_split_name(split: str) -> None:
    if not SPLIT_RE.fullmatch(split):
        raise SourceError(f"--split {split!r}: use letters, digits and '_' only (e.g. train, val)")


def foreign_files(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if not OWN_FILE_RE.fullmatch(p.name))


def split_files_on_disk(out: Path, split: str) -> list[Path]:
    """Tar/idx files (and leftover ``.tmp``) of ``split`` in ``out``."""
    files = []
    for p in out.iterdir():
        m = OWN_FILE_RE.fullmatch(p.name)
        if m and m.group("split") == split:
            files.append(p)
    return sorted(files)


def prepare_out(out: Path) -> Manifest | None:
    """Check ``out`` holds nothing foreign; return its manifest if there is one."""
    if out.exists() and not out.is_dir():
        raise SourceError(f"output {out} exists and is not a folder")
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SourceError(
            f"output folder {out} holds files build-shards did not write ({shown}); "
            "choose an empty or new folder"
        )
    if (out / MANIFEST_NAME).is_file():
        try:
            return load_manifest(out)
        except ShardFormatError as exc:
            raise SourceError(f"{exc}; remove it or choose another output folder") from exc
    return None


def check_classes(new: tuple[ClassInfo, ...], existing: Manifest | None, split: str) -> tuple[ClassInfo, ...]:
    """``new`` must name the same classes in the same order as the other splits of the folder.

    Descriptions missing from ``new`` are taken from the existing manifest.
    """
    others = [s for s in (existing.splits if existing else {}) if s != split]
    if not others:
        return new
    old = existing.classes
    if [c.name for c in new] != [c.name for c in old]:
        pairs = enumerate(zip(new, old, strict=False))
        diff = next((i for i, (a, b) in pairs if a.name != b.name), min(len(new), len(old)))
        first = (
            f"first difference at index {diff}: {new[diff].name if diff < len(new) else '(none)'} here, "
            f"{old[diff].name if diff < len(old) else '(none)'} in the manifest"
        )
        raise SourceError(
            f"the class list ({len(new)} classes) disagrees with the manifest's ({len(old)} classes, "
            f"splits {', '.join(sorted(others))}); {first}. Pass the same --classes FILE for every split"
        )
    return tuple(
        ClassInfo(c.index, c.name, c.description or o.description) for c, o in zip(new, old, strict=True)
    )
