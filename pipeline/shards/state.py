"""The resume record of one split's build: ``OUT/.build-<split>.jsonl``.

Line 1 holds the *plan* fingerprint (sha256 of the options, the class list and the shuffled list of
input files with their sizes and keys); every later line records one finished shard: its file
names, sha256 of tar and index, sample count, the ordered keys it holds, the range
``[start, end)`` of the shuffled input list it consumed and the files skipped in that range.
Lines are appended after each shard is renamed into place, so an interrupted build leaves a valid
prefix (a torn last line is ignored).

On a rerun with the same plan, a recorded shard whose files still hash to the recorded sha256 is
kept; any other recorded shard is rebuilt from its input range (the output of a range is
deterministic), and the build continues after the last recorded range. Used by
``pipeline.shards.build``; not run on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_VERSION = 1


def state_path(out: Path, split: str) -> Path:
    return out / f".build-{split}.jsonl"


@dataclass(frozen=True)
class ShardRecord:
    shard: int
    tar: str
    index: str
    sha256: str
    index_sha256: str
    bytes: int
    count: int
    start: int
    end: int
    keys: list[str]
    skipped: list[dict]
    actions: dict[str, int]


def load_records(path: Path, plan: str) -> dict[int, ShardRecord] | None:
    """Recorded shards of ``plan`` (later lines win), or ``None`` when absent or of another plan."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        return None
    if head.get("plan") != plan or head.get("version") != STATE_VERSION:
        return None
    records: dict[int, ShardRecord] = {}
    for line in lines[1:]:
        try:
            rec = ShardRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            break  # torn last line of an interrupted append
        records[rec.shard] = rec
    return records


def start_state(path: Path, plan: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": STATE_VERSION, "plan": plan}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def append_record(path: Path, record: ShardRecord) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())


def compact_state(path: Path, plan: str, records: list[ShardRecord]) -> None:
    """Rewrite the record with one line per shard in order (same bytes for the same build)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"version": STATE_VERSION, "plan": plan}) + "\n")
        for rec in records:
            f.write(json.dumps(asdict(rec), separators=(",", ":")) + "\n")
    os.replace(tmp, path)
