"""Input data: the write side (``pipeline.shards``: build-shards / verify-shards) and the read side
(``make_loader``: DALI pipelines on GPU or CPU, and a plain PyTorch baseline).

The write side and this module import without DALI; the read side imports DALI only when a
``dali`` loader is built.
"""

from __future__ import annotations

from pipeline.config import DataConfig
from pipeline.schema import Manifest, ShardFormatError, load_manifest, manifest_sha256

__all__ = [
    "DataConfig",
    "Manifest",
    "ShardFormatError",
    "load_manifest",
    "make_loader",
    "make_multicrop_loader",
    "manifest_sha256",
]


def make_loader(cfg, split, rank, world_size, device):
    """Batches of ``(images, labels)`` on ``device`` for one rank; see ``pipeline.loader``."""
    from pipeline.loader import make_loader as _make_loader

    return _make_loader(cfg, split, rank, world_size, device)


def make_multicrop_loader(cfg, split, crops, rank, world_size, device):
    """Multi-crop evaluation batches ``(images [B*K,...], labels [B])``; see ``pipeline.loader``."""
    from pipeline.loader import make_multicrop_loader as _make_multicrop_loader

    return _make_multicrop_loader(cfg, split, crops, rank, world_size, device)
