"""Write one WebDataset tar and its DALI index with deterministic bytes.

Tar members are POSIX ustar entries with fixed metadata (mtime 0, uid/gid 0, no user/group
names, mode 0644), in the order of the samples and, within a sample, ``jpg, cls, lbl, json``; so the
same samples always give the same bytes, whoever writes them and whenever.

The DALI index is the text format of DALI's ``wds2idx`` (``tools/wds2idx.py``, version "v1.2")::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> <ext> <data offset> ...    (one line per sample)

written here from the offsets we just wrote instead of re-reading the tar with GNU tar. Both files
are written to ``*.tmp`` and renamed into place only when complete. Used by
``pipeline.shards.build``; not run on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.schema import CLASS_EXT, IMAGE_EXT, INDEX_VERSION, LABEL_EXT, META_EXT, encode_label

BLOCK = 512  # tar block size (POSIX.1-1988 ustar)
RECORD = 20 * BLOCK  # tar's default record (blocking factor 20), as GNU tar and Python's tarfile pad


@dataclass(frozen=True)
class Sample:
    key: str
    jpg: bytes
    label: int
    meta: dict

    def components(self) -> list[tuple[str, bytes]]:
        cls, lbl = encode_label(self.label)
        meta = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return [(IMAGE_EXT, self.jpg), (CLASS_EXT, cls), (LABEL_EXT, lbl), (META_EXT, meta)]


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def sample_tar_bytes(sample: Sample) -> int:
    """Bytes a sample adds to a tar (headers + padded data)."""
    return sum(BLOCK + _padded(len(data)) for _, data in sample.components())


def tar_size(payload: int) -> int:
    """Final tar size for ``payload`` member bytes: two zero end blocks, padded to a whole record."""
    return (payload + 2 * BLOCK + RECORD - 1) // RECORD * RECORD


# Fixed fields of every member header: mode 0644, uid/gid 0, mtime 0, no user/group names, empty
# device numbers: the bytes Python 3.11's tarfile.TarInfo.tobuf(USTAR_FORMAT) writes for these values
# (test_shards_writer checks they are identical); built by hand because tobuf costs ~70 µs a member.
_MODE_UID_GID = b"0000644\0" + b"0000000\0" + b"0000000\0"
_MTIME = b"00000000000\0"
_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 167)  # type, link, magic, names, dev, prefix


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file (deterministic metadata, see above)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    if size >= 8**11:
        raise ValueError(f"tar member {name!r} is too large for a ustar header ({size} bytes)")
    head = raw.ljust(100, b"\0") + _MODE_UID_GID + b"%011o\0" % size + _MTIME
    checksum = sum(head) + sum(_TAIL) + 8 * 32  # the checksum field counts as 8 spaces
    return head + b"%06o\0 " % checksum + _TAIL


@dataclass(frozen=True)
class WrittenShard:
    tar: Path
    index: Path
    count: int
    sha256: str
    bytes: int


def write_shard(tar_path: Path, idx_path: Path, samples: list[Sample]) -> WrittenShard:
    """Write ``samples`` to ``tar_path`` + ``idx_path`` atomically; return size and sha256."""
    tmp_tar = tar_path.with_name(tar_path.name + ".tmp")
    tmp_idx = idx_path.with_name(idx_path.name + ".tmp")
    digest = hashlib.sha256()
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    pos = 0
    with open(tmp_tar, "wb") as f:

        def put(chunk: bytes) -> None:
            nonlocal pos
            f.write(chunk)
            digest.update(chunk)
            pos += len(chunk)

        for sample in samples:
            parts = []
            for ext, data in sample.components():
                name = f"{sample.key}.{ext}"
                put(ustar_header(name, len(data)))
                parts.append(f"{ext} {pos} {len(data)} {name}")
                put(data)
                if len(data) % BLOCK:
                    put(b"\0" * (BLOCK - len(data) % BLOCK))
            lines.append(" ".join(parts))
        put(b"\0" * (tar_size(pos) - pos))
        f.flush()
        os.fsync(f.fileno())
    tmp_idx.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp_idx, idx_path)
    os.replace(tmp_tar, tar_path)
    return WrittenShard(tar_path, idx_path, len(samples), digest.hexdigest(), pos)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
