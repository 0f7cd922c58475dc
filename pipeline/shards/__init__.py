"""The write side of the pipeline: ``build_shards`` / ``verify_shards`` and their CLIs.

``build-shards SOURCE OUT --split train ...`` turns an image collection (ImageNet train/val,
ImageFolder, CSV list, tars) into WebDataset shards with DALI index files and a manifest;
``verify-shards OUT [--deep]`` checks them. Pure Python + Pillow: no DALI, Ray or MLflow here.
"""

from __future__ import annotations

from pipeline.shards.build import build_shards
from pipeline.shards.classes import SourceError
from pipeline.shards.verify import VerifyReport, verify_shards

__all__ = ["SourceError", "VerifyReport", "build_shards", "verify_shards"]
