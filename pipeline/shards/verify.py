"""``verify_shards``: check a shard folder against its manifest.

For every shard of every (or one) split: the tar and index exist, size and sha256 match the
manifest, the tar's members form complete samples (``jpg, cls, lbl, json``) with unique keys,
``cls`` (ASCII) equals ``lbl`` (int32 LE) and lies in ``[0, num_classes)``, the sample count
matches, and the DALI index lists exactly the tar's members with their data offsets and sizes.
``deep=True`` also decodes every image fully with Pillow (must be an RGB JPEG) and checks the
``json`` label. Run ``verify-shards OUT [--deep] [--split S]`` or::

    from pipeline.shards import verify_shards
    report = verify_shards("shards/", deep=True)
    print(report.summary()); assert report.ok
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline import storage
from pipeline.progress import progress as progress_bar
from pipeline.schema import (
    SAMPLE_EXTS,
    ShardFormatError,
    ShardInfo,
    decode_lbl,
    load_manifest,
    read_index,
    truncated_samples,
)
from pipeline.shards.outdir import foreign_files
from pipeline.shards.writer import file_sha256

MAX_ERRORS_PER_SHARD = 20  # keep the summary readable when a shard is badly broken


@dataclass
class SplitReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    skipped: int = 0
    class_counts: dict[int, int] = field(default_factory=dict)


@dataclass
class VerifyReport:
    folder: str
    deep: bool
    splits: dict[str, SplitReport] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    num_classes: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [f"{self.folder}: {self.num_classes} classes, {'deep' if self.deep else 'shallow'} check"]
        for name, s in sorted(self.splits.items()):
            present = sum(1 for c in s.class_counts.values() if c)
            lines.append(
                f"  {name}: {s.samples} samples in {s.shards} shards ({s.bytes / 1e6:.1f} MB), "
                f"{present}/{self.num_classes} classes present, {s.skipped} inputs skipped at build"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  ERROR: {e}" for e in self.errors]
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} error(s)")
        return "\n".join(lines)


def _diagnose_damaged(folder: Path, sh: ShardInfo) -> list[str]:
    """After a checksum mismatch (``--deep``): every truncated and every undecodable sample by key,
    read through the index's offsets (the tar itself may not parse any more)."""
    tar, idx = folder / sh.tar, folder / sh.index
    try:
        _, entries = read_index(idx)
        truncated = truncated_samples(tar, idx, entries)
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"{sh.index}: unreadable DALI index: {exc}"]
    errs = []
    if truncated:
        keys, end = ", ".join(k for k, _ in truncated), tar.stat().st_size
        errs.append(f"{sh.tar}: {len(truncated)} sample(s) truncated (the file ends at byte {end}): {keys}")
    cut = {k for k, _ in truncated}
    undecodable = []
    with open(tar, "rb") as f:
        for sample in entries:
            key = sample[0][3].partition(".")[0]
            if key in cut:
                continue
            for ext, offset, length, _ in sample:
                if ext == "jpg":
                    f.seek(offset)
                    try:
                        with Image.open(io.BytesIO(f.read(length))) as img:
                            img.load()
                    except Exception as exc:
                        undecodable.append(f"{key} ({type(exc).__name__})")
    if undecodable:
        errs.append(f"{sh.tar}: {len(undecodable)} sample(s) do not decode: {', '.join(undecodable)}")
    if not errs:
        errs.append(f"{sh.tar}: every sample decodes and lies within the file: the damage is elsewhere")
    return errs


def _check_shard(folder: Path, sh: ShardInfo, num_classes: int, deep: bool, keys: set, rep: SplitReport):
    """Errors of one shard (strings naming the shard)."""
    errs: list[str] = []
    tar, idx = folder / sh.tar, folder / sh.index
    for p in (tar, idx):
        if not p.is_file():
            return [f"{p.name}: missing (listed in the manifest)"]
    if tar.stat().st_size != sh.bytes:
        errs.append(f"{sh.tar}: {tar.stat().st_size} bytes, manifest says {sh.bytes}")
    if file_sha256(tar) != sh.sha256:
        errs.append(f"{sh.tar}: sha256 differs from the manifest (corrupt or replaced); rebuild it")
        return errs + (_diagnose_damaged(folder, sh) if deep else [])  # --deep names the damaged samples
    members: list[tuple[str, int, int, str]] = []
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar, "r:") as tf:
        for m in tf:
            if not m.isreg():
                errs.append(f"{sh.tar}: non-file member {m.name}")
                continue
            key, _, ext = m.name.partition(".")
            members.append((ext, m.offset_data, m.size, m.name))
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read() if (deep or ext != "jpg") else b""
    if len(samples) != sh.count:
        errs.append(f"{sh.tar}: {len(samples)} samples, manifest says {sh.count}")
    for key, comps in samples.items():
        if key in keys:
            errs.append(f"{sh.tar}: key {key} also appears in another shard")
        keys.add(key)
        if sorted(comps) != sorted(SAMPLE_EXTS):
            errs.append(f"{sh.tar}: sample {key} has components {sorted(comps)}, "
                        f"expected {sorted(SAMPLE_EXTS)}")
            continue
        cls_text, lbl = comps["cls"].decode("ascii", "replace"), decode_lbl(comps["lbl"])
        if cls_text != str(lbl):
            errs.append(f"{sh.tar}: sample {key}: cls {cls_text!r} != lbl {lbl}")
        if not 0 <= lbl < num_classes:
            errs.append(f"{sh.tar}: sample {key}: label {lbl} outside 0..{num_classes - 1}")
        rep.class_counts[lbl] = rep.class_counts.get(lbl, 0) + 1
        if deep:
            errs += _deep_check(sh.tar, key, comps, lbl)
    try:
        count, entries = read_index(idx)
    except (ValueError, UnicodeDecodeError) as exc:
        return errs + [f"{sh.index}: unreadable DALI index: {exc}"]
    flat = [e for sample in entries for e in sample]
    if count != len(entries) or count != len(samples):
        errs.append(f"{sh.index}: declares {count} samples, lists {len(entries)}, tar has {len(samples)}")
    if flat != members:
        pairs = enumerate(zip(flat, members, strict=False))
        bad = next((i for i, (a, b) in pairs if a != b), min(len(flat), len(members)))
        errs.append(f"{sh.index}: entry {bad} does not match the tar member (offset/size/name); "
                    "rebuild the shard")
    return errs[:MAX_ERRORS_PER_SHARD]


def _deep_check(tar_name: str, key: str, comps: dict[str, bytes], lbl: int) -> list[str]:
    errs = []
    try:
        with Image.open(io.BytesIO(comps["jpg"])) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                errs.append(f"{tar_name}: sample {key} is {img.format} {img.mode}, expected an RGB JPEG")
            img.load()
    except Exception as exc:  # any decoder failure is a finding, not a crash
        errs.append(f"{tar_name}: sample {key} does not decode: {exc}")
    try:
        if json.loads(comps["json"]).get("label") != lbl:
            errs.append(f"{tar_name}: sample {key}: json label differs from lbl {lbl}")
    except (ValueError, AttributeError) as exc:
        errs.append(f"{tar_name}: sample {key}: bad json component: {exc}")
    return errs


def verify_shards(out: str | Path, deep: bool = False, split: str | None = None,
                  progress: bool = True) -> VerifyReport:
    """Check ``out`` (all splits, or ``split``); never raises for a bad folder: see ``report.errors``."""
    if storage.is_remote(out):
        return _verify_remote(str(out), deep, split, progress)
    folder = Path(out)
    report = VerifyReport(folder=str(folder), deep=deep)
    try:
        manifest = load_manifest(folder)
        names = [split] if split is not None else sorted(manifest.splits)
        infos = {name: manifest.split(name) for name in names}
    except ShardFormatError as exc:
        report.errors.append(str(exc))
        return report
    report.num_classes = manifest.num_classes
    listed = {n for s in manifest.splits.values() for sh in s.shards for n in (sh.tar, sh.index)}
    for p in sorted(folder.iterdir()):
        if p.suffix in (".tar", ".idx") and p.name not in listed:
            report.warnings.append(f"{p.name} is not listed in the manifest")
    for name in foreign_files(folder):
        report.warnings.append(f"{name} is not a shard-folder file")
    total = sum(len(i.shards) for i in infos.values())
    with progress_bar(total=total, unit="shard", desc="verify-shards", disable=not progress) as bar:
        for name, info in infos.items():
            rep = report.splits[name] = SplitReport(shards=len(info.shards), skipped=len(info.skipped))
            keys: set[str] = set()
            for sh in info.shards:
                report.errors += _check_shard(folder, sh, manifest.num_classes, deep, keys, rep)
                rep.samples += sh.count
                rep.bytes += sh.bytes
                bar.update(1)
            if not info.shards:
                report.errors.append(f"split {name} has no shards")
    return report


def _verify_remote(url: str, deep: bool, split: str | None, progress: bool) -> VerifyReport:
    """``verify_shards`` of an object-store prefix: sizes from one listing, then each shard and its
    index downloaded once (four at a time) into a temporary folder and checked as a local one."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.schema import remote_listing

    report = VerifyReport(folder=url, deep=deep)
    try:
        manifest = load_manifest(url)
        names = [split] if split is not None else sorted(manifest.splits)
        infos = {name: manifest.split(name) for name in names}
        listing = remote_listing(url)
    except ShardFormatError as exc:
        report.errors.append(str(exc))
        return report
    report.num_classes = manifest.num_classes
    listed = {n for s in manifest.splits.values() for sh in s.shards for n in (sh.tar, sh.index)}
    for name in sorted(listing):
        if name.endswith((".tar", ".idx")) and "/" not in name and name not in listed:
            report.warnings.append(f"{name} is not listed in the manifest")
    client = storage.client_for(url)

    def check(sh: ShardInfo) -> tuple[list[str], dict]:
        for name in (sh.tar, sh.index):
            if name not in listing:
                return [f"{name}: missing (listed in the manifest)"], {}
        if listing[sh.tar][0] != sh.bytes:
            return [f"{sh.tar}: {listing[sh.tar][0]} bytes, manifest says {sh.bytes}"], {}
        with tempfile.TemporaryDirectory(prefix="verify-shards-") as tmp:
            try:
                client.download(sh.tar, Path(tmp) / sh.tar)
                client.download(sh.index, Path(tmp) / sh.index)
            except storage.ObjectStoreError as exc:
                return [str(exc)], {}
            part = SplitReport()
            errs = _check_shard(Path(tmp), sh, manifest.num_classes, deep, set(), part)
        return errs, part.class_counts

    total = sum(len(i.shards) for i in infos.values())
    with progress_bar(total=total, unit="shard", desc="verify-shards", disable=not progress) as bar:
        for name, info in infos.items():
            rep = report.splits[name] = SplitReport(shards=len(info.shards), skipped=len(info.skipped))
            with ThreadPoolExecutor(4) as pool:
                results = pool.map(check, info.shards)
                for sh, (errs, counts) in zip(info.shards, results, strict=True):
                    report.errors += errs
                    for lbl, n in counts.items():
                        rep.class_counts[lbl] = rep.class_counts.get(lbl, 0) + n
                    rep.samples += sh.count
                    rep.bytes += sh.bytes
                    bar.update(1)
            if not info.shards:
                report.errors.append(f"split {name} has no shards")
    return report


def verified_manifest_hash(out: str | Path, split: str) -> str:
    """The sha256 of ``out``'s manifest once every tar and index of ``split`` has passed
    ``verify_shards`` (size, sha256, members, labels, index entries); ``ShardFormatError`` naming the
    first problems otherwise. What evaluation records as the shards it measured on."""
    from pipeline.schema import manifest_sha256

    load_manifest(out)  # a missing or unreadable manifest: its own one-line error
    digest = manifest_sha256(out)
    report = verify_shards(out, split=split, progress=False)
    if not report.ok:
        more = f" (and {len(report.errors) - 3} more)" if len(report.errors) > 3 else ""
        raise ShardFormatError(
            f"{out}: split {split!r} does not match its manifest: {'; '.join(report.errors[:3])}{more} "
            f"(`verify-shards {out} --split {split}` lists them)"
        )
    return digest
