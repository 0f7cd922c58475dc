"""What every step of ``make gpu-check`` is handed: the sizes of the run (full on a GPU, tiny in
``--smoke``), the targets its figures are held to, the environment, the shards it reads, and
``StepResult``, what a step returns.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SHARDS = REPO / ".gpucheck" / "shards"
SMOKE_SOURCE = REPO / "data" / "cifar10-demo" / "test.tar.gz"
SMOKE_IMAGES = 24
# Dense bf16 tensor-core peak of the SXM parts by NVIDIA's datasheets (H100 SXM: 989.4 TFLOP/s; the
# H200 has the same chip); the machines here measured ~790 on an 8192^3 bf16 matmul.
BF16_PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
# Targets of the GPU figures (issue "On a GPU machine"), anchored on MLPerf/DeepLearningExamples.
TARGETS = {
    "dali_mixed_images_per_s": 8000,
    "dali_mixed_over_pillow": 3.0,
    "step_images_per_s": 3000,
    "end_to_end_over_step": 0.90,
    "loader_wait_frac": 0.03,
    "peer_logits_rel_err": 1e-4,
}


@dataclass(frozen=True, kw_only=True)
class Sizes:
    image_size: int
    width_mult: float
    step_batches: tuple[int, ...]  # train-step: batches timed
    step_steps: int  # train-step: timed steps per setting
    step_warmup: int  # train-step: steps before timing (compilation happens there)
    loader_batch: int
    loader_rounds: int  # loader: timed epochs per pipeline, interleaved
    loader_epoch_images: int  # loader: the real shards are replicated to at least this many images
    e2e_batch: int
    e2e_steps: int
    resume_steps: int  # end-to-end: steps run twice, uninterrupted and from the checkpoint
    mc_batch: int  # images per multi-crop batch (lowered by crops_per_batch for 144 crops)
    mc_repeat: int  # val split for 1 and 10 crops = source images x this
    threads: int  # DALI threads = DataLoader workers

    @property
    def val_resize(self) -> int:
        return round(self.image_size / 0.875)  # torchvision/timm: centre crop = 87.5 % of the shorter side

    @classmethod
    def full(cls, threads: int) -> Sizes:
        """A few minutes on one H100/H200 with the real-JPEG shards of ``make gpu-check-data``."""
        return cls(
            image_size=299,
            width_mult=1.0,
            step_batches=(128, 256),
            step_steps=20,
            step_warmup=5,
            loader_batch=256,
            loader_rounds=3,
            loader_epoch_images=8192,
            e2e_batch=256,
            e2e_steps=150,
            resume_steps=20,
            mc_batch=128,
            mc_repeat=10,
            threads=threads,
        )

    @classmethod
    def smoke(cls) -> Sizes:
        """Tiny sizes for ``--smoke`` on 2 CPU cores: every code path, no meaningful speed."""
        return cls(
            image_size=75,
            width_mult=0.25,
            step_batches=(4,),
            step_steps=2,
            step_warmup=1,
            loader_batch=8,
            loader_rounds=1,
            loader_epoch_images=64,
            e2e_batch=4,
            e2e_steps=6,
            resume_steps=3,
            mc_batch=4,
            mc_repeat=1,
            threads=2,
        )


@dataclass
class StepResult:
    name: str
    status: str  # "ok" | "below target" | "fail" | "skipped"
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    cuda_gib_after: float | None = None  # memory PyTorch still holds once the step has returned


@dataclass
class Context:
    out: Path
    sizes: Sizes
    smoke: bool
    device: torch.device
    source_shards: Path  # as carried: a small real train split
    work: Path  # temporary folder for replicated shards and checkpoints
    deadline: float
    env: dict = field(default_factory=dict)
    results: list[StepResult] = field(default_factory=list)
    step_rates: dict = field(default_factory=dict)  # (setting, batch) -> images/s, for end-to-end
    slow_tests: bool = False  # gpu-tests: also the slow ones (a torch.compile test: ~60 s more)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def shards(self, name: str, splits: dict[str, tuple[str, int]]) -> Path:
        """A replicated shard folder under ``work`` (built once per name)."""
        from pipeline.shards.repeat import repeat_shards

        folder = self.work / name
        if not (folder / "manifest.json").exists():
            repeat_shards(self.source_shards, folder, splits)
        return folder

    def train_data(self, name: str, min_images: int, batch: int, **overrides):
        """``(DataConfig, epoch images)`` of a train split replicated to at least ``min_images``."""
        from pipeline.config import DataConfig

        repeat = max(1, math.ceil(min_images / self.source_count()))
        z = self.sizes
        cfg = DataConfig(
            shards=str(self.shards(name, {"train": ("train", repeat)})),
            batch_size=batch,
            image_size=z.image_size,
            val_resize=z.val_resize,
            num_threads=z.threads,
            **overrides,
        )
        return cfg, repeat * self.source_count()

    def source_count(self) -> int:
        from pipeline.schema import load_manifest

        return load_manifest(self.source_shards).split("train").num_samples

    def num_classes(self) -> int:
        from pipeline.schema import load_manifest

        return load_manifest(self.source_shards).num_classes


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "device": "cpu",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    for module in ("nvidia.dali", "torchvision", "timm", "webdataset"):
        try:
            env[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as exc:  # reported, not fatal: the steps that need it say so
            env[module] = f"not importable ({type(exc).__name__})"
    return env


def bf16_peak(env: dict) -> float | None:
    name = str(env.get("device", ""))
    return next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)


def cuda_backends(*, deterministic: bool) -> None:
    """Autotuned cuDNN convolutions for speed; deterministic kernels for the bit-exact resume."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Batch-norm running statistics set to one batch's (a random network's eval output stays in range)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()
