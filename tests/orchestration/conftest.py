"""Fixtures of the orchestration tests: tiny CIFAR-10 shards from REAL_DATA_DIR and a 2-CPU Ray instance."""

from __future__ import annotations

import os

import pytest

TRAIN_PER_CLASS = 48  # 480 images: 7 steps/epoch at 2 workers x 32
TEST_PER_CLASS = 20  # 200 images, chance top-1 = 10%
LEARN_TRAIN_PER_CLASS = 200  # 2000 images: 31 steps/epoch, enough to beat chance in a few epochs


@pytest.fixture(scope="session")
def tiny_cifar_shards(real_data_dir, tmp_path_factory):
    from pipeline.shards.real_data import build_real_shards

    out = tmp_path_factory.mktemp("cifar") / "shards"
    return build_real_shards("cifar10", real_data_dir, out, TRAIN_PER_CLASS, TEST_PER_CLASS, progress=False)


@pytest.fixture(scope="session")
def small_cifar_shards(real_data_dir, tmp_path_factory):
    from pipeline.shards.real_data import build_real_shards

    out = tmp_path_factory.mktemp("cifar-small") / "shards"
    return build_real_shards(
        "cifar10", real_data_dir, out, LEARN_TRAIN_PER_CLASS, TEST_PER_CLASS, progress=False
    )


@pytest.fixture(scope="module")
def ray_2cpu():
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": repo}})
    yield ray
    ray.shutdown()
