"""Input discovery: turn SOURCE (+ options) into a sorted list of labelled images and a class list.

Layouts (``--format``):

- ``imagefolder``: ``<root>/<class>/**/<file>`` (ImageNet train is this with synset folder names);
  the root may be a folder, a tar, a tar.gz, or a tar of per-class tars (``n01440764.tar`` ...).
- ``imagenet-val`` / ``csv``: files + a labels file (``--labels``, or found at the root of SOURCE:
  ``LOC_val_solution.csv``, ``labels.csv``, ``labels.tsv``, ``val.txt``). Labels files are CSV/TSV
  with or without a header (``path,label``; Kaggle's ``ImageId,PredictionString`` where the first
  token is the synset; ``file,synset,...`` as in imagenet-sample-images' ``labels.csv``) or
  ``<file> <label>`` lines (Caffe's ``val.txt``). Labels are class names or integer indices into
  the class list. SOURCE may also be the CSV itself, with paths relative to its folder.
- ``auto``: a CSV/TSV/TXT file -> ``csv``; class folders -> ``imagefolder``; flat files with a known
  labels file at the root -> ``imagenet-val``. ``tar`` is ``auto`` that insists on an archive.

Every check that can fail does so here, before any image is decoded. Used by
``pipeline.shards.build``; not run on its own.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.schema import ClassInfo
from pipeline.shards.archives import (
    Collection,
    Locator,
    is_tar_path,
    open_collection,
    sub_collection,
    within,
)
from pipeline.shards.classes import SourceError, make_classes

FORMATS = ("auto", "imagefolder", "imagenet-val", "csv", "tar")
ROOT_LABEL_FILES = ("LOC_val_solution.csv", "labels.csv", "labels.tsv", "val.txt")
PATH_HEADERS = {"path", "file", "filename", "file_name", "image", "imageid", "image_id", "filepath", "img"}
LABEL_HEADERS = ("label", "class", "synset", "predictionstring", "target", "category", "class_name")
MAX_KEY_LEN = 90  # ustar member names hold 100 bytes; leave room for ".json"
EXAMPLES = 5  # how many offending rows an error message quotes


@dataclass(frozen=True)
class Item:
    """One image to shard: ``source`` is its path inside SOURCE (stable, recorded in the manifest)."""

    key: str
    source: str
    locator: Locator
    label: int


@dataclass
class Discovery:
    format: str
    classes: tuple[ClassInfo, ...]
    items: list[Item]  # sorted by source path
    skipped: list[dict]  # files seen but not images of any class, with the reason
    collection: Collection | None

    def close(self) -> None:
        if self.collection is not None:
            self.collection.close()


def _examples(values: list[str]) -> str:
    more = f" and {len(values) - EXAMPLES} more" if len(values) > EXAMPLES else ""
    return ", ".join(values[:EXAMPLES]) + more


def make_keys(sources: list[str]) -> list[str]:
    """WebDataset keys: file stems when unique, else the sanitized relative path; never a ``.``.

    DALI's index and webdataset both split ``<key>.<ext>`` at the first dot of the basename.
    """
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", s)[:MAX_KEY_LEN]

    stems = [clean(Path(s).stem) for s in sources]
    base = stems if len(set(stems)) == len(stems) else [clean(s.rsplit(".", 1)[0]) for s in sources]
    keys, seen = [], set()
    for i, k in enumerate(base):
        if k in seen:
            k = f"{k[: MAX_KEY_LEN - 10]}_{i:09d}"
        seen.add(k)
        keys.append(k)
    return keys


def _finish(fmt, classes, labelled, skipped, collection, allow_empty) -> Discovery:
    """Check every class has images, assign keys, sort by source path."""
    labelled.sort(key=lambda t: t[0])
    counts = [0] * len(classes)
    for _, _, label in labelled:
        counts[label] += 1
    empty = [classes[i].name for i, c in enumerate(counts) if c == 0]
    if empty and not allow_empty:
        raise SourceError(
            f"{len(empty)} class(es) have no images: {_examples(empty)}; add images, fix --classes, "
            "or pass --allow-empty-classes"
        )
    if not labelled:
        raise SourceError("no images found in the source")
    keys = make_keys([s for s, _, _ in labelled])
    items = [Item(k, s, loc, lab) for k, (s, loc, lab) in zip(keys, labelled, strict=True)]
    skipped = [*skipped, *getattr(collection, "ignored", [])]  # archive members not read (links, '..')
    return Discovery(fmt, classes, items, sorted(skipped, key=lambda d: d["source"]), collection)


def _imagefolder(collection, classes_file, words_file, allow_empty) -> Discovery:
    by_class: dict[str, list[str]] = {d: [] for d in collection.dirs if "/" not in d}
    skipped = []
    for rel in collection.files:
        if "/" not in rel:
            skipped.append({"source": rel, "reason": "outside any class folder"})
            continue
        by_class.setdefault(rel.split("/", 1)[0], []).append(rel)
    if not by_class:
        raise SourceError(f"{collection.root} has no class folders (<root>/<class>/<image>)")
    classes = make_classes(sorted(by_class), classes_file, words_file)
    index = {c.name: c.index for c in classes}
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise SourceError(f"class folder(s) not in --classes: {_examples(unknown)}; add them or remove them")
    labelled = [(rel, collection.files[rel], index[name]) for name, rels in by_class.items() for rel in rels]
    return _finish("imagefolder", classes, labelled, skipped, collection, allow_empty)


def _parse_rows(text: str, where: str) -> list[tuple[int, str, str]]:
    """``[(line number, path, label), ...]`` from CSV, TSV or whitespace ``<file> <label>`` lines."""
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if "\t" in first or "," in first:
        reader = csv.reader(io.StringIO(text), delimiter="\t" if "\t" in first else ",")
        rows = [(i, [c.strip() for c in r]) for i, r in enumerate(reader, start=1)]
        rows = [(i, cells) for i, cells in rows if any(cells)]
    else:
        rows = [(i, ln.split()) for i, ln in enumerate(lines, start=1) if ln.strip()]
    if not rows:
        raise SourceError(f"labels file {where} is empty")
    path_col, label_col, first_token = 0, 1, False
    header = [c.lower() for c in rows[0][1]]
    if header and header[0] in PATH_HEADERS or any(h in PATH_HEADERS for h in header):
        path_col = next(i for i, h in enumerate(header) if h in PATH_HEADERS)
        label_col = next((header.index(h) for h in LABEL_HEADERS if h in header), 1 if path_col != 1 else 0)
        first_token = header[label_col] == "predictionstring"  # "n01751748 x0 y0 x1 y1 ..." (Kaggle LOC)
        rows = rows[1:]
    out = []
    for lineno, cells in rows:
        if len(cells) <= max(path_col, label_col) or not cells[label_col]:
            raise SourceError(f"{where}:{lineno}: expected a path and a label, got {cells!r}")
        label = cells[label_col].split()[0] if first_token else cells[label_col]
        out.append((lineno, cells[path_col], label))
    return out


def _read_labels_text(labels: str | None, collection: Collection | None, root_hint: str) -> tuple[str, str]:
    if labels is not None and Path(labels).is_file():
        return Path(labels).read_text(encoding="utf-8"), str(labels)
    if collection is not None:
        names = [labels] if labels is not None else list(ROOT_LABEL_FILES)
        for name in names:
            if name in collection.files:
                return collection.read(name).decode("utf-8"), f"{root_hint}::{name}"
    if labels is not None:
        raise SourceError(f"labels file {labels} not found on disk or inside {root_hint}")
    raise SourceError(
        f"{root_hint} is a flat set of files without a labels file; pass --labels FILE "
        f"(or put one of {', '.join(ROOT_LABEL_FILES)} at its root)"
    )


LABEL_KINDS = ("auto", "index", "name")
SKIP = object()  # what ``resolve`` returns for a row it refused (and listed as skipped itself)


def _is_index(label: str) -> bool:
    return re.fullmatch(r"\d+", label) is not None


def label_kind(rows, where: str, labels_are: str = "auto") -> str:
    """``"index"`` (every label a class index: a whole number from 0) or ``"name"``. ``auto`` decides
    only when every row agrees: one odd row (``-1``, a typo such as ``7a``) would otherwise turn a
    list of indices into class names sorted as text and shift every index."""
    if labels_are not in LABEL_KINDS:
        raise SourceError(f"unknown --labels-are {labels_are!r}; choose one of {', '.join(LABEL_KINDS)}")
    if labels_are == "name":
        return "name"
    if labels_are == "index" or _is_index(rows[0][2]):
        odd = next(((n, lab) for n, _, lab in rows if not _is_index(lab)), None)
        if odd is None:
            return "index"
        lineno, lab = odd
        first = rows[0]
        why = "--labels-are index" if labels_are == "index" else f"line {first[0]}: {first[2]!r} is one"
        raise SourceError(
            f"{where}: line {lineno}: {lab!r} is not a class index (a whole number from 0; {why}); fix the "
            "row, or pass --labels-are name to read every label as a class name"
        )
    odd = next(((n, lab) for n, _, lab in rows if _is_index(lab)), None)
    if odd is not None:
        raise SourceError(
            f"{where}: line {odd[0]}: {odd[1]!r} is a class index but line {rows[0][0]}'s {rows[0][2]!r} "
            "is a class name; pass --labels-are name (numbers are then names too) or --labels-are index"
        )
    return "name"


def _labelled(rows, where, resolve, classes_file, words_file, existing, labels_are="auto"):
    """``(labelled rows, classes)``. A split added to a folder maps its labels through the folder's
    class table (by name; indices too when that table was made of numbers), so every split of a
    folder numbers its classes alike."""
    kind = label_kind(rows, where, labels_are)
    labels = [lab for _, _, lab in rows]
    if existing and classes_file is None:
        classes = existing
    elif kind == "index" and classes_file is None:
        classes = make_classes([str(i) for i in range(max(int(x) for x in labels) + 1)], None, words_file)
    else:
        classes = make_classes(sorted(set(labels)), classes_file, words_file)
    index = {c.name: c.index for c in classes}
    numbered = existing and classes_file is None and all(_is_index(c.name) for c in classes)
    by_name = kind == "name" or numbered
    labelled, missing, bad_label, seen = [], [], [], {}
    for lineno, path, lab in rows:
        label = index.get(lab, -1) if by_name else int(lab)
        if not 0 <= label < len(classes):
            bad_label.append(f"line {lineno}: {lab!r}")
            continue
        found = resolve(path)
        if found is SKIP:
            continue
        if found is None:
            missing.append(f"line {lineno}: {path}")
            continue
        rel, loc = found
        if rel in seen:
            raise SourceError(f"{where}:{lineno}: {path} is listed twice (first on line {seen[rel]})")
        seen[rel] = lineno
        labelled.append((rel, loc, label))
    if bad_label:
        raise SourceError(
            f"{where}: {len(bad_label)} label(s) not in the class list ({len(classes)} classes): "
            f"{_examples(bad_label)}; fix the rows or pass the right --classes"
        )
    if missing:
        raise SourceError(f"{where}: {len(missing)} row(s) point to missing files: {_examples(missing)}")
    return labelled, classes


def _labelled_collection(
    fmt, collection, labels, classes_file, words_file, existing, allow_empty, labels_are="auto"
):
    text, where = _read_labels_text(labels, collection, collection.root)
    rows = _parse_rows(text, where)
    stems: dict[str, str | None] = {}
    for rel in collection.files:
        stem = rel.rsplit(".", 1)[0]
        stems[stem] = None if stem in stems else rel  # None marks an ambiguous stem

    def resolve(path: str):
        rel = "/".join(p for p in path.replace("\\", "/").split("/") if p not in ("", "."))
        if rel not in collection.files:
            rel = stems.get(rel)  # Kaggle's ImageId has no extension
        return (rel, collection.files[rel]) if rel else None

    labelled, classes = _labelled(rows, where, resolve, classes_file, words_file, existing, labels_are)
    listed = {rel for rel, _, _ in labelled}
    label_names = {labels, *ROOT_LABEL_FILES} if labels else set(ROOT_LABEL_FILES)
    skipped = [
        {"source": rel, "reason": "not listed in the labels file"}
        for rel in collection.files
        if rel not in listed and rel not in label_names
    ]
    return _finish(fmt, classes, labelled, skipped, collection, allow_empty)


def outside_reason(where: str, target: str) -> str:
    return (
        f"outside {where}: resolves to {target}; not read (pass --allow-outside ROOT to read files "
        "under ROOT)"
    )


def _csv_file(
    path: Path, classes_file, words_file, existing, allow_empty, labels_are, allow_outside
) -> Discovery:
    rows = _parse_rows(path.read_text(encoding="utf-8"), str(path))
    base = path.resolve().parent
    roots = (base, *(Path(r).resolve() for r in allow_outside))
    outside = []

    def resolve(p: str):
        # links and ".." resolved without opening anything: a row must not make us read a file
        # outside the list's folder (or a root the user allowed)
        full = Path(os.path.realpath(Path(p) if Path(p).is_absolute() else base / p))
        if not within(full, roots):
            outside.append({"source": p, "reason": outside_reason(f"{base} (the list's folder)", str(full))})
            return SKIP
        if not full.is_file():
            return None
        rel = full.relative_to(base).as_posix() if full.is_relative_to(base) else str(full)
        return rel, Locator(str(full), 0, full.stat().st_size)

    labelled, classes = _labelled(rows, str(path), resolve, classes_file, words_file, existing, labels_are)
    return _finish("csv", classes, labelled, outside, None, allow_empty)


def discover(
    source: str | Path,
    fmt: str = "auto",
    *,
    labels: str | None = None,
    classes_file: str | Path | None = None,
    words_file: str | Path | None = None,
    existing_classes: tuple[ClassInfo, ...] = (),
    allow_empty_classes: bool = False,
    subdir: str | None = None,
    labels_are: str = "auto",
    allow_outside: tuple[str, ...] | list[str] = (),
) -> Discovery:
    """Find every image of SOURCE with its label; raise :class:`SourceError` on anything wrong.

    ``labels_are``: how a list's labels read (``auto``: decided only when every row agrees);
    ``allow_outside``: roots besides SOURCE's own folder whose files list rows and links may name."""
    if fmt not in FORMATS:
        raise SourceError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    source = Path(source)
    if not source.exists():
        raise SourceError(f"source {source} does not exist")
    if source.is_file() and not is_tar_path(source) and source.suffix.lower() in (".csv", ".tsv", ".txt"):
        if fmt not in ("auto", "csv", "imagenet-val"):
            raise SourceError(f"{source} is a list file; use --format csv (or auto)")
        return _csv_file(
            source, classes_file, words_file, existing_classes, allow_empty_classes, labels_are, allow_outside
        )
    if fmt == "tar" and not (source.is_file() and is_tar_path(source)):
        raise SourceError(f"--format tar needs a .tar/.tar.gz/.tgz archive, got {source}")
    try:
        collection = open_collection(source, allow_outside)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc
    try:
        if subdir:
            collection = sub_collection(collection, subdir)
            if not collection.files:
                raise SourceError(f"{source} has no files under --subdir {subdir}")
        if not collection.files:
            raise SourceError(f"{source} contains no files")
        flat = all("/" not in rel for rel in collection.files) and not collection.dirs
        if fmt in ("imagenet-val", "csv") or labels is not None or (fmt in ("auto", "tar") and flat):
            name = "imagenet-val" if fmt in ("auto", "tar") else fmt
            return _labelled_collection(name, collection, labels, classes_file, words_file,
                                        existing_classes, allow_empty_classes, labels_are)
        return _imagefolder(collection, classes_file, words_file, allow_empty_classes)
    except BaseException:
        collection.close()
        raise
