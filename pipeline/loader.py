"""``make_loader`` / ``make_multicrop_loader``: choose the backend and resolve the device.

Library module, no CLI; used as ``pipeline.make_loader(cfg, split, rank, world_size, device)``.
What is read, in which order and by which rank is defined once, in ``pipeline.order``, and both
backends (``pipeline.dali_loader``, ``pipeline.torch_loader``) read through it:

- train: epoch ``e`` is one permutation of the split's usable samples, a pure function of
  ``(data.seed, e)``, independent of the world size; global step ``t`` consumes positions
  ``[t*G, (t+1)*G)`` (``G = batch_size * world_size``), rank ``r`` its ``batch_size`` slice; every rank
  yields the same number of batches; the tail that does not fill a global batch is dropped.
- eval / multi-crop: manifest order, rank ``r`` the range ``[n*r//W, n*(r+1)//W)``: every sample
  exactly once across ranks, the last batch of a rank possibly smaller.
- ``set_epoch(e, start)`` starts a pass at a global position (a mid-epoch resume, with any world
  size); crop windows and mirrors are functions of ``(seed, epoch, position)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from pipeline.config import DataConfig
from pipeline.multicrop import SUPPORTED_CROPS
from pipeline.samples import CorruptSampleError, Quarantine

__all__ = ["CorruptSampleError", "Loader", "make_loader", "make_multicrop_loader", "resolve_device"]


class Loader(Protocol):
    """What the training loop sees, whatever the backend (``pipeline.order.OrderedLoader``)."""

    num_samples: int  # samples this rank yields per epoch
    class_names: list[str]
    batch_size: int
    position: int  # samples the whole job has consumed in the epoch, after the last yielded batch
    quarantine: Quarantine

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...


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
    """Batches ``(images [B,3,S,S] float, labels int64 [B])`` on ``device`` for one rank.

    ``split`` is a split name in the manifest; it is a training split (random crops, the epoch's
    permutation, full global batches) when it equals ``cfg.train_split``, an evaluation split otherwise."""
    _check_backend(cfg)
    dev, device_id = resolve_device(device)
    mode = "train" if split == cfg.train_split else "eval"
    if cfg.backend == "dali":
        from pipeline.dali_loader import DaliLoader

        return DaliLoader(cfg, split, rank, world_size, dev, device_id, mode)
    from pipeline.torch_loader import TorchLoader

    return TorchLoader(cfg, split, rank, world_size, dev, mode)


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
    if cfg.backend == "dali":
        from pipeline.dali_loader import DaliLoader

        return DaliLoader(cfg, split, rank, world_size, dev, device_id, "multicrop", crops)
    from pipeline.torch_loader import TorchLoader

    return TorchLoader(cfg, split, rank, world_size, dev, "multicrop", crops)
