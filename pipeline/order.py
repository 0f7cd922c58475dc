"""The one definition of a split's samples and of the order in which every backend reads them.

Library module, no CLI. ``pipeline.dali_loader`` and ``pipeline.torch_loader`` both read through
this module; ``pipeline.loader`` only chooses the backend.

- ``SampleTable``: the usable samples of a split in manifest order, from the DALI index files
  (tar, key, byte offsets of the JPEG and of the label); samples cut off by a short tar are marked.
  Samples that ``build-shards`` skipped were never written, so they never enter the order.
- ``SampleOrder``: for epoch ``e`` one permutation of all samples, a pure function of
  ``(data.seed, e)`` and the table, independent of the world size; quarantined samples are left out.
  Global step ``t`` consumes positions ``[t*G, (t+1)*G)`` with ``G = batch_size * world_size`` and
  rank ``r`` takes the ``batch_size`` slice ``r`` of it. Training drops the tail that does not fill
  a global batch. Evaluation reads manifest order, rank ``r`` the range ``[n*r//W, n*(r+1)//W)``,
  so every sample is seen exactly once across ranks. A position in an epoch is the number of
  samples the whole job has consumed, so it survives a change of world size (elastic resume).
- Augmentation is a pure function of ``(data.seed, epoch, position)`` (``crop_params``): the random
  crop window and the mirror of the sample at a position are the same on any rank, in any world
  size, before and after a resume, and in both backends.
- ``Quarantine``: samples that failed to decode at read time, with where and why. A failed sample
  is replaced in its batch by ``SampleOrder.substitute`` (deterministic), so every rank yields the
  same number of batches; later epochs leave it out. Records name the shard and the key, so they
  survive a resume (checkpoints hold them) and travel between ranks.
"""

from __future__ import annotations

import math
import mmap
import random
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

ORDER_STREAM = 0x0D3E  # seed-sequence word that separates the order from other random streams
NUM_CROP_ATTEMPTS = 10  # DALI's image_random_crop default, kept by both backends


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


# --- the order --------------------------------------------------------------------------------------
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of ``range(n)`` for an epoch: a pure function of ``(seed, epoch, n)``."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([ORDER_STREAM, seed, epoch])))
    return rng.permutation(n)


@dataclass(frozen=True)
class Batch:
    """One rank's batch: sample indices and their global positions in the epoch's order."""

    ids: np.ndarray
    positions: np.ndarray
    step: int  # batch number in the epoch (global step within the epoch)


class SampleOrder:
    """Which samples each rank reads, in which order, for each epoch (see module docstring)."""

    def __init__(
        self,
        table: SampleTable,
        quarantine: Quarantine,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
    ) -> None:
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.table, self.quarantine = table, quarantine
        self.seed, self.batch_size, self.rank, self.world_size, self.train = (
            seed,
            batch_size,
            rank,
            world_size,
            train,
        )
        self._cache: tuple[int, int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """Every sample read in the epoch, in order (all ranks together). Training leaves out the
        samples quarantined before the epoch began (those found during it are substituted, so the
        positions of the epoch never move); evaluation leaves out every quarantined sample."""
        excluded = self.quarantine.ids(before_epoch=epoch if self.train else None)
        key = (epoch if self.train else -1, len(excluded))
        if self._cache is not None and self._cache[:2] == key:
            return self._cache[2]
        n = len(self.table)
        ids = epoch_permutation(self.seed, epoch, n) if self.train else np.arange(n, dtype=np.int64)
        if len(excluded):
            ids = ids[~np.isin(ids, excluded)]
        self._cache = (*key, ids)
        return ids

    def steps(self, epoch: int, start: int = 0) -> int:
        """Train: global steps of the epoch from position ``start`` (full global batches only).
        Eval: this rank's batches."""
        n = len(self.epoch_ids(epoch))
        if self.train:
            return max(n - start, 0) // self.global_batch
        lo, hi = self.eval_range(n)
        return math.ceil((hi - lo) / self.batch_size)

    def num_samples(self, epoch: int) -> int:
        """Samples this rank yields in a whole epoch."""
        if self.train:
            return self.steps(epoch) * self.batch_size
        lo, hi = self.eval_range(len(self.epoch_ids(epoch)))
        return hi - lo

    def eval_range(self, n: int) -> tuple[int, int]:
        w, r = self.world_size, self.rank
        return n * r // w, n * (r + 1) // w

    def batches(self, epoch: int, start: int = 0) -> list[Batch]:
        """This rank's batches of an epoch from global position ``start`` (samples the whole job has
        consumed in that epoch; any number after an elastic resume)."""
        ids = self.epoch_ids(epoch)
        b = self.batch_size
        out = []
        if self.train:
            g = self.global_batch
            for t in range(self.steps(epoch, start)):
                lo = start + t * g + self.rank * b
                out.append(Batch(ids[lo : lo + b], np.arange(lo, lo + b), t))
            return out
        lo, hi = self.eval_range(len(ids))
        for t, a in enumerate(range(lo, hi, b)):
            z = min(a + b, hi)
            out.append(Batch(ids[a:z], np.arange(a, z), t))
        return out

    def substitute(self, epoch: int, position: int) -> int:
        """The sample that takes the place of a quarantined one at ``position`` in an epoch: the first
        sample not quarantined from half an epoch further on in the epoch's order (cyclic): far from
        the batch, and the same on every rank and after a resume."""
        ids = self.epoch_ids(epoch)
        n = len(ids)
        for j in range(n):
            cand = int(ids[(position + n // 2 + j) % n])
            if cand not in self.quarantine:
                return cand
        raise CorruptSampleError("every sample of this split is quarantined; rebuild the shards")


# --- augmentation -----------------------------------------------------------------------------------
def position_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The random stream of one position of one epoch (crop window, mirror)."""
    return random.Random((int(seed) << 96) ^ (int(epoch) << 48) ^ int(position))


def random_crop_box(
    rng: random.Random, height: int, width: int, area: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-sized crop (GoogLeNet/Inception "RandomResizedCrop"), with the
    distributions of DALI's ``RandomCropGenerator``: area uniform in ``area`` of the image, aspect
    log-uniform in ``aspect``, position uniform, 10 attempts, then the centred square."""
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(NUM_CROP_ATTEMPTS):
        target = rng.uniform(*area) * height * width
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_params(
    seed: int, epoch: int, position: int, height: int, width: int, area, aspect
) -> tuple[int, int, int, int, bool]:
    """``(top, left, h, w, mirror)`` of the training transform at a position of an epoch."""
    rng = position_rng(seed, epoch, position)
    top, left, h, w = random_crop_box(rng, height, width, tuple(area), tuple(aspect))
    return top, left, h, w, rng.random() < 0.5


BRIGHTNESS_DELTA = 32.0  # TF-slim distort_color: random_brightness(max_delta=32. / 255.), in [0, 255] units
SATURATION_RANGE = (0.5, 1.5)  # TF-slim distort_color: random_saturation(lower=0.5, upper=1.5)


def color_params(seed: int, epoch: int, position: int) -> tuple[float, float]:
    """``(brightness shift in [0, 255] units, saturation factor)`` at a position of an epoch: a stream
    of its own, so switching the distortion on leaves every crop and mirror as it was."""
    rng = random.Random((1 << 160) | (int(seed) << 96) ^ (int(epoch) << 48) ^ int(position))
    return rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), rng.uniform(*SATURATION_RANGE)


def distort_color(image: np.ndarray, brightness: float, saturation: float) -> np.ndarray:
    """The reference of the colour distortion on a uint8 HWC image, as DALI computes it: brightness
    shift clamped to [0, 255], then saturation as a blend with the ITU-R 601 luma (DALI's ``hsv``
    works in YIQ, where scaling saturation is exactly that blend; Pillow's ``ImageEnhance.Color``
    too)."""
    x = np.clip(image.astype(np.float32) + brightness, 0, 255).round()
    luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = luma[..., None] + saturation * (x - luma[..., None])
    return np.clip(x, 0, 255).round().astype(np.uint8)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(buf) -> tuple[int, int]:
    """``(height, width)`` from a JPEG's frame header, without decoding; ValueError when there is none."""
    b = bytes(buf[:2])
    if b != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {i}")
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if marker in _SOF:
            if i + 9 > n:
                break
            h = (buf[i + 5] << 8) | buf[i + 6]
            w = (buf[i + 7] << 8) | buf[i + 8]
            if h == 0 or w == 0:
                raise ValueError("JPEG frame header with a zero dimension")
            return h, w
        if marker in (0xD9, 0xDA):
            break
        i += 2 + length
    raise ValueError("JPEG without a frame header")


# --- checks -----------------------------------------------------------------------------------------
def prepare_table(table: SampleTable, quarantine: Quarantine, skip_corrupt: bool) -> None:
    """Samples cut off by a short tar: an error naming the first, or quarantined with ``skip_corrupt``."""
    for i, reason in table.truncated.items():
        shard, key = table.name(i)
        if not skip_corrupt:
            raise corrupt_sample_error(key, table.tars[int(table.tar_of[i])], reason) from None
        if quarantine.add(i, reason):
            warnings.warn(f"quarantined sample {key!r} of shard {shard} ({reason})", stacklevel=3)


def check_split_size(order: SampleOrder, split: str, shards: str) -> None:
    """A split too small for one global batch (train) or for one sample per rank (eval): one line."""
    if order.steps(0) == 0:
        what = (
            f"one global batch ({order.batch_size} x {order.world_size} rank(s) = {order.global_batch})"
            if order.train
            else f"{order.world_size} rank(s)"
        )
        raise ShardFormatError(
            f"split {split!r} of {shards} has {len(order.epoch_ids(0))} usable samples: fewer than {what}; "
            "lower data.batch_size or add data"
        )


# --- what both backends share -----------------------------------------------------------------------
class OrderedLoader:
    """The state every backend's loader keeps: the split's table, its quarantine, the order, the epoch
    and the position to start from. Backends implement ``__iter__`` over ``self.plan()``.

    After each yielded batch, ``position`` is the number of samples the whole job has consumed in the
    epoch (what a mid-epoch checkpoint records) and ``last_batch`` holds the sample indices actually
    yielded (after substitution) with their positions."""

    def __init__(self, cfg, split: str, rank: int, world_size: int, mode: str, crops: int = 1) -> None:
        self.cfg, self.split, self.mode = cfg, split, mode
        self.crops = crops if mode == "multicrop" else 1
        self.table = SampleTable.load(cfg.shards, split)
        self.quarantine = Quarantine(self.table)
        prepare_table(self.table, self.quarantine, cfg.skip_corrupt)
        self.order = SampleOrder(
            self.table, self.quarantine, cfg.seed, cfg.batch_size, rank, world_size, train=mode == "train"
        )
        check_split_size(self.order, split, cfg.shards)
        self.reader = SampleReader(self.table)
        self.class_names = list(self.table.class_names)
        self.batch_size = cfg.batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0
        self.position = 0
        self.last_batch: Batch | None = None

    @property
    def num_samples(self) -> int:
        return self.order.num_samples(self.epoch)

    def __len__(self) -> int:
        """Batches of a whole epoch (training: global steps; the same on every rank)."""
        return self.order.steps(self.epoch)

    def remaining(self) -> int:
        """Batches the next pass yields (from ``start``)."""
        return self.order.steps(self.epoch, self.start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next pass reads ``epoch`` from global position ``start`` (samples already consumed by
        the whole job in that epoch; 0 = from the beginning)."""
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        self.epoch, self.start = int(epoch), int(start)
        self.position = self.start

    def plan(self) -> list[Batch]:
        return self.order.batches(self.epoch, self.start if self.mode == "train" else 0)

    def advanced(self, batch: Batch, ids) -> None:
        """Record a yielded batch (``ids``: the samples actually in it)."""
        self.last_batch = Batch(np.asarray(ids, dtype=np.int64), batch.positions, batch.step)
        if self.mode == "train":
            self.position = self.start + (batch.step + 1) * self.order.global_batch

    def bad_sample(self, i: int, reason: object) -> None:
        """A sample failed to decode: the named error, or quarantine it (named once)."""
        shard, key = self.table.name(i)
        if not self.cfg.skip_corrupt:
            raise corrupt_sample_error(key, self.table.tars[int(self.table.tar_of[i])], reason) from None
        if self.quarantine.add(i, str(reason), self.epoch if self.mode == "train" else -1):
            warnings.warn(f"quarantined corrupt sample {key!r} of shard {shard} ({reason})", stacklevel=2)

    def resolve(self, i: int, position: int) -> int | None:
        """The sample read at ``position``: ``i``, or its substitute if ``i`` is quarantined
        (training); None when an evaluation pass must leave it out."""
        i = int(i)
        if i not in self.quarantine:
            return i
        return self.order.substitute(self.epoch, position) if self.mode == "train" else None

    def color(self, position: int) -> tuple[float, float]:
        return color_params(self.cfg.seed, self.epoch, position)

    def crop(self, position: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
        return crop_params(
            self.cfg.seed, self.epoch, position, height, width, self.cfg.crop_area, self.cfg.crop_aspect
        )
