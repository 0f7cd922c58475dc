"""The ``torch`` backend of ``make_loader``: Pillow decoding in a ``DataLoader`` with
``cfg.num_threads`` worker processes, reading each sample by offset from the tars
(``pipeline.samples.SampleReader``) in the order of ``pipeline.order``. The baseline the loader
benchmark compares DALI with (it reads the same order), and the fallback where DALI is missing. No
DALI import.

Library module, no CLI. The batch sampler hands the workers this rank's batches of the epoch (from
the start position), so the ``DataLoader`` yields them in order. Workers return uint8 HWC crops; the
main process converts them on the target device (float, mean/std, layout, dtype:
``pipeline.multicrop.normalize``).

Crops are DALI's: the same window and mirror per position (``pipeline.augment.crop_params``), cut from
the decoded image and resized with antialiased bilinear filtering (Pillow BILINEAR widens its kernel
when downscaling, like DALI's default linear filter); DALI decodes only the window with
libjpeg-turbo/nvJPEG, Pillow the whole image with libjpeg-turbo, so pixel values agree to within
interpolation rounding. Eval and multi-crop share ``pipeline.multicrop.window_box`` with the DALI
pipelines (same boxes to the pixel).

A sample that fails to decode is replaced in its batch by its substitute (training) or left out
(evaluation) inside the worker, which reports it with the batch; the main process names it once and
quarantines it (or raises the named error without ``data.skip_corrupt``).
"""

from __future__ import annotations

import gc
import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.augment import distort_color
from pipeline.multicrop import apply_plan, crop_plan, normalize
from pipeline.order import OrderedLoader
from pipeline.samples import ShardTruncatedError

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class OrderedDataset(Dataset):
    """Item ``k`` = batch ``k`` of the pass: ``(uint8 images, labels, [(bad sample, reason)])``."""

    def __init__(self, loader: TorchLoader) -> None:
        self.loader = loader
        self.batches = []

    def __len__(self) -> int:
        return len(self.batches)

    def _image(self, jpeg: bytes, position: int) -> np.ndarray:
        ld = self.loader
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        if ld.mode != "train":
            out = apply_plan(img, ld.plan_windows, ld.cfg.image_size)
            return out[0] if ld.mode == "eval" else out
        top, left, h, w, mirror = ld.crop(position, img.height, img.width)
        s = ld.cfg.image_size
        arr = np.array(img.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h)))
        if ld.cfg.color_distortion:
            arr = distort_color(arr, *ld.color(position))
        return np.ascontiguousarray(arr[:, ::-1]) if mirror else arr

    def __getitem__(self, k: int):
        ld, batch = self.loader, self.batches[k]
        ld.reader.prefetch(batch.ids)  # object storage: the batch's uncached samples, coalesced
        images, labels, ids, bad = [], [], [], []
        for i, pos in zip(batch.ids, batch.positions, strict=True):
            j = ld.resolve(i, int(pos))
            while j is not None:
                try:
                    jpeg, label = ld.reader.sample(j)
                    images.append(self._image(jpeg, int(pos)))
                    labels.append(label)
                    ids.append(j)
                    break
                except DECODE_ERRORS as exc:
                    bad.append(
                        (
                            j,
                            str(exc)
                            if isinstance(exc, ShardTruncatedError)
                            else f"{type(exc).__name__}: {exc}",
                        )
                    )
                    if not ld.cfg.skip_corrupt:
                        break  # the main process raises the named error
                    ld.quarantine.add(j, str(exc), ld.epoch)  # this worker's copy: pick another substitute
                    j = ld.resolve(j, int(pos))
        stacked = torch.from_numpy(np.stack(images)) if images else torch.empty(0, dtype=torch.uint8)
        return stacked, torch.tensor(labels, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64), bad


class TorchLoader(OrderedLoader):
    """``Loader`` over a Pillow ``DataLoader`` reading the global order (see module docstring)."""

    def __init__(self, cfg, split, rank, world_size, device: torch.device, mode: str, crops: int = 1):
        super().__init__(cfg, split, rank, world_size, mode, crops)
        self.device = device
        self.plan_windows = crop_plan(self.crops, cfg.image_size, cfg.val_resize)
        self.dataset = OrderedDataset(self)

    def __iter__(self):
        # Workers are forked. A DALI pipeline left as cyclic garbage in this process would be
        # collected inside a forked worker, where its threads do not exist, and its shutdown
        # deadlocks the worker (seen with DALI and torch loaders in one process): collect it here.
        gc.collect()
        batches = self.plan()
        self.dataset.batches = batches
        loader = DataLoader(
            self.dataset,
            batch_size=None,  # items are whole batches
            num_workers=self.cfg.num_threads,
            prefetch_factor=self.cfg.prefetch,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,  # workers are forked per pass and see the current quarantine
            # The workers' base seed comes from this generator, not from the global torch RNG: a pass
            # started after a resume must leave the training's random streams (dropout) where the
            # checkpoint put them. Nothing in a worker is random (crops are functions of the position).
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        for k, (images, labels, ids, bad) in enumerate(loader):
            for i, reason in bad:
                self.bad_sample(int(i), reason)  # raises unless skip_corrupt
            if len(ids) == 0:  # an evaluation batch whose every sample is damaged: nothing to yield
                continue
            self.advanced(batches[k], ids.tolist())
            if self.mode == "multicrop":  # [B, K, S, S, 3] -> [B*K, S, S, 3]
                images = images.reshape(-1, *images.shape[2:])
            yield normalize(images, self.cfg, self.device), labels.to(self.device)
