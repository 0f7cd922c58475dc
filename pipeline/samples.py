"""A split's samples and how they are read: the sample table, the reader and the
quarantine of samples that failed to decode.

Library module, no CLI. ``pipeline.order`` builds the order on top of these; both loader backends
read JPEG bytes and labels through ``SampleReader``.

- ``SampleTable``: the usable samples of a split in manifest order, from the DALI index files
  (tar, key, byte offsets of the JPEG and of the label); samples cut off by a short tar are marked.
  Samples that ``build-shards`` skipped were never written, so they never enter the table.
- ``SampleReader``: JPEG bytes and labels by sample index, read from the tars (a bounded set open).
- ``Quarantine``: samples that failed to decode at read time, with where and why. Records name the
  shard and the key, so they survive a resume (checkpoints hold them) and travel between ranks.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.schema import (
    IMAGE_EXT,
    LABEL_EXT,
    ShardFormatError,
    load_manifest,
    parse_index,
    read_index,
    remote_listing,
    split_files,
    truncated_samples,
)

MAX_OPEN_TARS = 32  # files a reader keeps open (data.open_shards); the least recently used closes first
SPAN_SLACK = 1 << 16  # a sample's JPEG and label are read at once when they lie this close together


class CorruptSampleError(RuntimeError):
    """A sample could not be decoded at read time; the message names the shard and the key."""


class ShardTruncatedError(ValueError):
    """A read past the end of a tar: the file is shorter than its index says (cut, or shrinking)."""


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
    sha256: tuple[str, ...] = ()  # per tar, from the manifest
    sizes: tuple[int, ...] = ()  # per tar, bytes, from the manifest
    location: str = ""  # the shard folder or object-store prefix the table was loaded from
    etags: tuple[str, ...] = ()  # per tar, the object's ETag (object storage only)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.location)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, shards: str, split: str, cache_dir: str = "") -> SampleTable:
        """The table of a split; on object storage the index files are kept in ``cache_dir`` (the
        node's shard cache: ``data.cache_dir``)."""
        if not shards:
            raise ShardFormatError("data.shards is empty: set it to a folder made by `build-shards`")
        manifest = load_manifest(shards)
        info = manifest.split(split)
        tars, idxs = split_files(shards, split)
        remote = storage.is_remote(shards)
        listing = remote_listing(shards) if remote else {}
        index_texts = (
            _remote_indexes(shards, [sh.index for sh in info.shards], listing, cache_dir) if remote else None
        )
        keys, tar_of, jpg, lbl, truncated = [], [], [], [], {}
        for t, (tar, idx, sh) in enumerate(zip(tars, idxs, info.shards, strict=True)):
            try:
                _, entries = parse_index(index_texts[t]) if remote else read_index(idx)
            except ValueError as exc:
                raise ShardFormatError(f"{idx}: {exc}") from None
            if len(entries) != sh.count:
                raise ShardFormatError(
                    f"{idx} lists {len(entries)} samples, the manifest {sh.count}: "
                    "rebuild or re-index the shards"
                )
            size = listing[sh.tar][0] if remote else os.stat(tar).st_size
            if remote and size != sh.bytes:  # an object is replaced whole, never cut
                raise ShardFormatError(
                    f"{tar} is {size} bytes but the manifest says {sh.bytes}: the object was replaced "
                    f"after build-shards; upload the shard set again (`verify-shards {shards}` names every "
                    "such object)"
                )
            if sh.bytes and size > sh.bytes:  # shorter: the cut samples are named below
                raise ShardFormatError(
                    f"{Path(tar).name} is {size} bytes but the manifest says {sh.bytes}: this is not the "
                    f"shard the manifest describes (another file, or another build's); copy the shard "
                    f"folder again or rebuild it (`verify-shards {shards}` names every such file)"
                )
            cut = dict(truncated_samples(tar, idx, entries, size=size))
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
            sha256=tuple(sh.sha256 for sh in info.shards),
            sizes=tuple(sh.bytes for sh in info.shards),
            location=str(shards),
            etags=tuple(listing[sh.tar][1] for sh in info.shards) if remote else (),
        )

    def name(self, i: int) -> tuple[str, str]:
        """``(shard file name, key)`` of sample ``i``: how quarantine records name it."""
        return Path(self.tars[int(self.tar_of[i])]).name, self.keys[i]

    def find(self, shard: str, key: str) -> int | None:
        if not hasattr(self, "_by_name"):
            self._by_name = {self.name(i): i for i in range(len(self))}
        return self._by_name.get((shard, key))


def _remote_indexes(
    url: str, names: list[str], listing: dict[str, tuple[int, str]], cache_dir: str
) -> list[str]:
    """The index files of a prefix, read once per node: kept beside the node's shard cache, keyed by
    their ETag (a replaced index is read again); fetched concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.shard_cache import default_cache_dir, index_cache_path

    client = storage.client_for(url)

    def one(name: str) -> str:
        path = index_cache_path(cache_dir or default_cache_dir(), url, name, listing[name][1])
        try:
            return path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            pass
        try:
            data = client.get(name)
        except storage.ObjectStoreError as exc:
            raise ShardFormatError(str(exc)) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return data.decode("utf-8")

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, names))


class SampleReader:
    """JPEG bytes and labels by sample index, read with ``pread`` from the split's tars.

    At most ``max_open`` tars are open at once (the least recently used is closed first): ImageNet at
    100 samples per shard is 12,800 tars, more than a process may hold open. ``pread`` copies a
    sample's bytes (a memory map handed out views instead): a tar that shrinks under a running loader
    then gives a short read, reported as the sample's ``truncated`` error, where a mapped page past
    the new end would kill the process with SIGBUS. One read per sample: its JPEG and its label lie
    next to each other in the tar. Safe to use from several threads; ``close()`` closes every file
    (as does garbage collection)."""

    def __init__(self, table: SampleTable, max_open: int = MAX_OPEN_TARS, remote=None) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        if table.remote and remote is None:
            raise ValueError(f"{table.location}: a reader of object storage needs its RemoteShards")
        self.table, self.max_open = table, max_open
        self.remote = remote  # pipeline.shard_cache.RemoteShards for s3:// shards
        self._fds: OrderedDict[int, int] = OrderedDict()  # tar index -> descriptor, oldest use first
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)

    def _read(self, t: int, offset: int, size: int) -> bytes:
        if self.remote is not None:
            data = self.remote.read(t, offset, size)
            if len(data) != size:
                raise ShardTruncatedError(
                    f"truncated: its data ends at byte {offset + size} but {self.table.tars[t]} ends at "
                    f"byte {offset + len(data)} (the object changed while it was read)"
                )
            return data
        with self._lock:  # a descriptor is never closed (and its number reused) while it is read
            fd = self._fds.pop(t, None)
            if fd is None:
                fd = os.open(self.table.tars[t], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                while len(self._fds) >= self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[t] = fd
            data = os.pread(fd, size, offset)
        if len(data) != size:
            end = offset + len(data)
            raise ShardTruncatedError(
                f"truncated: its data ends at byte {offset + size} but {Path(self.table.tars[t]).name} "
                f"ends at byte {end} (the file shrank while it was read)"
            )
        return data

    def _span(self, i: int) -> tuple[int, int, int, int, int, int] | None:
        """``(start, end, jpeg offset, jpeg size, label offset, label size)`` of the one read that gives
        sample ``i``; None when its JPEG and label lie far apart (another writer's layout: two reads)."""
        jo, js = (int(v) for v in self.table.jpg[i])
        lo, ls = (int(v) for v in self.table.lbl[i])
        start, end = min(jo, lo), max(jo + js, lo + ls)
        return None if end - start > js + SPAN_SLACK else (start, end, jo, js, lo, ls)

    def prefetch(self, ids) -> None:
        """Samples about to be read (a batch): on object storage, those no cached shard holds are
        fetched now, by coalesced range requests. Nothing to do for a folder."""
        if self.remote is not None:
            spans = [(int(self.table.tar_of[i]), s[0], s[1] - s[0]) for i in ids if (s := self._span(int(i)))]
            self.remote.fetch_batch(spans)

    def sample(self, i: int) -> tuple[memoryview, int]:
        """``(JPEG bytes, label)`` of sample ``i``: the JPEG a view of the bytes read (no second copy)."""
        span = self._span(i)
        if span is None:
            return memoryview(self.jpeg(i)), self.label(i)
        start, end, jo, js, lo, ls = span
        if ls != 4:
            raise ValueError(f"label of {ls} bytes, expected 4")
        data = self._read(int(self.table.tar_of[i]), start, end - start)
        return memoryview(data)[jo - start : jo - start + js], struct.unpack_from("<i", data, lo - start)[0]

    def jpeg(self, i: int) -> bytes:
        off, size = self.table.jpg[i]
        return self._read(int(self.table.tar_of[i]), int(off), int(size))

    def label(self, i: int) -> int:
        off, size = self.table.lbl[i]
        if size != 4:
            raise ValueError(f"label of {size} bytes, expected 4")
        return struct.unpack("<i", self._read(int(self.table.tar_of[i]), int(off), 4))[0]

    def open_files(self) -> int:
        return len(self._fds) + (len(self.remote._fds) if self.remote is not None else 0)

    def close(self) -> None:
        with self._lock:
            _close_fds(self._fds)
        if self.remote is not None:
            self.remote.close()

    def __getstate__(self):  # a spawned DataLoader worker opens the tars itself
        return {"table": self.table, "max_open": self.max_open, "remote": self.remote}

    def __setstate__(self, state) -> None:
        self.__init__(state["table"], state["max_open"], state.get("remote"))


def _close_fds(fds: OrderedDict) -> None:
    while fds:
        try:
            os.close(fds.popitem()[1])
        except OSError:
            pass


# --- quarantine -------------------------------------------------------------------------------------
class Quarantine:
    """Samples excluded after failing to decode: sample index -> ``{"shard", "key", "reason", "epoch"}``
    (``epoch``: where it was found; -1 before training, from a tar cut short on this node).

    The DALI feeder thread adds records while the training thread reads, shares and merges them: every
    access holds a lock (``records`` is the live dict; iterate ``to_list()``)."""

    def __init__(self, table: SampleTable) -> None:
        self.table = table
        self.records: dict[int, dict[str, str]] = {}
        self._lock = threading.RLock()

    def __contains__(self, i: int) -> bool:
        return int(i) in self.records  # one dict lookup: atomic

    def __len__(self) -> int:
        return len(self.records)

    def ids(self, before_epoch: int | None = None) -> np.ndarray:
        """Quarantined samples; with ``before_epoch``, those found in an epoch before it (samples found
        before training, ``epoch`` -1, are not among them: see ``SampleOrder.epoch_ids``)."""
        with self._lock:
            ids = sorted(
                i for i, r in self.records.items() if before_epoch is None or 0 <= r["epoch"] < before_epoch
            )
        return np.asarray(ids, dtype=np.int64)

    def add(self, i: int, reason: str, epoch: int = -1) -> bool:
        """Record sample ``i``, found in ``epoch`` (-1: before training); True when it is new."""
        shard, key = self.table.name(int(i))
        with self._lock:
            if int(i) in self.records:
                return False
            self.records[int(i)] = {
                "shard": shard,
                "key": key,
                "reason": str(reason)[:300],
                "epoch": int(epoch),
            }
            return True

    def to_list(self) -> list[dict[str, str]]:
        with self._lock:
            return [dict(self.records[i]) for i in sorted(self.records)]

    def merge(self, records: list[dict[str, str]]) -> int:
        """Add records made elsewhere (another rank, a checkpoint); returns how many were new. Records
        of samples this split does not hold (another split's) are ignored."""
        new = 0
        with self._lock:
            for rec in records:
                i = self.table.find(rec["shard"], rec["key"])
                if i is not None and i not in self.records:
                    self.records[i] = {**rec, "epoch": int(rec.get("epoch", -1))}
                    new += 1
        return new

    def __getstate__(self):  # locks do not travel to spawned DataLoader workers
        return {"table": self.table, "records": self.to_list()}

    def __setstate__(self, state) -> None:
        self.__init__(state["table"])
        self.merge(state["records"])


def prepare_table(table: SampleTable, quarantine: Quarantine, skip_corrupt: bool) -> None:
    """Samples cut off by a short tar: an error naming the first, or quarantined with ``skip_corrupt``."""
    for i, reason in table.truncated.items():
        shard, key = table.name(i)
        if not skip_corrupt:
            raise corrupt_sample_error(key, table.tars[int(table.tar_of[i])], reason) from None
        if quarantine.add(i, reason):
            warnings.warn(f"quarantined sample {key!r} of shard {shard} ({reason})", stacklevel=3)
