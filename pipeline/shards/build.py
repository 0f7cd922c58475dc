"""``build_shards``: images in, WebDataset shards + DALI indices + manifest out.

Steps: discover inputs and check them (no image touched yet) -> shuffle globally under ``seed`` ->
plan fingerprint -> keep recorded shards that still verify -> decode/convert the rest in
``workers`` processes (``Pool.imap``: results come back in input order, so the output bytes do not
depend on the number of workers) -> cut shards by ``shard_size`` samples and ``max_shard_bytes`` ->
write each atomically and record it -> ``manifest.json``.

Run through the CLI (``build-shards --help``) or from Python::

    from pipeline.shards import build_shards
    manifest = build_shards("imagenet/train", "shards/", split="train", workers=16)
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.progress import progress as progress_bar
from pipeline.schema import Manifest, ShardInfo, SplitInfo, index_name, shard_name, write_manifest
from pipeline.shards.classes import SourceError
from pipeline.shards.images import DEFAULT_QUALITY, ImageOptions, Processed, process_image
from pipeline.shards.outdir import check_classes, check_split_name, prepare_out, split_files_on_disk
from pipeline.shards.sources import Discovery, Item, discover
from pipeline.shards.state import (
    ShardRecord,
    append_record,
    compact_state,
    load_records,
    start_state,
    state_path,
)
from pipeline.shards.writer import Sample, file_sha256, sample_tar_bytes, tar_size, write_shard

DEFAULT_SHARD_SIZE = 1000  # ~110 MB of ImageNet JPEGs (mean ~110 kB): WebDataset's 100 MB-1 GB range
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # 1 GiB: upper end of that range
IMAP_CHUNK = 8  # jobs per worker round trip; small enough to keep the bar smooth


@dataclass(frozen=True)
class _Segment:
    """Positions ``[start, end)`` of the shuffled input; ``shard`` set = rebuild that one shard."""

    start: int
    end: int
    shard: int | None


def _plan_fingerprint(options: dict, disc: Discovery, order: list[int]) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update(json.dumps([c.name for c in disc.classes]).encode())
    for p in order:
        it = disc.items[p]
        digest.update(f"{it.key}\0{it.source}\0{it.locator.size}\0{it.label}\n".encode())
    return digest.hexdigest()


def _verified(out: Path, rec: ShardRecord) -> bool:
    tar, idx = out / rec.tar, out / rec.index
    return (
        tar.is_file() and idx.is_file() and tar.stat().st_size == rec.bytes
        and file_sha256(tar) == rec.sha256 and file_sha256(idx) == rec.index_sha256
    )


def _results(jobs: Iterable[tuple], workers: int) -> Iterator[Processed]:
    if workers <= 1:
        yield from map(process_image, jobs)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(process_image, jobs, chunksize=IMAP_CHUNK)


class _ShardCutter:
    """Collects processed samples into shards and writes each one with its state record."""

    def __init__(self, out, split, disc, shard_size, max_shard_bytes, state, on_shard_written):
        self.out, self.split, self.disc = out, split, disc
        self.shard_size, self.max_bytes = shard_size, max_shard_bytes
        self.state, self.on_shard_written = state, on_shard_written
        self.records: dict[int, ShardRecord] = {}
        self._reset(0)

    def _reset(self, start: int) -> None:
        self.samples: list[Sample] = []
        self.skipped: list[dict] = []
        self.actions: Counter = Counter()
        self.payload, self.start = 0, start

    def sample(self, item: Item, res: Processed) -> Sample:
        meta = {"key": item.key, "source": item.source, "class": self.disc.classes[item.label].name,
                "label": item.label, "width": res.width, "height": res.height}
        return Sample(item.key, res.data, item.label, meta)

    def add(self, item: Item, res: Processed, sample: Sample | None) -> None:
        if sample is None:
            self.skipped.append({"source": item.source, "reason": res.reason})
            return
        self.samples.append(sample)
        self.actions[res.action] += 1
        self.payload += sample_tar_bytes(sample)

    def fits(self, sample: Sample) -> bool:
        return not self.samples or (
            len(self.samples) < self.shard_size
            and tar_size(self.payload + sample_tar_bytes(sample)) <= self.max_bytes
        )

    def flush(self, shard: int, end: int) -> None:
        if not self.samples:
            raise SourceError(f"positions {self.start}..{end} of the input hold no decodable image")
        tar_path = self.out / shard_name(self.split, shard)
        written = write_shard(tar_path, self.out / index_name(self.split, shard), self.samples)
        rec = ShardRecord(
            shard=shard, tar=written.tar.name, index=written.index.name, sha256=written.sha256,
            index_sha256=file_sha256(written.index), bytes=written.bytes, count=written.count,
            start=self.start, end=end, keys=[s.key for s in self.samples], skipped=self.skipped,
            actions=dict(sorted(self.actions.items())),
        )
        append_record(self.state, rec)
        self.records[shard] = rec
        if self.on_shard_written is not None:
            self.on_shard_written(rec)
        self._reset(end)


def _run(segments, order, disc, jobs_opts, workers, cutter, next_shard, progress, split) -> None:
    positions = [p for seg in segments for p in range(seg.start, seg.end)]
    jobs = ((disc.items[order[p]].locator, jobs_opts) for p in positions)  # lazy: 1.28 M for ImageNet
    bar = progress_bar(total=len(positions), unit="img", desc=f"build-shards {split}", disable=not progress,
                       smoothing=0.05)
    seg_iter = iter(segments)
    seg = next(seg_iter)
    shard = seg.shard if seg.shard is not None else next_shard
    cutter._reset(seg.start)
    done_bytes = 0
    with bar:
        for p, res in zip(positions, _results(jobs, workers), strict=True):
            while p >= seg.end:  # leaving a rebuild segment: its shard is complete
                cutter.flush(seg.shard, seg.end)
                seg = next(seg_iter)
                shard = seg.shard if seg.shard is not None else next_shard
                cutter._reset(seg.start)
            item = disc.items[order[p]]
            sample = cutter.sample(item, res) if res.data is not None else None
            if seg.shard is None and sample is not None and not cutter.fits(sample):
                cutter.flush(shard, p)
                shard += 1
            cutter.add(item, res, sample)
            done_bytes += len(res.data or b"")
            bar.update(1)
            bar.set_postfix_str(f"{done_bytes / 1e6 / max(bar.elapsed, 1e-9):.1f} MB/s",
                                refresh=False)
        cutter.flush(seg.shard if seg.shard is not None else shard, seg.end)


def build_shards(
    source: str | Path,
    out: str | Path,
    split: str = "train",
    *,
    format: str = "auto",
    classes: str | Path | None = None,
    words: str | Path | None = None,
    labels: str | None = None,
    subdir: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    seed: int = 0,
    workers: int = 1,
    max_side: int | None = None,
    shorter_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    allow_empty_classes: bool = False,
    labels_are: str = "auto",
    allow_outside: tuple[str, ...] | list[str] = (),
    progress: bool = True,
    on_shard_written: Callable[[ShardRecord], None] | None = None,
) -> Manifest:
    """Build (or resume) ``split`` of the shard folder ``out`` from ``source``; return the manifest.

    Raises :class:`SourceError` (a ``ValueError``) before any image is processed when the input
    or the output folder is not usable. Unreadable images are skipped and listed in the manifest.
    ``on_shard_written(record)`` is called after each shard is safely on disk.
    """
    check_split_name(split)
    if shard_size < 1:
        raise SourceError(f"--shard-size must be >= 1, got {shard_size}")
    if max_shard_bytes < 64 * 1024:
        raise SourceError(f"--max-shard-bytes must be >= 65536, got {max_shard_bytes}")
    if workers < 1:
        raise SourceError(f"--workers must be >= 1, got {workers}")
    try:
        img_opts = ImageOptions(max_side=max_side, shorter_side=shorter_side, quality=quality)
    except ValueError as exc:
        raise SourceError(str(exc)) from exc
    out = Path(out)
    if Path(source).is_dir() and out.resolve().is_relative_to(Path(source).resolve()):
        raise SourceError(f"output folder {out} is inside the source folder {source}; write it elsewhere")
    existing = prepare_out(out)
    disc = discover(source, format, labels=labels, classes_file=classes, words_file=words,
                    existing_classes=existing.classes if existing else (),
                    allow_empty_classes=allow_empty_classes, subdir=subdir, labels_are=labels_are,
                    allow_outside=allow_outside)
    try:
        disc.classes = check_classes(disc.classes, existing, split)
        options = {"format": disc.format, "seed": seed, "shard_size": shard_size,
                   "max_shard_bytes": max_shard_bytes, "max_side": max_side, "shorter_side": shorter_side,
                   "quality": quality}
        order = list(range(len(disc.items)))
        random.Random(seed).shuffle(order)  # global shuffle at write time (DALI shuffles only a buffer)
        plan = _plan_fingerprint(options, disc, order)
        out.mkdir(parents=True, exist_ok=True)
        state = state_path(out, split)
        records = load_records(state, plan)
        if records is None:  # new plan: this split's old files are stale
            for path in split_files_on_disk(out, split):
                path.unlink()
            start_state(state, plan)
            records = {}
        kept = {i: r for i, r in records.items() if _verified(out, r)}
        segments = [_Segment(r.start, r.end, i) for i, r in sorted(records.items()) if i not in kept]
        tail = max((r.end for r in records.values()), default=0)
        if tail < len(order):
            segments.append(_Segment(tail, len(order), None))
        cutter = _ShardCutter(out, split, disc, shard_size, max_shard_bytes, state, on_shard_written)
        cutter.records.update(kept)
        if segments:
            _run(segments, order, disc, img_opts, workers, cutter, len(records), progress, split)
        if segments or len(records) != len(cutter.records):
            compact_state(state, plan, [cutter.records[i] for i in sorted(cutter.records)])
        return _write_manifest(out, split, existing, disc, cutter.records, options, source, subdir, labels,
                               classes)
    finally:
        disc.close()


def _write_manifest(out, split, existing, disc, records, options, source, subdir, labels,
                    classes) -> Manifest:
    recs = [records[i] for i in sorted(records)]
    if [r.shard for r in recs] != list(range(len(recs))):
        raise SourceError(f"internal: shards of {split} are not contiguous: {[r.shard for r in recs]}")
    for path in split_files_on_disk(out, split):  # leftovers from an older, larger build of this plan
        if path.name not in {n for r in recs for n in (r.tar, r.index)}:
            path.unlink()
    skipped = sorted(disc.skipped + [s for r in recs for s in r.skipped], key=lambda d: d["source"])
    actions = Counter()
    for r in recs:
        actions.update(r.actions)
    params = dict(options, source=str(Path(source).resolve()), subdir=subdir, labels=labels,
                  classes_file=str(classes) if classes else None, num_inputs=len(disc.items),
                  num_skipped=len(skipped), actions=dict(sorted(actions.items())))
    info = SplitInfo(
        shards=tuple(ShardInfo(r.tar, r.index, r.count, r.sha256, r.bytes) for r in recs),
        skipped=tuple(skipped), params=params,
    )
    splits = dict(existing.splits) if existing else {}
    splits[split] = info
    manifest = Manifest(classes=disc.classes, splits=splits)
    write_manifest(out, manifest)
    return manifest
