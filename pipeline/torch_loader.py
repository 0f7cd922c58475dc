"""The ``torch`` backend of ``make_loader``: WebDataset tar streaming + Pillow + a ``DataLoader``
with ``cfg.num_threads`` worker processes. The baseline the loader benchmark compares DALI with,
and the fallback where DALI is missing. No DALI import.

Library module, no CLI. Same epoch contract as DALI (``pipeline.loader``): rank ranges cut the
way DALI shards, rotating per epoch in training, exact counts, re-seeded per ``set_epoch``.
Each worker streams a contiguous slice of the rank's range made of whole batches (eval: the last
worker also holds the short tail), so the ``DataLoader`` only ever forms full batches plus at
most one smaller final eval batch. Workers return uint8 HWC crops; the main process converts
them on the target device (float, mean/std, layout, dtype: ``pipeline.multicrop.normalize``).

How close the crops are to DALI's ``decoders.image_random_crop`` + ``resize``:
- window sampling: the distributions of DALI's ``RandomCropGenerator`` (area uniform in
  ``crop_area`` of the image, aspect log-uniform in ``crop_aspect``, position uniform, 10
  attempts, then the centred square of the shorter side). The random streams differ, so crops
  are the same in distribution, not pixel for pixel.
- interpolation: both are antialiased bilinear (Pillow BILINEAR widens its kernel when
  downscaling, DALI's default linear filter antialiases); DALI decodes only the window (ROI
  decode) with libjpeg-turbo/nvJPEG, Pillow decodes the whole image with libjpeg-turbo: pixel
  values agree to within interpolation rounding.
- mirror: probability 0.5, as ``fn.random.coin_flip``. Eval and multi-crop share
  ``pipeline.multicrop.window_box`` with the DALI pipelines (same boxes to the pixel).
"""

from __future__ import annotations

import gc
import io
import math
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.config import DataConfig
from pipeline.loader import SplitSource, epoch_seed, handle_corrupt_sample
from pipeline.multicrop import apply_plan, crop_plan, normalize
from pipeline.schema import IMAGE_EXT, LABEL_EXT, decode_lbl

NUM_CROP_ATTEMPTS = 10  # as DALI's image_random_crop default (pipeline.dali_pipelines)


def random_crop_box(
    rng: random.Random, height: int, width: int, area: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-sized crop (GoogLeNet/Inception "RandomResizedCrop")."""
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(NUM_CROP_ATTEMPTS):
        target = rng.uniform(*area) * height * width
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)  # DALI RandomCropGenerator's fallback: the centred square
    return (height - side) // 2, (width - side) // 2, side, side


def iter_tar_samples(tar_path: str):
    """``(key, {ext: bytes})`` of a WebDataset tar, in stored order."""
    with open(tar_path, "rb") as f:
        files = ({**s, "__url__": tar_path} for s in tar_file_iterator(f))
        for sample in group_by_keys(files):
            yield sample["__key__"], sample


def shuffle_buffer(items, size: int, rng: random.Random):
    """WebDataset-style shuffle: fill a buffer, emit a random element, refill (like DALI's initial_fill)."""
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardRangeDataset(IterableDataset):
    """Samples of one rank's range for one epoch, split among DataLoader workers by whole batches."""

    def __init__(self, cfg: DataConfig, source: SplitSource, mode: str, crops: int = 1) -> None:
        self.cfg, self.source, self.mode = cfg, source, mode
        self.plan = crop_plan(crops if mode == "multicrop" else 1, cfg.image_size, cfg.val_resize)
        self.epoch = 0

    def worker_range(self, epoch: int, worker: int, num_workers: int) -> tuple[int, int]:
        start, _ = self.source.sample_range(self.source.shard_of(epoch))
        n, b = self.source.num_samples(self.cfg.batch_size), self.cfg.batch_size
        batches = math.ceil(n / b)
        first, last = batches * worker // num_workers, batches * (worker + 1) // num_workers
        return start + first * b, start + min(last * b, n)

    def _read(self, start: int, stop: int):
        offset = 0
        for tar, count in zip(self.source.tars, self.source.counts, strict=True):
            if offset + count > start and offset < stop:
                for i, (key, sample) in enumerate(iter_tar_samples(tar)):
                    if start <= offset + i < stop:
                        yield tar, key, sample
                    elif offset + i >= stop:
                        break
            offset += count

    def _transform(self, rng: random.Random, jpeg: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(jpeg))
        img = img.convert("RGB")
        if self.mode != "train":
            out = apply_plan(img, self.plan, self.cfg.image_size)
            return out[0] if self.mode == "eval" else out
        top, left, h, w = random_crop_box(
            rng, img.height, img.width, self.cfg.crop_area, self.cfg.crop_aspect
        )
        s = self.cfg.image_size
        arr = np.array(img.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h)))
        return np.ascontiguousarray(arr[:, ::-1]) if rng.random() < 0.5 else arr

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start, stop = self.worker_range(self.epoch, worker, num_workers)
        rng = random.Random(epoch_seed(self.cfg.seed, self.epoch, self.source.rank, 1 + worker))
        samples = self._read(start, stop)
        if self.mode == "train":
            samples = shuffle_buffer(samples, self.cfg.shuffle_buffer, rng)
        owed = 0  # train + skip_corrupt: repeat the next good sample to keep batches full
        for tar, key, sample in samples:
            try:
                image = self._transform(rng, sample[IMAGE_EXT])
                label = decode_lbl(sample[LABEL_EXT])
            except (OSError, ValueError, KeyError, SyntaxError) as exc:
                handle_corrupt_sample(key, tar, exc, self.cfg.skip_corrupt)
                owed += self.mode == "train"
                continue
            yield torch.from_numpy(image), label
            while owed:
                owed -= 1
                yield torch.from_numpy(self._transform(rng, sample[IMAGE_EXT])), label


class TorchLoader:
    """``Loader`` over a Pillow ``DataLoader`` (see module docstring)."""

    def __init__(self, cfg: DataConfig, source: SplitSource, device: torch.device, mode: str, crops: int = 1):
        self.cfg, self.source, self.device, self.mode = cfg, source, device, mode
        cut = source.truncated()
        if cut:  # named before any worker streams into the cut
            t, key, reason = cut[0]
            if cfg.skip_corrupt:
                reason += "; the torch backend streams whole tars and cannot skip past a cut"
                reason += " (data.backend=dali can)"
            handle_corrupt_sample(key, source.tars[t], reason, skip=False)
        self.crops = crops if mode == "multicrop" else 1
        self.batch_size = cfg.batch_size
        self.num_samples = source.num_samples(cfg.batch_size)
        self.class_names = list(source.class_names)
        self.dataset = ShardRangeDataset(cfg, source, mode, crops)
        self._len = source.num_batches(cfg.batch_size)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = int(epoch)

    def __iter__(self):
        # Workers are forked. A DALI pipeline left as cyclic garbage in this process would be
        # collected inside a forked worker, where its threads do not exist, and its shutdown
        # deadlocks the worker (seen with DALI and torch loaders in one process): collect it here.
        gc.collect()
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.cfg.num_threads,
            prefetch_factor=self.cfg.prefetch,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,  # workers are forked per epoch and see the new epoch
        )
        count = 0
        for images, labels in loader:
            if count == self._len:
                break
            count += 1
            if self.mode == "multicrop":  # [B, K, S, S, 3] -> [B*K, S, S, 3]
                images = images.reshape(-1, *images.shape[2:])
            yield normalize(images, self.cfg, self.device), labels.to(self.device).long()
