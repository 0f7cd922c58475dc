"""``upload_shards``: put a shard folder on object storage (``s3://bucket/prefix``).

Used by ``build-shards SRC s3://…``, which builds in a local staging folder: each shard and its index
go up as soon as they are written (:class:`UploadAsWritten`, in the background), and
``upload_shards`` then sends what is left and the manifest last, so that a reader that finds the
manifest finds every shard it lists. Each tar and index goes up once (multipart above 64 MB); an
object already there with the same size and the ETag the file's bytes give is kept, so an
interrupted build or upload resumes where it stopped.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import storage
from pipeline.progress import progress as progress_bar
from pipeline.schema import MANIFEST_NAME, ShardFormatError, forget_remote, load_manifest

PART_SIZE = 64 << 20  # multipart threshold and part size (S3Client.put_file)


def file_etag(path: str | Path, part: int = PART_SIZE) -> str:
    """The ETag S3 gives a file uploaded with ``part``-byte parts: the MD5 of the bytes in one part,
    else the MD5 of the parts' MD5s and ``-<parts>``."""
    digests = []
    with open(path, "rb") as fh:
        while chunk := fh.read(part):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    if len(digests) <= 1:
        return (digests[0] if digests else hashlib.md5(b"", usedforsecurity=False).digest()).hex()
    combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{combined}-{len(digests)}"


def already_there(path: Path, present: dict[str, tuple[int, str]]) -> bool:
    """The store holds this file already: an object of its name, size and ETag (a listing's)."""
    have = present.get(path.name)
    return bool(have) and have[0] == path.stat().st_size and have[1] == file_etag(path)


class UploadAsWritten:
    """``build_shards(on_shard_written=...)``: each finished shard and its index uploaded in the
    background while the build goes on; ``finish()`` waits for them (raising the first failure)."""

    def __init__(self, folder: str | Path, url: str, workers: int = 4) -> None:
        self.folder, self.client = Path(folder), storage.client_for(url)
        self.present = self.client.list()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="shard-upload")
        self.futures: list = []
        self.uploaded = self.bytes = 0

    def __call__(self, record) -> None:
        for name in (record.tar, record.index):
            self.futures.append(self.pool.submit(self._put, name))

    def _put(self, name: str) -> int:
        path = self.folder / name
        if already_there(path, self.present):
            return -1
        self.client.put_file(name, path)
        return path.stat().st_size

    def finish(self) -> None:
        try:
            for fut in self.futures:
                size = fut.result()
                if size >= 0:
                    self.uploaded += 1
                    self.bytes += size
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def upload_shards(
    folder: str | Path, url: str, progress: bool = True, workers: int = 4, splits: list[str] | None = None
) -> dict[str, int]:
    """Upload ``folder``'s shard set (or its ``splits``; the others must be on the store already) to
    ``url``; ``{"uploaded": n, "kept": n, "bytes": n}``."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    client = storage.client_for(url)
    present = client.list()
    chosen = {k: v for k, v in manifest.splits.items() if splits is None or k in splits}
    for name, info in manifest.splits.items():
        missing = [sh.tar for sh in info.shards if name not in chosen and sh.tar not in present]
        if missing:
            raise ShardFormatError(f"split {name!r}: {missing[0]} is neither uploaded nor being uploaded")
    names = [n for s in chosen.values() for sh in s.shards for n in (sh.tar, sh.index)]
    todo, kept = [], 0
    for name in names:
        path = folder / name
        if already_there(path, present):
            kept += 1
        else:
            todo.append((name, path, path.stat().st_size))
    total = sum(size for _, _, size in todo)
    with progress_bar(total=total, unit="B", unit_scale=True, desc="upload", disable=not progress) as bar:

        def put(item):
            name, path, size = item
            client.put_file(name, path)
            return size

        with ThreadPoolExecutor(workers) as pool:
            for size in pool.map(put, todo):
                bar.update(size)
    client.put_file(MANIFEST_NAME, folder / MANIFEST_NAME)  # last: the set is complete once it is there
    forget_remote(url)
    return {"uploaded": len(todo), "kept": kept, "bytes": total}
