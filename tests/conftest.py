"""Shared test switches.

- ``slow`` tests run only with RUN_SLOW=1 (``.ci/run`` sets it; ``make test`` runs the fast set).
- ``realdata`` tests need REAL_DATA_DIR pointing at a folder with ``cifar10-jpg.tar.gz``,
  ``imagenet-sample-images.tar`` and ``imagenet_synset_words.txt``.
- ``gpu`` tests need CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("RUN_SLOW") == "1"
    real = os.environ.get("REAL_DATA_DIR")
    cuda = _cuda_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set RUN_SLOW=1"))
        if "realdata" in item.keywords and not real:
            item.add_marker(pytest.mark.skip(reason="real data: set REAL_DATA_DIR (e.g. ../shared/data)"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder with the real datasets (``REAL_DATA_DIR``); tests using it carry ``@pytest.mark.realdata``."""
    value = os.environ.get("REAL_DATA_DIR")
    if not value:
        pytest.skip("REAL_DATA_DIR is not set")
    path = Path(value).resolve()
    if not path.is_dir():
        pytest.fail(f"REAL_DATA_DIR={value} is not a directory")
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (``rclone serve s3``) on 127.0.0.1 for the session, its AWS_*
    variables in this process's environment (Ray workers and subprocesses inherit them)."""
    from ops.s3server import LocalS3
    from pipeline import storage
    from pipeline.schema import forget_remote

    root = tmp_path_factory.mktemp("s3")
    server = LocalS3(root / "buckets", log_file=root / "rclone.log")
    server.start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    storage.forget_clients()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.forget_clients()
        forget_remote()
