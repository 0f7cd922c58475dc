"""Class lists: ``--classes FILE`` (fixed order), ``--words FILE`` (synset -> human name).

Both files use the ImageNet ``synset_words.txt`` line format, one class per line::

    n01440764 tench, Tinca tinca
    n01443537 goldfish, Carassius auratus

The first whitespace-separated token is the class name (synset or folder name); the rest, if
any, is its human-readable description. Blank lines and lines starting with ``#`` are ignored.
Used by ``pipeline.shards.sources``; not run on its own.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.schema import ClassInfo


class SourceError(ValueError):
    """The input cannot be turned into shards; raised before any image is processed."""


def read_class_lines(path: str | Path, what: str) -> list[tuple[str, str]]:
    """``[(name, description), ...]`` in file order; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{what} file {path} does not exist")
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        name = parts[0]
        if name in seen:
            raise SourceError(f"{path}:{lineno}: class {name!r} repeats line {seen[name]}; each class once")
        seen[name] = lineno
        rows.append((name, parts[1].strip() if len(parts) > 1 else ""))
    if not rows:
        raise SourceError(f"{what} file {path} lists no classes")
    return rows


def make_classes(
    names: list[str], classes_file: str | Path | None, words_file: str | Path | None
) -> tuple[ClassInfo, ...]:
    """The class list: ``classes_file`` order if given, else ``names`` (already sorted) in order.

    Descriptions come from ``words_file`` (synset -> words), else from the classes file itself.
    """
    if classes_file is not None:
        rows = read_class_lines(classes_file, "--classes")
    else:
        rows = [(n, "") for n in names]
    words = dict(read_class_lines(words_file, "--words")) if words_file is not None else {}
    return tuple(
        ClassInfo(index=i, name=name, description=words.get(name, desc))
        for i, (name, desc) in enumerate(rows)
    )
