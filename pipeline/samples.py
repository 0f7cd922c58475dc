"""A split's samples and how they are read: the sample table, the memory-mapped reader and the
quarantine of samples that failed to decode.

Library module, no CLI. ``pipeline.order`` builds the order on top of these; both loader backends
read JPEG bytes and labels through ``SampleReader``.

- ``SampleTable``: the usable samples of a split in manifest order, from the DALI index files
  (tar, key, byte offsets of the JPEG and of the label); samples cut off by a short tar are marked.
  Samples that ``build-shards`` skipped were never written, so they never enter the table.
- ``SampleReader``: JPEG bytes and labels by sample index, from memory-mapped tars.
- ``Quarantine``: samples that failed to decode at read time, with where and why. Records name the
  shard and the key, so they survive a resume (checkpoints hold them) and travel between ranks.
"""

from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.schema import (
    IMAGE_EXT,
    LABEL_EXT,
    ShardFormatError,
    load_manifest,
    read_index,
    split_files,
    truncated_samples,
)


class CorruptSampleError(RuntimeError):
    """A sample could not be decoded at read time; the message names the shard and the key."""


def corrupt_sample_error(key: str, tar: str, reason: object) -> CorruptSampleError:
    return CorruptSampleError(
        f"corrupt sample {key!r} in shard {tar}: {reason}. Rebuild the shards (`verify-shards --deep` "
        "lists bad samples) or set data.skip_corrupt=true to quarantine such samples"
    )


# --- the table --------------------------------------------------------------------------------------
@dataclass
class SampleTable:
    """The samples of one split in manifest order; sample ``i`` is identified by its index ``i``."""

    split: str
    tars: tuple[str, ...]
    class_names: tuple[str, ...]
    keys: list[str]
    tar_of: np.ndarray  # int32 [N]: index into tars
    jpg: np.ndarray  # int64 [N, 2]: (data offset, size) of the JPEG
    lbl: np.ndarray  # int64 [N, 2]: (data offset, size) of the 4-byte label
    truncated: dict[int, str] = field(default_factory=dict)  # sample -> reason (tar shorter than index)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, shards: str, split: str) -> SampleTable:
        if not shards:
            raise ShardFormatError("data.shards is empty: set it to a folder made by `build-shards`")
        manifest = load_manifest(shards)
        info = manifest.split(split)
        tars, idxs = split_files(shards, split)
        keys, tar_of, jpg, lbl, truncated = [], [], [], [], {}
        for t, (tar, idx, sh) in enumerate(zip(tars, idxs, info.shards, strict=True)):
            try:
                _, entries = read_index(idx)
            except ValueError as exc:
                raise ShardFormatError(f"{idx}: {exc}") from None
            if len(entries) != sh.count:
                raise ShardFormatError(
                    f"{idx} lists {len(entries)} samples, the manifest {sh.count}: "
                    "rebuild or re-index the shards"
                )
            cut = dict(truncated_samples(tar, idx, entries))
            for sample in entries:
                key = sample[0][3].partition(".")[0]
                comps = {ext: (offset, size) for ext, offset, size, _ in sample}
                if IMAGE_EXT not in comps or LABEL_EXT not in comps:
                    raise ShardFormatError(f"{idx}: sample {key!r} lacks .{IMAGE_EXT} or .{LABEL_EXT}")
                if key in cut:
                    truncated[len(keys)] = cut[key]
                keys.append(key)
                tar_of.append(t)
                jpg.append(comps[IMAGE_EXT])
                lbl.append(comps[LABEL_EXT])
        return cls(
            split=split,
            tars=tuple(tars),
            class_names=tuple(manifest.class_names),
            keys=keys,
            tar_of=np.asarray(tar_of, dtype=np.int32),
            jpg=np.asarray(jpg, dtype=np.int64).reshape(-1, 2),
            lbl=np.asarray(lbl, dtype=np.int64).reshape(-1, 2),
            truncated=truncated,
        )

    def name(self, i: int) -> tuple[str, str]:
        """``(shard file name, key)`` of sample ``i``: how quarantine records name it."""
        return Path(self.tars[int(self.tar_of[i])]).name, self.keys[i]

    def find(self, shard: str, key: str) -> int | None:
        if not hasattr(self, "_by_name"):
            self._by_name = {self.name(i): i for i in range(len(self))}
        return self._by_name.get((shard, key))


class SampleReader:
    """JPEG bytes and labels by sample index, from memory-mapped tars (no copy until asked)."""

    def __init__(self, table: SampleTable) -> None:
        self.table = table
        self._maps: dict[int, mmap.mmap] = {}

    def _map(self, t: int) -> mmap.mmap:
        m = self._maps.get(t)
        if m is None:
            with open(self.table.tars[t], "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[t] = m
        return m

    def jpeg(self, i: int) -> memoryview:
        off, size = self.table.jpg[i]
        return memoryview(self._map(int(self.table.tar_of[i])))[off : off + size]

    def label(self, i: int) -> int:
        off, size = self.table.lbl[i]
        raw = self._map(int(self.table.tar_of[i]))[off : off + size]
        if size != 4:
            raise ValueError(f"label of {size} bytes, expected 4")
        return struct.unpack("<i", raw)[0]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __getstate__(self):  # DataLoader workers map the tars themselves
        return {"table": self.table, "_maps": {}}


# --- quarantine -------------------------------------------------------------------------------------
class Quarantine:
    """Samples excluded after failing to decode: sample index -> ``{"shard", "key", "reason"}``."""

    def __init__(self, table: SampleTable) -> None:
        self.table = table
        self.records: dict[int, dict[str, str]] = {}

    def __contains__(self, i: int) -> bool:
        return int(i) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def ids(self, before_epoch: int | None = None) -> np.ndarray:
        """Quarantined samples (those found before ``before_epoch`` when given)."""
        ids = sorted(i for i, r in self.records.items() if before_epoch is None or r["epoch"] < before_epoch)
        return np.asarray(ids, dtype=np.int64)

    def add(self, i: int, reason: str, epoch: int = -1) -> bool:
        """Record sample ``i``, found in ``epoch`` (-1: before training); True when it is new."""
        if int(i) in self.records:
            return False
        shard, key = self.table.name(int(i))
        self.records[int(i)] = {"shard": shard, "key": key, "reason": str(reason)[:300], "epoch": int(epoch)}
        return True

    def to_list(self) -> list[dict[str, str]]:
        return [self.records[i] for i in sorted(self.records)]

    def merge(self, records: list[dict[str, str]]) -> int:
        """Add records made elsewhere (another rank, a checkpoint); returns how many were new. Records
        of samples this split does not hold (another split's) are ignored."""
        new = 0
        for rec in records:
            i = self.table.find(rec["shard"], rec["key"])
            if i is not None and i not in self.records:
                self.records[i] = {**rec, "epoch": int(rec.get("epoch", -1))}
                new += 1
        return new


def prepare_table(table: SampleTable, quarantine: Quarantine, skip_corrupt: bool) -> None:
    """Samples cut off by a short tar: an error naming the first, or quarantined with ``skip_corrupt``."""
    for i, reason in table.truncated.items():
        shard, key = table.name(i)
        if not skip_corrupt:
            raise corrupt_sample_error(key, table.tars[int(table.tar_of[i])], reason) from None
        if quarantine.add(i, reason):
            warnings.warn(f"quarantined sample {key!r} of shard {shard} ({reason})", stacklevel=3)
