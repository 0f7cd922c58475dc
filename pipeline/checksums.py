"""Each shard's sha256 against the manifest, the first time a node reads it.

Sizes are checked when a loader starts (``SampleTable.load``); contents cannot be, cheaply: ImageNet's
tars are ~140 GB. So when a pass starts, a :class:`ShardHashCheck` hashes the tars it reads, in a
background thread and in the order the pass first needs them; a mismatch fails the pass (at its next
batch, and at the latest at its last) with :class:`ShardChecksumError`, naming the file. A node
hashes each file once: a marker under ``marker_dir`` (node-local temp space) records a file that
matched, keyed by its path, size, inode, mtime and expected hash, so a replaced file is hashed again;
an advisory lock shares the work between the processes (ranks) of a node.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 4 << 20


class ShardChecksumError(Exception):
    """A shard's bytes are not those its manifest describes. Neither a ValueError/OSError (a bad
    sample's, which quarantine may swallow) nor a RuntimeError (a DALI failure's, which the DALI loader
    diagnoses): it ends the pass."""


MARKER_DIR_ENV = "INCEPTION_VERIFIED_DIR"


def default_marker_dir() -> str:
    """Node-local: ``$INCEPTION_VERIFIED_DIR``, else a folder of this user's under the temp dir."""
    return os.environ.get(MARKER_DIR_ENV) or os.path.join(
        tempfile.gettempdir(), f"inception-verified-{os.getuid()}"
    )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ShardHashCheck:
    """Hash tars in the background, each at most once per process and (with markers) per node."""

    def __init__(
        self,
        tars: Sequence[str],
        expected: Sequence[str | None],
        marker_dir: str | None,
        sizes: Sequence[int] | None = None,
    ) -> None:
        self.tars, self.expected, self.marker_dir = tuple(tars), tuple(expected), marker_dir
        self.sizes = tuple(sizes) if sizes else None
        self.error: ShardChecksumError | None = None
        self.hashed = 0  # files this process hashed (the others were matched on this node before)
        self._started: set[int] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self):  # a copy in a DataLoader worker starts idle (the main process checks)
        return {
            "tars": self.tars,
            "expected": self.expected,
            "marker_dir": self.marker_dir,
            "sizes": self.sizes,
        }

    def __setstate__(self, state) -> None:
        self.__init__(**state)

    def start(self, tars: Iterable[int]) -> None:
        """Queue the tars (in this order) that are not queued yet."""
        with self._lock:
            for t in tars:
                t = int(t)
                if t in self._started or not self.expected[t]:
                    continue
                self._started.add(t)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-sha256")
                self._pool.submit(self._check, t)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        """Let every queued hash finish (the end of a pass)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _marker(self, t: int) -> Path | None:
        if not self.marker_dir:
            return None
        st = os.stat(self.tars[t])
        parts = (os.path.realpath(self.tars[t]), st.st_size, st.st_ino, st.st_mtime_ns, self.expected[t])
        ident = "\0".join(str(p) for p in parts)
        return Path(self.marker_dir) / hashlib.sha256(ident.encode()).hexdigest()[:40]

    def _check(self, t: int) -> None:
        try:
            if self.sizes and self.sizes[t] and os.path.getsize(self.tars[t]) != self.sizes[t]:
                return  # a cut tar: its cut samples are named (or quarantined) from its index instead
            marker = self._marker(t)
            if marker is not None and marker.exists():
                return
            with self._exclusive(marker) as mine:
                if not mine or (marker is not None and marker.exists()):
                    return  # another process of this node hashes it, or just did
                got = file_sha256(self.tars[t])
                self.hashed += 1
                if got != self.expected[t]:
                    self.error = ShardChecksumError(
                        f"{Path(self.tars[t]).name}: its sha256 is {got[:16]}... but the manifest says "
                        f"{self.expected[t][:16]}...: the file changed after build-shards; copy the shard "
                        "folder again or rebuild it (`verify-shards` names every such file), or turn this "
                        "check off with data.verify_sha256=false"
                    )
                elif marker is not None:
                    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
                    tmp.write_text(self.expected[t])
                    os.replace(tmp, marker)
        except OSError:
            pass  # unreadable or vanished: the read itself reports it, with the sample's name

    @contextlib.contextmanager
    def _exclusive(self, marker: Path | None):
        if marker is None:
            yield True
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{marker}.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
