"""``make_loader`` / ``make_multicrop_loader``: backend dispatch, device resolution and the
epoch arithmetic every backend shares.

Library module, no CLI; used as ``pipeline.make_loader(cfg, split, rank, world_size, device)``.

Epoch contract (both backends):

- The split's N samples (manifest order) are cut into ``world_size`` contiguous ranges exactly as
  DALI's readers shard them: rank r gets ``[N*r//W, N*(r+1)//W)``.
- train: each rank yields ``(N // W) // batch_size`` full batches, the same number on every rank,
  drawn from the range of shard ``(rank + epoch) % W`` (ranges rotate, so every epoch covers the
  data with different rank assignments) through a shuffle buffer; no rank waits for another.
  The few samples of a range beyond those batches are skipped that epoch (DALI: whatever is left
  in its shuffle buffer; torch: the range's tail before shuffling).
- eval: each rank yields its whole range once, ``ceil(n_r / batch_size)`` batches, the last one
  possibly smaller: over all ranks every sample exactly once, no padding duplicates.
- ``set_epoch(e)`` re-seeds shuffling and augmentation from ``(cfg.seed, e, rank)``: an epoch's
  order and crops are reproducible on resume.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.multicrop import SUPPORTED_CROPS
from pipeline.schema import ShardFormatError, load_manifest, split_files


class Loader(Protocol):
    """What the training loop sees, whatever the backend."""

    num_samples: int  # samples this rank yields per epoch
    class_names: list[str]
    batch_size: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class CorruptSampleError(RuntimeError):
    """A sample could not be decoded at read time; the message names the shard and the key."""


def handle_corrupt_sample(key: str, tar: str, reason: object, skip: bool) -> None:
    """Both backends' policy for an undecodable sample: raise naming it, or warn when ``skip``."""
    if not skip:
        raise CorruptSampleError(
            f"corrupt sample {key!r} in shard {tar}: {reason}. Rebuild the shards (`verify-shards --deep` "
            "lists bad samples) or set data.skip_corrupt=true to skip such samples"
        ) from None  # the DALI/Pillow stack trace is not the user's business
    warnings.warn(f"skipping corrupt sample {key!r} in shard {tar} ({reason})", stacklevel=3)


@dataclass(frozen=True)
class SplitSource:
    """The shard files of a split and the epoch arithmetic of one rank."""

    tars: tuple[str, ...]
    indices: tuple[str, ...]
    counts: tuple[int, ...]
    class_names: tuple[str, ...]
    rank: int
    world_size: int
    train: bool
    sizes: tuple[int, ...] = ()  # each tar's size in bytes, as the manifest records it

    def truncated(self) -> list[tuple[int, str, str]]:
        """``(tar index, key, reason)`` of samples cut off by a tar shorter than the manifest says
        (one stat per tar; a short tar's index is then read to name its samples)."""
        from pipeline.shards.verify import truncated_samples

        out = []
        for t, (tar, idx) in enumerate(zip(self.tars, self.indices, strict=True)):
            if t < len(self.sizes) and Path(tar).stat().st_size < self.sizes[t]:
                out += [(t, key, reason) for key, reason in truncated_samples(tar, idx)]
        return out

    @property
    def total(self) -> int:
        return sum(self.counts)

    def shard_of(self, epoch: int) -> int:
        """DALI shard id this rank reads in ``epoch`` (rotates in training, fixed in evaluation)."""
        return (self.rank + epoch) % self.world_size if self.train else self.rank

    def sample_range(self, shard: int) -> tuple[int, int]:
        """Global sample range of a DALI shard: ``[N*s//W, N*(s+1)//W)`` (DALI's own formula)."""
        n, w = self.total, self.world_size
        return n * shard // w, n * (shard + 1) // w

    def num_samples(self, batch_size: int) -> int:
        if self.train:
            return (self.total // self.world_size) // batch_size * batch_size
        a, b = self.sample_range(self.rank)
        return b - a

    def num_batches(self, batch_size: int) -> int:
        return (
            self.num_samples(batch_size) // batch_size
            if self.train
            else math.ceil(self.num_samples(batch_size) / batch_size)
        )


def load_split(cfg: DataConfig, split: str, rank: int, world_size: int, train: bool) -> SplitSource:
    if not cfg.shards:
        raise ShardFormatError("data.shards is empty: set it to a folder made by `build-shards`")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    manifest = load_manifest(cfg.shards)
    info = manifest.split(split)
    tars, idxs = split_files(cfg.shards, split)
    src = SplitSource(
        tars=tuple(tars),
        indices=tuple(idxs),
        counts=tuple(s.count for s in info.shards),
        class_names=tuple(manifest.class_names),
        rank=rank,
        world_size=world_size,
        train=train,
        sizes=tuple(s.bytes for s in info.shards),
    )
    if src.num_batches(cfg.batch_size) == 0:
        raise ShardFormatError(
            f"split {split!r} of {cfg.shards} has {src.total} samples: too few for {world_size} rank(s) "
            f"with batch_size {cfg.batch_size}; lower data.batch_size or add data"
        )
    return src


def epoch_seed(seed: int, epoch: int, rank: int, stream: int = 0) -> int:
    """A 31-bit seed derived from (seed, epoch, rank, stream) (DALI seeds must fit an int32)."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0] & 0x7FFFFFFF)


def resolve_device(device: torch.device | str | int | None) -> tuple[torch.device, int | None]:
    """``(torch device, DALI device_id)``: a CUDA index, or None for CPU pipelines."""
    if device is None:
        dev = torch.device("cpu")
    elif isinstance(device, int):
        dev = torch.device("cuda", device)
    else:
        dev = torch.device(device)
    if dev.type == "cpu":
        return dev, None
    if dev.type != "cuda":
        raise ValueError(f"device {dev} is not supported by the loaders: use 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {dev} was requested but CUDA is not available on this machine; "
            "pass device='cpu' (DALI then runs its CPU operators) or run on a GPU worker"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise RuntimeError(
            f"device {dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    return torch.device("cuda", index), index


def _check_backend(cfg: DataConfig) -> None:
    if cfg.backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                f"data.backend=dali but DALI cannot be imported ({exc}); install nvidia-dali-cuda130 "
                "or set data.backend=torch"
            ) from None


def make_loader(cfg: DataConfig, split: str, rank: int, world_size: int, device) -> Loader:
    """Batches ``(images [B,3,S,S] or [B,S,S,3] float, labels int64 [B])`` on ``device`` for one rank.

    ``split`` is a split name in the manifest; it is a training split (random crops, rotation,
    full batches) when it equals ``cfg.train_split``, an evaluation split otherwise."""
    _check_backend(cfg)
    dev, device_id = resolve_device(device)
    train = split == cfg.train_split
    source = load_split(cfg, split, rank, world_size, train)
    if cfg.backend == "dali":
        from pipeline.dali_loader import DaliLoader

        return DaliLoader(cfg, source, dev, device_id, mode="train" if train else "eval")
    from pipeline.torch_loader import TorchLoader

    return TorchLoader(cfg, source, dev, mode="train" if train else "eval")


def make_multicrop_loader(
    cfg: DataConfig, split: str, crops: int, rank: int, world_size: int, device
) -> Loader:
    """Evaluation batches ``(images [B*K,...], labels [B])``, crops of image i at rows ``i*K:(i+1)*K``
    (geometry: ``pipeline.multicrop.crop_plan``). Each sample exactly once across ranks.
    ``cfg.batch_size`` counts images: at 299 px one image's 144 float32 crops take 154 MB, so
    144-crop evaluation wants batches of a few images."""
    if crops not in SUPPORTED_CROPS:
        raise ValueError(f"crops must be one of {SUPPORTED_CROPS}, got {crops}")
    _check_backend(cfg)
    dev, device_id = resolve_device(device)
    source = load_split(cfg, split, rank, world_size, train=False)
    if cfg.backend == "dali":
        from pipeline.dali_loader import DaliLoader

        return DaliLoader(cfg, source, dev, device_id, mode="multicrop", crops=crops)
    from pipeline.torch_loader import TorchLoader

    return TorchLoader(cfg, source, dev, mode="multicrop", crops=crops)
