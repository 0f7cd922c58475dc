"""The DALI backend of ``make_loader``: reads each sample's JPEG bytes by offset from the
tars in the order of ``pipeline.order`` and feeds them to a DALI pipeline through
``fn.external_source`` (GPU "mixed" decoding where the loader has a CUDA device, CPU operators
otherwise); turns DALI failures into errors that name the shard and key, or quarantines the sample.

Library module, no CLI. Imports DALI at import time (``pipeline.loader`` imports it lazily).

- One pipeline for the loader's lifetime: nothing in it depends on the epoch (the order, the crop
  windows and the mirror flags come with each batch), so a pass resets it instead of rebuilding it,
  and "mixed" decoding sizes nvJPEG's buffers once per run. A pass abandoned half-way (smoke runs)
  leaves batches in flight, so the next pass builds afresh.
- Training: per sample, the JPEG's frame header gives its size (no decode), ``pipeline.augment.crop_params``
  the window and the mirror of its position; DALI decodes only the window (``decoders.image_slice``,
  the ROI decoding that ``image_random_crop`` does), resizes, mirrors and normalises.
- Batches are ``[B, 3, S, S]``; with layout NHWC (the default on CUDA) DALI writes HWC and the batch
  is the permuted view of that memory, channels-last as the GPU convolutions want it, without a copy.
- Corrupt samples: a JPEG without a frame header is caught before DALI sees it. A batch that DALI
  fails to decode is replayed sample by sample on the CPU to find the culprit, which is named
  (``CorruptSampleError``) or, with ``data.skip_corrupt``, quarantined; the pass then resumes at that
  batch with a new pipeline, the culprit replaced by its deterministic substitute (training) or
  left out (evaluation).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.config import NORMALIZATIONS, resolve_layout
from pipeline.dali_pipelines import (
    PipelineSpec,
    decode_check_pipeline,
    eval_pipeline,
    multicrop_pipeline,
    train_pipeline,
)
from pipeline.jpeg import jpeg_size
from pipeline.multicrop import crop_plan, unmirrored
from pipeline.order import Batch, OrderedLoader
from pipeline.samples import CorruptSampleError

PIPELINES = {"train": train_pipeline, "eval": eval_pipeline, "multicrop": multicrop_pipeline}


def dali_error_summary(exc: BaseException) -> str:
    """The operator's own words from a DALI pipeline error (the line after "encountered:")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln == "encountered:" and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else type(exc).__name__


class Feeder:
    """The ``external_source`` callback: one pass's batches, in order. A background thread prepares
    them (``DaliLoader.prepare``: offsets, frame headers, crop windows) up to ``LOOKAHEAD`` batches
    ahead, so that DALI's calls, made from the iterating thread, only hand over ready arrays; DALI
    reads those arrays in place (``no_copy``), so the last few batches are kept alive here.
    ``sent[k]`` holds the samples and labels of batch ``k`` from DALI's call until the batch is
    yielded. An evaluation batch whose every sample turned out damaged is skipped (``skipped``)."""

    LOOKAHEAD = 4

    def __init__(self, loader: DaliLoader) -> None:
        # weak: the loader holds the pipeline, which holds this feeder; a strong reference back would
        # make a cycle that keeps DALI's and torch's (GPU) buffers until the garbage collector runs
        self._loader = weakref.ref(loader)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._alive: deque = deque(maxlen=loader.cfg.prefetch + self.LOOKAHEAD + 2)
        self.reset([])

    def reset(self, batches: list[Batch], first: int = 0) -> None:
        self.stop()
        self.batches, self.next, self.sent, self.skipped = batches, first, {}, []
        self.error: BaseException | None = None
        self._error_at = -1
        self._ready: dict[int, tuple] = {}
        self._produce, self._stopping = first, False
        if first < len(batches):
            self._thread = threading.Thread(target=self._run, name="dali-feeder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            with self._cv:
                self._stopping = True
                self._cv.notify_all()
            thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and self._produce - self.next >= self.LOOKAHEAD:
                    self._cv.wait()
                if self._stopping or self._produce >= len(self.batches):
                    return
                k = self._produce
            try:
                loader = self._loader()
                if loader is None:
                    return
                result = loader.prepare(self.batches[k])
                del loader
            except BaseException as exc:  # handed to DALI's call for batch k, then re-raised by us
                with self._cv:
                    self.error, self._error_at = exc, k
                    self._cv.notify_all()
                return
            with self._cv:
                self._ready[k] = result
                self._produce += 1
                self._cv.notify_all()

    def __call__(self):
        while True:
            if self.next >= len(self.batches):
                raise StopIteration
            k = self.next
            with self._cv:
                while k not in self._ready and self._error_at != k:
                    self._cv.wait()
                if k not in self._ready:
                    raise self.error  # DALI wraps it; DaliLoader re-raises ours
                prepared = self._ready.pop(k)
                self.next += 1
                self._cv.notify_all()
            if prepared is None:  # nothing left of this evaluation batch
                self.skipped.append(k)
                continue
            ids, labels, outputs = prepared
            self.sent[k] = (ids, labels)
            self._alive.append(outputs)
            return outputs


class DaliLoader(OrderedLoader):
    """``Loader`` over one DALI pipeline fed in the global order (see module docstring)."""

    def __init__(
        self, cfg, split, rank, world_size, device: torch.device, device_id: int | None, mode, crops=1
    ):
        super().__init__(cfg, split, rank, world_size, mode, crops)
        self.device, self.device_id = device, device_id
        self.plan_windows = crop_plan(crops, cfg.image_size, cfg.val_resize) if mode == "multicrop" else ()
        self.layout = resolve_layout(cfg.layout, device.type)
        self.builds = 0  # pipelines built so far (one per loader unless a pass was abandoned or failed)
        self._feeder = Feeder(self)
        self._pipe = None
        self._batches = None  # DALIGenericIterator of the pipeline
        self._complete = False  # the last pass ran to its end: the pipeline can be reset and reused

    def spec(self) -> PipelineSpec:
        mean, std = NORMALIZATIONS[self.cfg.normalization]
        return PipelineSpec(
            decoder_device="mixed" if self.device_id is not None else "cpu",
            image_size=self.cfg.image_size,
            val_resize=self.cfg.val_resize,
            mean=tuple(mean),
            std=tuple(std),
            layout=self.layout,
            half=self.cfg.dtype == "float16",
            windows=unmirrored(self.plan_windows),
            color=self.cfg.color_distortion and self.mode == "train",
            preallocate=self.cfg.dali_preallocate,
        )

    # --- feeding --------------------------------------------------------------------------------
    def prepare(self, batch: Batch):
        """``(sample indices, labels, external_source outputs)`` of one batch (called by the
        ``Feeder``); None for an evaluation batch whose samples are all quarantined."""
        ids, labels, jpegs, anchors, shapes, mirrors, colors = [], [], [], [], [], [], []
        self.reader.prefetch(batch.ids)  # object storage: the batch's uncached samples, coalesced
        for i, pos in zip(batch.ids, batch.positions, strict=True):
            while True:
                j = self.resolve(i, int(pos))
                if j is None:
                    break  # evaluation: a quarantined sample is left out
                try:
                    buf, label = self.reader.sample(j)
                    height, width = jpeg_size(buf)
                except ValueError as exc:  # no frame header, or a tar that shrank while it was read
                    self.bad_sample(j, exc)  # raises unless skip_corrupt; then i resolves anew
                    i = j
                    continue
                break
            if j is None:
                continue
            ids.append(j)
            labels.append(label)
            jpegs.append(np.frombuffer(buf, dtype=np.uint8))
            if self.mode == "train":
                top, left, h, w, mirror = self.crop(int(pos), height, width)
                anchors.append((left, top))
                shapes.append((w, h))
                mirrors.append(mirror)
                if self.cfg.color_distortion:
                    brightness, saturation = self.color(int(pos))
                    colors.append((brightness / 255.0, saturation))
        if not ids:
            if self.mode != "train":
                return None  # evaluation leaves damaged samples out, here all of them
            raise CorruptSampleError(f"every sample of batch {batch.step} of split {self.split!r} is damaged")
        if self.mode == "train":  # uniform per-sample values go as one array each (one conversion)
            outputs = (
                jpegs,
                np.asarray(anchors, dtype=np.float32),
                np.asarray(shapes, dtype=np.float32),
                np.asarray(mirrors, dtype=np.int32),
            )
            if self.cfg.color_distortion:
                c = np.asarray(colors, dtype=np.float32)
                outputs += (np.ascontiguousarray(c[:, 0]), np.ascontiguousarray(c[:, 1]))
            return ids, labels, outputs
        return ids, labels, jpegs

    # --- iteration ------------------------------------------------------------------------------
    def _build(self):
        pipe = PIPELINES[self.mode](
            spec=self.spec(),
            source=self._feeder,
            batch_size=self.batch_size,
            num_threads=self.cfg.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.cfg.prefetch,
            seed=0,  # nothing random inside: crops and mirrors come with the batch
        )
        pipe.build()
        self.builds += 1
        return pipe

    def _start(self, batches: list[Batch], first: int) -> None:
        """Point the feeder at a pass and (re)start the pipeline; DALI fetches the first batches now."""
        self._feeder.reset(batches, first)
        if self._complete and first == 0:
            self._complete = False
            self._batches.reset()  # schedules the first batches of the new pass
            return
        self._complete = False
        self._batches = self._pipe = None
        self._pipe = self._build()
        self._batches = DALIGenericIterator(
            self._pipe, ["images"], last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False
        )

    def __iter__(self):
        try:
            yield from self._iterate()
        finally:
            self._feeder.stop()  # an abandoned pass: its preparing thread ends here

    def close(self) -> None:
        """Stop the feeder, drop the pipeline and close the tars (a later pass rebuilds what it needs)."""
        self._feeder.stop()
        self._complete = False
        self._batches = self._pipe = None
        super().close()

    def _iterate(self):
        batches = self.plan()
        k = 0  # the first batch not yet yielded (or skipped): where a pass resumes after a failure
        while k < len(batches):
            try:
                self._start(batches, k)
                for out in self._batches:
                    k = min(self._feeder.sent)  # DALI returns batches in the order it asked for them
                    ids, labels = self._feeder.sent.pop(k)
                    images = self._convert(out[0]["images"])
                    self.advanced(batches[k], ids)
                    k += 1
                    yield images, torch.tensor(labels, dtype=torch.int64).to(self.device, non_blocking=True)
                self._complete = True
            except RuntimeError as exc:
                if self._feeder.error is not None:  # ours, raised in the callback (DALI wraps it)
                    raise self._feeder.error from None
                self._handle_failure(exc, batches, k)  # raises unless a culprit was quarantined
                continue
            if self._feeder.next != len(batches) or self._feeder.sent:
                raise RuntimeError(
                    f"DALI pipeline on rank {self.rank} ended after {k} of {len(batches)} batches"
                )
            k = len(batches)  # the batches after the last yielded one were skipped

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        nhwc = self.layout == "NHWC"
        if self.mode == "multicrop":  # [B, K/2, ...] unmirrored windows -> [B*K, ...] with mirrors
            b = images.shape[0]
            flipped = images.flip(3 if nhwc else 4)  # the width axis of [B, K/2, H, W, C] / [B, K/2, C, H, W]
            both = images if self.crops == 1 else torch.stack((images, flipped), dim=2)
            images = both.reshape(b * self.crops, *images.shape[2:])
        if nhwc:  # [B, S, S, 3] -> [B, 3, S, S]: a view, channels-last in memory
            images = images.permute(0, 3, 1, 2)
        return images

    # --- corrupt samples ------------------------------------------------------------------------
    def _handle_failure(self, exc: BaseException, batches: list[Batch], k: int) -> None:
        self._complete = False
        self._batches = self._pipe = None  # batches in flight: the next attempt builds afresh
        what = dali_error_summary(exc)
        sent = [ids for step, (ids, _) in sorted(self._feeder.sent.items()) if step >= k]
        bad = self.find_corrupt([i for ids in sent for i in ids])
        if bad is None:
            raise RuntimeError(
                f"DALI pipeline failed on rank {self.rank} ({what}); every sample of the batches in flight "
                f"decodes on the CPU, so this is not a data error"
            ) from None
        self.bad_sample(bad, what)  # raises unless skip_corrupt

    def find_corrupt(self, ids: list[int]) -> int | None:
        """The first of ``ids`` that DALI cannot decode on the CPU, one sample per run."""
        queue = list(ids)
        current = []

        def source():
            current[:] = [queue.pop(0)]
            return [np.frombuffer(self.reader.sample(current[0])[0], dtype=np.uint8)]

        pipe = decode_check_pipeline(
            source=source,
            batch_size=1,
            num_threads=1,
            device_id=None,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        pipe.build()
        try:
            while queue:
                try:
                    pipe.run()
                except RuntimeError:
                    return current[0]
        finally:
            del pipe
        return None
