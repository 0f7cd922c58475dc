"""Shards on object storage: a node-local cache of whole shards, filled ahead of need from the order
and evicted by furthest next use; range reads for what is not cached yet.

Library module, no CLI. ``pipeline.samples.SampleReader`` reads through :class:`RemoteShards` when
``data.shards`` is an ``s3://`` prefix; ``pipeline.order.OrderedLoader`` gives it the schedule.

- :class:`NodeCache`: whole shards in ``data.cache_dir`` under ``data.cache_bytes``, shared by every
  process of a node. One download per node: a per-shard file lock; the space is reserved (a sparse
  file of the shard's size) under a cache-wide lock, then the bytes are streamed in, their size and
  sha256 checked against the manifest, and the file renamed into place (atomic). A sidecar records
  the object's ETag and the file's identity; a cached file that is shorter, changed, or from an
  object since replaced is dropped and fetched again.
- Eviction by furthest next use (Belady): the order knows, for every shard, the next position at
  which the node needs it, through this epoch and the next. The shard needed last is evicted; a
  shard is not admitted (its samples are range-read instead) when every cached one is needed before
  it, or when it would serve fewer than ``ADMIT_FRACTION`` of its samples before the evicted one
  is needed again. ``policy="lru"`` (least recently used, what other loaders' caches do) is kept
  for the benchmark that compares the two.
- :class:`RemoteShards`: a rank's reads. Cached shards are read with ``pread``; the samples of a
  batch whose shards are not cached are fetched by range requests, adjacent samples of one shard
  coalesced into one request, the shards' requests concurrent. A background thread downloads the
  shards the next ``data.cache_ahead`` samples need, in the order they are needed.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from glob import escape as glob_escape
from pathlib import Path

import numpy as np

from pipeline.checksums import ShardChecksumError, file_sha256
from pipeline.storage import ObjectStoreError, S3Client, client_for

NEVER = np.iinfo(np.int64).max
FETCHERS = 4  # whole-shard downloads at once per process
# A shard evicts another only if the order reads at least this fraction of its samples before the
# evicted one is needed again: a whole download then costs no more bytes than the range reads it
# saves. Otherwise its samples are range-read (with a budget below the split and a random order,
# a fixed part of the split stays cached and the rest is range-read: ~1x the uncached bytes per
# epoch, where evicting on every miss refetches whole shards many times over).
ADMIT_FRACTION = 0.5
COALESCE_GAP = 1 << 16  # samples this close together in a shard are fetched by one range request


CACHE_DIR_ENV = "INCEPTION_CACHE_DIR"


def default_cache_dir() -> str:
    """Node-local: ``$INCEPTION_CACHE_DIR`` (set per node), else a folder of this user's under the
    temp dir."""
    fallback = os.path.join(tempfile.gettempdir(), f"inception-shard-cache-{os.getuid()}")
    return os.environ.get(CACHE_DIR_ENV) or fallback


def default_budget(cache_dir: str) -> int:
    """80% of the free space of the cache folder's file system."""
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    st = os.statvfs(cache_dir)
    return int(st.f_bavail * st.f_frsize * 0.8)


def index_cache_path(cache_dir: str, location: str, name: str, etag: str) -> Path:
    """Where a node keeps an index file of a prefix (small; outside the shards' byte budget)."""
    key = hashlib.sha256(f"{location}\0{name}\0{etag}".encode()).hexdigest()[:24]
    return Path(cache_dir) / "indexes" / f"{name}.{key}"


def coalesce(spans: list[tuple[int, int]], gap: int = COALESCE_GAP) -> list[tuple[int, int, list[int]]]:
    """Spans ``(offset, size)`` of one object -> requests ``(start, end, [span index, ...])`` where
    spans closer than ``gap`` bytes share a request."""
    order = sorted(range(len(spans)), key=lambda k: spans[k][0])
    out: list[tuple[int, int, list[int]]] = []
    for k in order:
        off, size = spans[k]
        if out and off <= out[-1][1] + gap:
            start, end, members = out[-1]
            out[-1] = (start, max(end, off + size), [*members, k])
        else:
            out.append((off, off + size, [k]))
    return out


class NodeCache:
    """Whole shards of one shard location in a node-local folder under a byte budget."""

    def __init__(self, root: str | Path, location: str, budget: int, policy: str = "fnu") -> None:
        if policy not in ("fnu", "lru"):
            raise ValueError(f"cache policy must be 'fnu' or 'lru', got {policy!r}")
        self.base = Path(root)
        # one folder per location: two shard sets in one cache never mix their files
        self.root = self.base / hashlib.sha256(location.encode()).hexdigest()[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        self.location, self.budget, self.policy = location, int(budget), policy
        self.fetched_bytes = 0  # whole shards this process downloaded
        self.fetches = 0
        self.evictions = 0
        self._last_use: dict[str, float] = {}
        self._verified: set[str] = set()  # files this process has checked against their sidecar

    def path(self, name: str) -> Path:
        return self.root / name

    # --- what is cached ---------------------------------------------------------------------------
    def cached(self, name: str, size: int, sha256: str, etag: str) -> str | None:
        """The cached file of a shard if it is whole and current; a stale or damaged one is removed."""
        path = self.path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if str(path) in self._verified and st.st_size == size:
            self._last_use[name] = time.monotonic()
            return str(path)
        if not self._current(name, size, sha256, etag):
            with self._lock(".cache.lock"):  # a download may be putting its sidecar beside it just now
                if not self._current(name, size, sha256, etag):
                    self._remove(name)
                    return None
        self._verified.add(str(path))
        self._last_use[name] = time.monotonic()
        return str(path)

    def _current(self, name: str, size: int, sha256: str, etag: str) -> bool:
        """The cached file is the shard: its size, its sidecar's sha256 and ETag, and (when the file
        was touched since it was checked) its sha256 again."""
        try:
            st = os.stat(self.path(name))
        except FileNotFoundError:
            return False
        meta = self._read_meta(name)
        ident = [st.st_size, st.st_ino, st.st_mtime_ns]
        ok = (
            st.st_size == size
            and meta is not None
            and meta.get("sha256") == sha256
            and (not etag or not meta.get("etag") or meta.get("etag") == etag)
        )
        if ok and meta.get("ident") != ident:  # touched since it was checked: hash it again
            ok = file_sha256(str(self.path(name))) == sha256
            if ok:
                self._write_meta(name, {**meta, "ident": ident})
        return ok

    def used(self) -> int:
        """Bytes the cache folder holds, reservations of downloads in progress included."""
        total = 0
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.endswith((".meta", ".lock")) or entry.name.startswith("."):
                    continue
                if entry.name.endswith(".part"):  # NAME.SIZE.PID.TID.part: a reservation of SIZE bytes
                    total += int(entry.name.rsplit(".", 4)[1])
                    continue
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        return total

    def entries(self) -> list[str]:
        return sorted(
            e.name for e in os.scandir(self.root) if e.name.endswith(".tar") and not e.name.startswith(".")
        )

    # --- filling ------------------------------------------------------------------------------------
    def fill(
        self, client: S3Client, name: str, size: int, sha256: str, etag: str, next_use=None, worth=None
    ) -> str | None:
        """Download a shard into the cache (once per node: other processes wait for it and find it
        cached). ``next_use(name)``: the position at which the node next needs a shard (FNU policy);
        ``worth(name, until)``: whether the shard serves enough reads before position ``until`` to be
        worth its whole download. None when the shard is not admitted."""
        if size > self.budget:
            return None
        with self._lock(f".{name}.lock"):
            path = self.cached(name, size, sha256, etag)
            if path:
                return path
            part = self.path(f"{name}.{size}.{os.getpid()}.{threading.get_ident()}.part")
            with self._lock(".cache.lock"):  # reserve the space, evicting what is needed last
                if not self._make_room(size, name, next_use, worth):
                    return None
                part.touch()
            try:
                got, digest, got_etag = client.download(name, part)
                if got != size or digest != sha256:
                    raise ShardChecksumError(
                        f"{client.where(name)}: {got} bytes with sha256 {digest[:16]}... but the manifest "
                        f"says {size} bytes, {sha256[:16]}...: the object was replaced after build-shards; "
                        "rebuild or upload the shard set again (`verify-shards` names every such object)"
                    )
                final = self.path(name)
                with self._lock(".cache.lock"):  # not evicted between its arrival and its sidecar
                    os.replace(part, final)
                    st = os.stat(final)
                    ident = [st.st_size, st.st_ino, st.st_mtime_ns]
                    self._write_meta(name, {"sha256": sha256, "etag": got_etag, "ident": ident})
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part)
            self.fetched_bytes += got
            self.fetches += 1
            self._verified.add(str(final))
            self._last_use[name] = time.monotonic()
            return str(final)

    def downloading(self, name: str) -> bool:
        """Whether a process of this node is downloading the shard now."""
        return any(self.root.glob(f"{glob_escape(name)}.*.part"))

    def wait_for(self, name: str) -> None:
        """Until the download of a shard in progress on this node ends (its lock is free)."""
        with self._lock(f".{name}.lock"):
            pass

    def _make_room(self, size: int, name: str, next_use, worth=None) -> bool:
        used = self.used()
        if used + size <= self.budget:
            return True
        cached = [n for n in self.entries() if n != name]
        if self.policy == "fnu" and next_use is not None:
            mine = next_use(name)
            ranked = sorted(cached, key=next_use, reverse=True)  # needed last first
            for victim in ranked:
                if used + size <= self.budget:
                    break
                until = next_use(victim)
                if until <= mine:
                    return False  # every remaining shard is needed before this one: do not admit it
                if worth is not None and not worth(name, until):
                    return False  # too few reads before the victim is needed again: range-read them
                used -= self._remove(victim)
        else:
            ranked = sorted(cached, key=lambda n: self._last_use.get(n, self._mtime(n)))
            for victim in ranked:
                if used + size <= self.budget:
                    break
                used -= self._remove(victim)
        return used + size <= self.budget

    def _mtime(self, name: str) -> float:
        try:
            return os.stat(self.path(name)).st_mtime - time.time() + time.monotonic()
        except FileNotFoundError:
            return 0.0

    def _remove(self, name: str) -> int:
        """Remove a cached shard (a process reading it keeps its open file); its size."""
        path = self.path(name)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            size = 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(f"{name}.meta"))
        self._verified.discard(str(path))
        self._last_use.pop(name, None)
        if size:
            self.evictions += 1
        return size

    def _read_meta(self, name: str) -> dict | None:
        try:
            return json.loads(self.path(f"{name}.meta").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_meta(self, name: str, meta: dict) -> None:
        tmp = self.path(f".{name}.meta.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.path(f"{name}.meta"))

    @contextlib.contextmanager
    def _lock(self, name: str):
        with open(self.root / name, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class Schedule:
    """When the node needs each shard next: the shard of every position of the pass (and of the next
    epoch), and a cursor that follows the loader."""

    def __init__(self, num_shards: int) -> None:
        self.num_shards = num_shards
        self.positions: list[np.ndarray] = [np.empty(0, np.int64)] * num_shards
        self.sequence = np.empty(0, np.int64)
        self.cursor = 0

    def set(self, sequence: np.ndarray, cursor: int = 0) -> None:
        seq = np.asarray(sequence, dtype=np.int64)
        order = np.argsort(seq, kind="stable")
        bounds = np.searchsorted(seq[order], np.arange(self.num_shards + 1))
        self.positions = [order[bounds[t] : bounds[t + 1]] for t in range(self.num_shards)]
        self.sequence, self.cursor = seq, int(cursor)

    def next_use(self, t: int) -> int:
        pos = self.positions[t]
        k = bisect.bisect_left(pos, self.cursor)
        return int(pos[k]) if k < len(pos) else NEVER

    def uses(self, t: int, until: int) -> int:
        """Reads of shard ``t`` from the cursor up to position ``until``."""
        pos = self.positions[t]
        return bisect.bisect_left(pos, until) - bisect.bisect_left(pos, self.cursor)

    def upcoming(self, horizon: int) -> list[int]:
        """Shards in the order of their next use within ``horizon`` positions of the cursor."""
        window = self.sequence[self.cursor : self.cursor + horizon]
        _, first = np.unique(window, return_index=True)
        return [int(t) for t in window[np.sort(first)]]


class RemoteShards:
    """A rank's reads of one split's shards on object storage (see the module docstring)."""

    def __init__(
        self,
        table,
        cache_dir: str,
        budget: int,
        ahead: int,
        policy: str = "fnu",
        max_open: int = 32,
        prefetch: bool = True,
    ) -> None:
        self.table = table
        self.client = client_for(table.location)
        self.cache_dir, self.budget, self.ahead, self.policy = cache_dir, budget, ahead, policy
        self.max_open, self.prefetch_enabled = max_open, prefetch
        self.cache = NodeCache(cache_dir, table.location, budget, policy)
        self.names = [Path(t).name for t in table.tars]
        self._index = {n: t for t, n in enumerate(self.names)}
        self._counts = np.bincount(table.tar_of, minlength=len(self.names))  # samples per shard
        self.schedule = Schedule(len(self.names))
        self.error: BaseException | None = None
        self.range_bytes = 0  # bytes this process fetched by range requests
        self.range_requests = 0
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._pending: dict[tuple[int, int, int], bytes] = {}  # (tar, offset, size) -> bytes
        self._refused: set[int] = set()  # not admitted at the cursor they were refused at
        self._thread: threading.Thread | None = None
        self._idle = False  # the fetcher found nothing to fetch and nothing refused
        self._stop = False
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def _forked(self) -> None:
        """In a forked DataLoader worker: fresh locks and thread pool (the parent's threads do not
        exist here, and a lock held by one of them at the fork would never be released); no
        fetcher (the parent process fetches ahead)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._pool, self._thread, self.prefetch_enabled = None, None, False

    def __getstate__(self):  # a DataLoader worker reads (cache, ranges) but fetches nothing ahead
        return {
            "table": self.table,
            "cache_dir": self.cache_dir,
            "budget": self.budget,
            "ahead": self.ahead,
            "policy": self.policy,
            "max_open": self.max_open,
            "prefetch": False,
        }

    def __setstate__(self, state) -> None:
        self.__init__(**state)

    # --- the schedule -----------------------------------------------------------------------------
    def plan(self, sequence: np.ndarray, cursor: int = 0) -> None:
        """The shards of the positions to come (position ``k`` of ``sequence`` needs shard
        ``sequence[k]``); the fetcher works through them from ``cursor``."""
        with self._lock:
            self._pending.clear()
        with self._wake:
            self.schedule.set(sequence, cursor)
            self._refused.clear()
            self._wake.notify_all()
        if self.prefetch_enabled and self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._fetch_ahead, name="shard-fetch", daemon=True)
            self._thread.start()

    def advance(self, cursor: int) -> None:
        with self._wake:
            if cursor != self.schedule.cursor:
                self.schedule.cursor = int(cursor)
                if self._refused or not self._idle:  # an idle fetcher looks again within a second
                    self._refused.clear()
                    self._wake.notify_all()

    def _fill(self, t: int) -> str | None:
        index, counts = self._index, self._counts

        def worth(n: str, until: int) -> bool:  # half its samples read before the victim is needed
            return n in index and self.schedule.uses(index[n], until) >= ADMIT_FRACTION * counts[index[n]]

        return self.cache.fill(
            self.client,
            self.names[t],
            self.table.sizes[t],
            self.table.sha256[t],
            self.table.etags[t] if self.table.etags else "",
            lambda n: self.schedule.next_use(index[n]) if n in index else NEVER,
            worth,
        )

    def _fetch_ahead(self) -> None:
        """Download the upcoming shards, ``FETCHERS`` at a time, in the order they are needed."""
        inflight: dict[int, object] = {}
        with ThreadPoolExecutor(FETCHERS, thread_name_prefix="shard-fill") as pool:
            while not self._stop:
                for t, fut in list(inflight.items()):
                    if not fut.done():
                        continue
                    del inflight[t]
                    exc = fut.exception()
                    if isinstance(exc, OSError):  # a full or unwritable cache folder
                        exc = ObjectStoreError(f"cache folder {self.cache.root}: {exc}")
                    if exc is not None:  # raised by the next read
                        self.error = exc
                        return
                    if fut.result() is None:  # not admitted at this cursor
                        with self._wake:
                            self._refused.add(t)
                with self._wake:
                    if len(inflight) >= FETCHERS:
                        self._wake.wait(0.02)
                        continue
                    todo = [
                        t
                        for t in self.schedule.upcoming(self.ahead)
                        if t not in self._refused
                        and t not in inflight
                        and not self._looks_cached(t)
                    ]
                    self._idle = not todo and not inflight and not self._refused
                    if not todo:  # every upcoming shard cached (idle: look again in a second) or refused
                        self._wake.wait(0.02 if inflight else 1.0)
                        continue
                t = todo[0]
                inflight[t] = pool.submit(self._fill, t)
            for fut in inflight.values():  # stop: let the downloads under way end cleanly
                fut.exception()

    def _looks_cached(self, t: int) -> bool:
        """A file of the shard's size is in the cache (``NodeCache.cached`` checks it fully on use)."""
        try:
            return os.stat(self.cache.path(self.names[t])).st_size == self.table.sizes[t]
        except FileNotFoundError:
            return False

    def stop(self) -> None:
        self._stop = True
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # --- reading --------------------------------------------------------------------------------
    def _cached_fd(self, t: int, recheck: bool = True) -> int | None:
        """An open descriptor of shard ``t``'s cached file; ``recheck``: drop it when the file was
        evicted since (a batch's first look; its reads then trust it)."""
        fd = self._fds.pop(t, None)
        if fd is not None and recheck and os.fstat(fd).st_nlink == 0:  # evicted: not cached any more
            os.close(fd)
            fd = None
        if fd is None:
            etag = self.table.etags[t] if self.table.etags else ""
            path = self.cache.cached(self.names[t], self.table.sizes[t], self.table.sha256[t], etag)
            if path is None:
                return None
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:  # evicted by another process just now
                return None
            while len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[t] = fd
        return fd

    def read(self, t: int, offset: int, size: int) -> bytes:
        """Bytes of shard ``t``: from the node's cached copy, a batch's prefetched ranges, or a range
        request."""
        self._forked()
        self.raise_if_failed()
        with self._lock:
            data = self._pending.pop((t, offset, size), None)
            if data is not None:
                return data
            fd = self._cached_fd(t, recheck=False)
            if fd is not None:
                return os.pread(fd, size, offset)
        data = self.client.get_range(self.names[t], offset, size)
        with self._lock:
            self.range_bytes += len(data)
            self.range_requests += 1
        return data

    def fetch_batch(self, spans: list[tuple[int, int, int]]) -> None:
        """Fetch the spans ``(tar, offset, size)`` of a batch that no cached shard holds: one range
        request per run of adjacent samples of a shard, the shards' requests at once. ``read`` then
        returns them without a request."""
        self._forked()
        self.raise_if_failed()
        wanted: dict[int, list[tuple[int, int]]] = {}
        for t, off, size in spans:
            wanted.setdefault(t, []).append((off, size))
        by_tar: dict[int, list[tuple[int, int]]] = {}
        for t, shard_spans in wanted.items():  # one look per shard
            with self._lock:
                if self._cached_fd(t) is not None:
                    continue
            if self.cache.downloading(self.names[t]):
                self.cache.wait_for(self.names[t])  # the whole shard is on its way: wait, not a request each
                with self._lock:
                    if self._cached_fd(t) is not None:
                        continue
            with self._lock:
                todo = [(off, size) for off, size in shard_spans if (t, off, size) not in self._pending]
            if todo:
                by_tar[t] = todo
        if not by_tar:
            return
        jobs = [
            (t, start, end, [wanted[k] for k in members])
            for t, wanted in by_tar.items()
            for start, end, members in coalesce(wanted)
        ]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(8, thread_name_prefix="shard-range")

        def get(job):
            t, start, end, members = job
            return job, self.client.get_range(self.names[t], start, end - start)

        for (t, start, _end, members), data in self._pool.map(get, jobs):
            with self._lock:
                self.range_bytes += len(data)
                self.range_requests += 1
                for off, size in members:
                    self._pending[(t, off, size)] = data[off - start : off - start + size]

    def close(self) -> None:
        self.stop()
        with self._lock:
            while self._fds:
                with contextlib.suppress(OSError):
                    os.close(self._fds.popitem()[1])
            self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
