"""Command lines ``build-shards`` and ``verify-shards`` (entry points declared in pyproject.toml).

    build-shards imagenet/train shards/ --split train --classes synsets.txt --workers 16
    build-shards imagenet/val shards/ --split val --format imagenet-val --labels LOC_val_solution.csv \
        --classes synsets.txt
    verify-shards shards/ --deep
    build-shards imagenet/train s3://bucket/imagenet --split train ...   # built locally, then uploaded
    verify-shards s3://bucket/imagenet

Bad input ends with one ``error: ...`` line and exit status 2 (usage) or 1 (input/data problem).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.shards.build import DEFAULT_MAX_SHARD_BYTES, DEFAULT_SHARD_SIZE, build_shards
from pipeline.shards.classes import SourceError
from pipeline.shards.images import DEFAULT_QUALITY
from pipeline.shards.sources import FORMATS
from pipeline.shards.verify import verify_shards


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build-shards",
        description="Turn an image collection into WebDataset shards (+ DALI .idx files + manifest.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="folder, .tar/.tar.gz (also a tar of per-class tars), or a CSV/TSV list")
    p.add_argument("out", help="shard folder (created; may already hold other splits of the same classes), "
                   "or s3://bucket/prefix: built in --staging, then uploaded (the manifest last)")
    p.add_argument("--split", default="train", help="split name: files are <split>-NNNNNN.tar")
    p.add_argument("--format", default="auto", choices=FORMATS, help="input layout")
    p.add_argument("--classes", help="class list file in fixed order (one synset/name per line, "
                   "words optional)")
    p.add_argument("--words", help="synset -> human name file (imagenet synset_words.txt format)")
    p.add_argument("--labels", help="labels file (CSV/TSV path,label; LOC_val_solution.csv; '<file> <index>' "
                   "lines); a path on disk or a member of SOURCE")
    p.add_argument("--subdir", help="use only this folder inside SOURCE as its root (e.g. train)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard (max)")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                   help="bytes per shard (max)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-side", type=int, help="downscale so that the longer side is at most N")
    size.add_argument("--shorter-side", type=int, help="downscale so that the shorter side is at most N")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of re-encoded images")
    p.add_argument("--allow-empty-classes", action="store_true",
                   help="accept classes of the class list that have no image in this split")
    p.add_argument("--labels-are", choices=("auto", "index", "name"), default="auto",
                   help="labels of a list: class indices (0..N-1), class names, or auto: decided only "
                   "when every row agrees")
    p.add_argument("--allow-outside", action="append", default=[], metavar="ROOT",
                   help="also read files under ROOT that list rows or folder links point to (by default "
                   "anything outside SOURCE's folder is refused and listed as skipped); repeatable")
    p.add_argument("--staging", help="local folder an s3:// OUT is built in before the upload (kept, so "
                   "that an interrupted build or upload resumes; default: a folder per OUT under "
                   "~/.cache/inception)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def staging_folder(url: str, staging: str | None) -> Path:
    """Where an ``s3://`` OUT is built: ``staging``, or a folder of its own under ~/.cache/inception.
    A manifest already on the store (other splits) is copied in first, so the build adds to it."""
    import hashlib

    from pipeline import storage
    from pipeline.schema import MANIFEST_NAME

    folder = Path(staging) if staging else (
        Path.home() / ".cache" / "inception" / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16]
    )
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MANIFEST_NAME).exists():
        try:
            (folder / MANIFEST_NAME).write_bytes(storage.client_for(url).get(MANIFEST_NAME))
        except storage.ObjectStoreError as exc:
            if "no such object" not in str(exc):
                raise
    return folder


def _abandon(uploader) -> None:
    """Uploads not started yet are dropped (the rerun uploads them); those under way end."""
    if uploader is not None:
        uploader.pool.shutdown(wait=False, cancel_futures=True)


def build_main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from pipeline import storage
    from pipeline.schema import ShardFormatError

    remote = storage.is_remote(args.out)
    uploader = None
    try:
        out = staging_folder(args.out, args.staging) if remote else args.out
        if remote:
            from pipeline.shards.upload import UploadAsWritten

            uploader = UploadAsWritten(out, args.out)
        manifest = build_shards(
            args.source, out, args.split, format=args.format, classes=args.classes, words=args.words,
            labels=args.labels, subdir=args.subdir, shard_size=args.shard_size,
            max_shard_bytes=args.max_shard_bytes,
            seed=args.seed, workers=args.workers, max_side=args.max_side, shorter_side=args.shorter_side,
            quality=args.quality, allow_empty_classes=args.allow_empty_classes,
            labels_are=args.labels_are, allow_outside=args.allow_outside,
            progress=not args.no_progress, on_shard_written=uploader,
        )
        if remote:
            from pipeline.shards.upload import upload_shards

            uploader.finish()
            done = upload_shards(out, args.out, progress=not args.no_progress, splits=[args.split])
            n, size = uploader.uploaded + done["uploaded"], uploader.bytes + done["bytes"]
            print(f"uploaded {n} files ({size / 1e6:.1f} MB), kept {done['kept'] - uploader.uploaded} "
                  f"already there -> {args.out}")
    except (SourceError, OSError, ShardFormatError, storage.ObjectStoreError) as exc:
        print(f"build-shards: error: {exc}", file=sys.stderr)
        _abandon(uploader)
        return 1
    except KeyboardInterrupt:
        print("build-shards: interrupted; rerun the same command to resume", file=sys.stderr)
        _abandon(uploader)
        return 130
    info = manifest.split(args.split)
    print(f"{args.split}: {info.num_samples} samples in {len(info.shards)} shards, "
          f"{manifest.num_classes} classes, {len(info.skipped)} skipped -> {args.out}")
    for s in info.skipped[:10]:
        print(f"  skipped {s['source']}: {s['reason']}")
    if len(info.skipped) > 10:
        print(f"  ... {len(info.skipped) - 10} more skipped (see manifest.json)")
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="verify-shards",
                                description="Check a shard folder against its manifest.")
    p.add_argument("out", help="shard folder with manifest.json, or s3://bucket/prefix (each object is "
                   "downloaded once, to a temporary folder)")
    p.add_argument("--deep", action="store_true", help="also decode every image")
    p.add_argument("--split", help="check only this split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    report = verify_shards(args.out, deep=args.deep, split=args.split, progress=not args.no_progress)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(build_main())
