"""The DALI backend of ``make_loader``: builds the pipelines, iterates them through
``DALIGenericIterator`` (named reader + explicit last-batch policy), trims the epoch to the
length announced up front, and turns DALI failures into errors that name the shard and key.

Library module, no CLI. Imports DALI at import time (``pipeline.loader`` imports it lazily).

Pipelines and epochs:
- train: one pipeline per epoch, built at ``__iter__`` with seed ``f(cfg.seed, epoch, rank)`` on the
  epoch's DALI shard, so an epoch's shuffle order and crops are reproducible on resume and the
  reader starts at the beginning of its shard. ``LastBatchPolicy.DROP``; we stop after
  ``(N // W) // B`` batches (identical on every rank). The build costs milliseconds on CPU plus,
  with "mixed" decoding, nvJPEG's pre-sized buffers once per epoch (``make gpu-check`` reports it).
- eval / multi-crop: one pipeline for the loader's lifetime (the order is fixed and the transform
  deterministic): each pass resets it, so validating raw and EMA weights every epoch costs no
  rebuilds. ``pad_last_batch=True`` + ``stick_to_shard`` + ``LastBatchPolicy.PARTIAL``: DALI pads
  the shard's tail with copies of its last sample and the iterator drops them, so each rank yields
  exactly its ``[N*r//W, N*(r+1)//W)`` range; we check the count. A pass abandoned half-way (smoke
  runs) cannot be reset, so the next pass builds afresh.

Batches are ``[B, 3, S, S]``; with layout NHWC (the default on CUDA) DALI writes HWC and the batch is
the permuted view of that memory, channels-last as the GPU convolutions want it, without a copy.

Corrupt samples: a failed batch kills a DALI pipeline with an operator stack trace that does not
say which sample. We then replay this rank's shard in order, decode only, one sample per run, to
find the first undecodable sample, and raise ``CorruptSampleError`` naming the tar and the key.
With ``cfg.skip_corrupt`` the sample is instead left out of filtered copies of the index files
(a temporary folder), the epoch's pipeline is rebuilt and fast-forwarded past the batches
already yielded, and a warning names the sample. That epoch may then differ from an undisturbed
one by the samples of one batch, and an eval rank may yield one sample fewer.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipeline.config import NORMALIZATIONS, DataConfig, resolve_layout
from pipeline.dali_pipelines import (
    READER_NAME,
    PipelineSpec,
    decode_check_pipeline,
    eval_pipeline,
    multicrop_pipeline,
    train_pipeline,
)
from pipeline.loader import CorruptSampleError, SplitSource, epoch_seed, handle_corrupt_sample
from pipeline.multicrop import crop_plan, unmirrored
from pipeline.progress import progress

PIPELINES = {"train": train_pipeline, "eval": eval_pipeline, "multicrop": multicrop_pipeline}


def read_index_keys(idx_path: str) -> list[tuple[str, str]]:
    """``(key, line)`` per sample of a DALI v1.2 index (``ext offset size name`` groups)."""
    lines = Path(idx_path).read_text().splitlines()
    out = []
    for line in lines[1:]:
        parts = line.split()
        if not parts:
            continue
        name = parts[3] if len(parts) >= 4 and not parts[3].isdigit() else "?"
        out.append((name.rsplit(".", 1)[0], line))
    return out


def dali_error_summary(exc: BaseException) -> str:
    """The operator's own words from a DALI pipeline error (the line after "encountered:")."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln == "encountered:" and i + 1 < len(lines):
            return lines[i + 1]
    return lines[-1] if lines else type(exc).__name__


class DaliLoader:
    """``Loader`` over DALI pipelines (see module docstring)."""

    def __init__(
        self,
        cfg: DataConfig,
        source: SplitSource,
        device: torch.device,
        device_id: int | None,
        mode: str,
        crops: int = 1,
    ) -> None:
        self.cfg, self.source, self.device, self.device_id, self.mode = cfg, source, device, device_id, mode
        self.crops = crops if mode == "multicrop" else 1
        self.plan = crop_plan(crops, cfg.image_size, cfg.val_resize) if mode == "multicrop" else ()
        self.batch_size = cfg.batch_size
        self.num_samples = source.num_samples(cfg.batch_size)
        self.class_names = list(source.class_names)
        self.epoch = 0
        self._len = source.num_batches(cfg.batch_size)
        self._indices = source.indices  # replaced by filtered copies once a sample is skipped
        self._tars = source.tars  # less the tars left without samples by skipping
        self._tar_ids = tuple(range(len(source.tars)))  # position in source.tars of each of _tars
        self._excluded: set[tuple[int, str]] = set()
        self._index_dir: str | None = None
        # A tar shorter than its index says (a cut-off copy): name the cut samples before DALI reads
        # them (it would fail on the next sample, or on an index left empty, in its own words).
        for t, key, reason in source.truncated():
            handle_corrupt_sample(key, source.tars[t], reason, cfg.skip_corrupt)  # raises unless skipping
            self._excluded.add((t, key))
        if self._excluded:
            self._write_filtered_indices()
        self.layout = resolve_layout(cfg.layout, device.type)
        self.builds = 0  # pipelines built so far (train: one per epoch; eval: one per loader)
        self._kept = None  # eval / multi-crop: (pipeline, iterator) of the last completed pass

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def spec(self, shard_id: int) -> PipelineSpec:
        mean, std = NORMALIZATIONS[self.cfg.normalization]
        return PipelineSpec(
            tars=self._tars,
            indices=self._indices,
            shard_id=shard_id,
            num_shards=self.source.world_size,
            decoder_device="mixed" if self.device_id is not None else "cpu",
            image_size=self.cfg.image_size,
            val_resize=self.cfg.val_resize,
            crop_area=tuple(self.cfg.crop_area),
            crop_aspect=tuple(self.cfg.crop_aspect),
            mean=tuple(mean),
            std=tuple(std),
            layout=self.layout,
            half=self.cfg.dtype == "float16",
            shuffle_buffer=self.cfg.shuffle_buffer,
            windows=unmirrored(self.plan),
            preallocate=self.cfg.dali_preallocate,
        )

    def _build(self, epoch: int):
        """The epoch's pipeline (graph errors raise here), not yet started."""
        pipe = PIPELINES[self.mode](
            spec=self.spec(self.source.shard_of(epoch)),
            batch_size=self.batch_size,
            num_threads=self.cfg.num_threads,
            device_id=self.device_id,
            seed=epoch_seed(self.cfg.seed, epoch, self.source.rank),
            prefetch_queue_depth=self.cfg.prefetch,
        )
        pipe.build()
        self.builds += 1
        return pipe

    def _start(self, epoch: int):
        """``(pipeline, iterator)`` for a pass: the kept eval pipeline reset, or a new one."""
        if self._kept is not None:
            pipe, batches = self._kept
            self._kept = None
            batches.reset()
            return pipe, batches
        pipe = self._build(epoch)
        policy = LastBatchPolicy.DROP if self.mode == "train" else LastBatchPolicy.PARTIAL
        # the iterator runs the pipeline on construction (first batches): inside the caller's try
        batches = DALIGenericIterator(
            pipe, ["images", "labels"], reader_name=READER_NAME, last_batch_policy=policy, auto_reset=False
        )
        return pipe, batches

    def __iter__(self):
        epoch, done, samples = self.epoch, 0, 0
        restart = True
        while restart and done < self._len:
            restart, seen, ended = False, 0, False
            try:
                pipe, batches = self._start(epoch)
            except RuntimeError as exc:  # the first batches already failed
                self._handle_failure(exc, epoch)  # raises unless cfg.skip_corrupt
                restart = True
                continue
            try:
                while True:
                    if done == self._len and self.mode == "train":
                        break  # DROP: a rank's shard may hold one more batch than the common length
                    try:
                        out = next(batches)
                    except StopIteration:
                        ended = True
                        break
                    except RuntimeError as exc:  # a batch failed: name the sample (or skip it)
                        self._handle_failure(exc, epoch)  # raises unless cfg.skip_corrupt
                        restart = True
                        break
                    seen += 1
                    if seen <= done:
                        continue  # fast-forward a rebuilt pipeline past batches already yielded
                    images, labels = self._convert(out[0])
                    if labels.shape[0] == 0:
                        continue  # PARTIAL: ranks with a shorter shard end on an empty batch
                    done += 1
                    samples += labels.shape[0]
                    yield images, labels
            finally:
                if ended and self.mode != "train" and not restart:
                    self._kept = (pipe, batches)  # a complete eval pass: reset it next time
                del batches, pipe
        if self._excluded:
            return  # skipped samples: an eval rank may yield fewer, a train epoch ends early at worst
        if (self.mode == "train" and done != self._len) or (
            self.mode != "train" and samples != self.num_samples
        ):
            raise RuntimeError(
                f"DALI reader on rank {self.source.rank} ended after {done} batches / {samples} samples, "
                f"expected {self._len} / {self.num_samples}: the manifest's shard counts disagree with the "
                "index files; rebuild or re-index the shards"
            )

    def _convert(self, out: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = out["images"].to(self.device, non_blocking=True)
        labels = out["labels"].reshape(-1).to(self.device, non_blocking=True).long()
        nhwc = self.layout == "NHWC"
        if self.mode == "multicrop":  # [B, K/2, ...] unmirrored windows -> [B*K, ...] with mirrors
            b = images.shape[0]
            flipped = images.flip(3 if nhwc else 4)  # the width axis of [B, K/2, H, W, C] / [B, K/2, C, H, W]
            both = images if self.crops == 1 else torch.stack((images, flipped), dim=2)
            images = both.reshape(b * self.crops, *images.shape[2:])
        if nhwc:  # [B, S, S, 3] -> [B, 3, S, S]: a view, channels-last in memory
            images = images.permute(0, 3, 1, 2)
        return images, labels

    # --- corrupt samples -------------------------------------------------------------------------
    def _handle_failure(self, exc: RuntimeError, epoch: int) -> None:
        shard_id = self.source.shard_of(epoch)
        bad = self.find_corrupt(shard_id)
        what = dali_error_summary(exc)
        if bad is None:
            raise RuntimeError(
                f"DALI pipeline failed on rank {self.source.rank} ({what}); no undecodable sample was found "
                f"in DALI shard {shard_id} of {len(self.source.tars)} tar(s), so this is not a data error"
            ) from None
        tar_index, key = bad
        tar = self.source.tars[tar_index]
        handle_corrupt_sample(key, tar, what, self.cfg.skip_corrupt)
        self._excluded.add(bad)
        self._kept = None  # the kept eval pipeline reads the old index files
        self._write_filtered_indices()

    def find_corrupt(self, shard_id: int) -> tuple[int, str] | None:
        """``(tar index, key)`` of the first undecodable sample of a DALI shard, in reader order."""
        entries = [
            (self._tar_ids[t], key) for t, idx in enumerate(self._indices) for key, _ in read_index_keys(idx)
        ]
        n, w = len(entries), self.source.world_size
        start, stop = n * shard_id // w, n * (shard_id + 1) // w
        pipe = decode_check_pipeline(
            spec=self.spec(shard_id),
            batch_size=1,
            num_threads=1,
            device_id=None,
            seed=0,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        pipe.build()
        try:
            for i in progress(
                range(start, stop), desc=f"locating corrupt sample (shard {shard_id})", leave=False
            ):
                try:
                    pipe.run()
                except RuntimeError:
                    return entries[i]
        finally:
            del pipe
        return None

    def _write_filtered_indices(self) -> None:
        if self._index_dir is None:
            self._index_dir = tempfile.mkdtemp(prefix="dali-idx-")
        paths, tars, ids = [], [], []
        for t, idx in enumerate(self.source.indices):
            keep = [line for key, line in read_index_keys(idx) if (t, key) not in self._excluded]
            if not keep:  # DALI refuses an index without samples: leave the tar out
                continue
            header = Path(idx).read_text().splitlines()[0].split()[0]
            path = Path(self._index_dir) / Path(idx).name
            path.write_text(f"{header} {len(keep)}\n" + "".join(line + "\n" for line in keep))
            paths.append(str(path))
            tars.append(self.source.tars[t])
            ids.append(t)
        if not paths:
            raise CorruptSampleError(
                f"every sample of this split in {len(self.source.tars)} tar(s) is damaged; rebuild the shards"
            )
        self._indices, self._tars, self._tar_ids = tuple(paths), tuple(tars), tuple(ids)

    def __del__(self) -> None:
        if getattr(self, "_index_dir", None):
            shutil.rmtree(self._index_dir, ignore_errors=True)
