"""``make gpu-check``: everything GPU-side measured and checked in one run of a few minutes.

Run from the repo root on a GPU machine (DALI installed; Ray and MLflow are not needed)::

    make gpu-check GPU_CHECK_ARGS="--out OUT"          # = python -m orchestration.gpu_check --out OUT
    make gpu-check-data                                 # here, first: .gpucheck/shards from real JPEGs
    python -m orchestration.gpu_check --smoke           # CPU: the same script with tiny sizes

It lives in ``orchestration/`` because it drives the training loop (``ops`` never imports
``orchestration``). Steps, in order, each guarded so that one failure does not hide the others,
the report rewritten after each (``OUT/gpu_check.json``, ``OUT/gpu_check.md``):

1. ``gpu-tests``: the ``gpu``-marked tests (``pytest -m gpu``, slow ones included), pass/fail each.
2. ``loader``: train pipeline at 299 on real ImageNet JPEGs (replicated for steady state): DALI
   "mixed" (through ``make_loader`` and bare), DALI CPU and the Pillow DataLoader, images/s each on
   the same CPU threads, and the cost of starting an epoch (pipeline build + first batch).
3. ``train-step``: full Inception-v3 at 299 on synthetic device batches through the product's loop
   (``orchestration.step_bench``): float32, bf16 autocast, + channels_last, + ``torch.compile``;
   batch 128 and 256; images/s and model FLOP utilisation (3 x forward multiply-adds x 2 FLOP).
4. ``peers``: torchvision's ``Inception3`` and timm's ``inception_v3`` load our ``state_dict``
   (``strict=True``) and must give our logits to 1e-4 (float32, eval); their training step is timed
   beside ours under the same loop, optimizer and settings.
5. ``end-to-end``: shards -> DALI mixed -> ``train_one_epoch`` for a few hundred steps, images/s and
   loader-wait fraction (CUDA-event timed), against the step-only rate; then a checkpoint, and a
   resume from it (loaded mapped to the GPU) that must repeat the uninterrupted run's losses bit
   for bit (deterministic kernels for that part).
6. ``multicrop``: ``ops.evaluate.evaluate_multicrop`` of a 2-member ensemble at 1, 10 and 144 crops,
   crops/s.

``--smoke`` runs on CPU with tiny sizes (75 px, width 0.25, a few steps) from the shipped CIFAR-10
subset; steps that need CUDA are reported as skipped. A test runs it in CI so that the script never rots.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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


@dataclass(frozen=True)
class Sizes:
    image_size: int
    width_mult: float
    step_batches: tuple[int, ...]
    step_steps: int
    step_warmup: int
    loader_batch: int
    loader_rounds: int
    loader_epoch_images: int
    e2e_batch: int
    e2e_steps: int
    resume_steps: int
    mc_batch: int  # images per multi-crop batch (lowered by crops_per_batch for 144 crops)
    mc_repeat: int  # val split for 1 and 10 crops = source images x this
    threads: int

    @property
    def val_resize(self) -> int:
        return round(self.image_size / 0.875)  # torchvision/timm: centre crop = 87.5 % of the shorter side


def full_sizes(threads: int) -> Sizes:
    return Sizes(299, 1.0, (128, 256), 20, 5, 256, 3, 8192, 256, 150, 20, 128, 10, threads)


SMOKE_SIZES = Sizes(75, 0.25, (4,), 2, 1, 8, 1, 64, 4, 6, 3, 4, 1, 2)


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
        from ops.benchmarks.bench_loader import repeat_shards

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


# --- environment ---------------------------------------------------------------------------------
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


# --- step 1: the gpu-marked tests ---------------------------------------------------------------
def step_gpu_tests(ctx: Context) -> StepResult:
    import xml.etree.ElementTree as ET

    files = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )
    xml = ctx.out / "pytest_gpu.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        *files,
    ]
    env = dict(os.environ, RUN_SLOW="1" if ctx.slow_tests else "0")
    limit = min(180.0, max(60.0, ctx.left()))  # a hung test must not eat the whole budget
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
    (ctx.out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
    tests = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if case.find(tag) is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            tests[f"{case.get('classname')}::{case.get('name')}"] = outcome
    counts = {k: sum(v == k for v in tests.values()) for k in ("passed", "failed", "error", "skipped")}
    res = StepResult("gpu-tests", "ok", figures={**counts, "tests": tests, "files": files})
    if proc.returncode not in (0, 5) or counts["failed"] or counts["error"]:
        res.status = "fail"
        res.error = f"pytest exit {proc.returncode}: " + (proc.stdout + proc.stderr).strip().splitlines()[-1]
    return res


# --- step 2: the loader alone --------------------------------------------------------------------
def _epoch_start_s(cfg, device: str) -> float:
    """Seconds from ``iter(loader)`` to the first batch of a freshly built pipeline (nvJPEG buffers
    included). A pass abandoned after its first batch, as here, leaves batches in flight, so the
    next pass builds afresh; a completed epoch is reset instead and pays only the queue refill."""
    from pipeline import make_loader

    loader = make_loader(cfg, "train", 0, 1, device)
    times = []
    for epoch in range(2):  # the first also loads libraries and creates the CUDA/nvJPEG contexts
        loader.set_epoch(epoch)
        start = time.perf_counter()
        it = iter(loader)
        next(it)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        it.close()
    return times[-1]


def step_loader(ctx: Context) -> StepResult:
    from ops.benchmarks.bench_loader import run_rounds

    z = ctx.sizes
    cfg, epoch_images = ctx.train_data("loader", z.loader_epoch_images, z.loader_batch)
    figures = {"threads": z.threads, "batch": z.loader_batch, "epoch_images": epoch_images}
    rates = {}
    steady = {}  # make_loader epochs after their first batch: what a long (real) epoch runs at
    if ctx.cuda:
        gpu = run_rounds(cfg, "cuda", ["dali", "graph", "previous", "raw", "torch"], z.loader_rounds)
        rates["dali_mixed"] = gpu["dali"]["images_per_s"]
        rates["dali_mixed_graph"] = gpu["graph"]["images_per_s"]  # the ordered graph without the loader
        rates["dali_mixed_previous"] = gpu["previous"]["images_per_s"]  # the replaced make_loader path
        rates["dali_mixed_bare"] = gpu["raw"]["images_per_s"]
        rates["pillow_dataloader"] = gpu["torch"]["images_per_s"]
        steady["dali_mixed"] = gpu["dali"]["steady_images_per_s"]
        steady["pillow_dataloader"] = gpu["torch"]["steady_images_per_s"]
        # an epoch's start (pipeline build + first batch), with and without pre-sized decoder buffers
        figures["epoch_start_s_dali_mixed"] = _epoch_start_s(cfg, "cuda")
        figures["epoch_start_s_dali_mixed_no_preallocate"] = _epoch_start_s(
            replace(cfg, dali_preallocate=False), "cuda"
        )
    cpu = run_rounds(cfg, "cpu", ["dali"] if ctx.cuda else ["dali", "torch"], z.loader_rounds)
    rates["dali_cpu"] = cpu["dali"]["images_per_s"]
    steady["dali_cpu"] = cpu["dali"]["steady_images_per_s"]
    if "torch" in cpu:
        rates["pillow_dataloader"] = cpu["torch"]["images_per_s"]
        steady["pillow_dataloader"] = cpu["torch"]["steady_images_per_s"]
    figures["epoch_start_s_dali_cpu"] = _epoch_start_s(cfg, "cpu")
    figures["images_per_s"] = rates
    figures["steady_images_per_s"] = steady
    res = StepResult("loader", "ok", figures=figures)
    if ctx.cuda:  # targets on whole epochs of ~30 batches, per-epoch rebuild included (the harder reading)
        ratio = rates["dali_mixed"] / rates["pillow_dataloader"]
        figures["dali_mixed_over_pillow"] = ratio
        figures["dali_mixed_over_bare"] = rates["dali_mixed"] / rates["dali_mixed_bare"]
        figures["dali_mixed_over_graph"] = rates["dali_mixed"] / rates["dali_mixed_graph"]
        figures["dali_mixed_over_previous"] = rates["dali_mixed"] / rates["dali_mixed_previous"]
        figures["steady_dali_mixed_over_bare"] = steady["dali_mixed"] / rates["dali_mixed_bare"]
        if (
            rates["dali_mixed"] < TARGETS["dali_mixed_images_per_s"]
            or ratio < TARGETS["dali_mixed_over_pillow"]
        ):
            res.status = "below target"
    return res


# --- step 3: the training step alone -------------------------------------------------------------
def _our_model(ctx: Context, num_classes: int):
    import models

    return lambda: models.inception_v3(num_classes=num_classes, width_mult=ctx.sizes.width_mult)


def _flops_per_image(ctx: Context, num_classes: int) -> float:
    from models.summary import summarize

    summary = summarize(_our_model(ctx, num_classes)(), ctx.sizes.image_size)
    return 3 * 2 * summary.macs_with_aux  # forward + backward (~2x forward), 2 FLOP per multiply-add


def step_train_step(ctx: Context) -> StepResult:
    from orchestration.step_bench import STEP_SETTINGS, time_training_steps

    z = ctx.sizes
    num_classes = 1000 if not ctx.smoke else ctx.num_classes()
    flops = _flops_per_image(ctx, num_classes)
    peak = bf16_peak(ctx.env) if ctx.cuda else None
    settings = (
        STEP_SETTINGS
        if ctx.cuda
        else [s for s in STEP_SETTINGS if s.name in ("float32", "bf16+channels_last")]
    )
    rows, notes = [], []
    if ctx.cuda:
        cuda_backends(deterministic=False)
    # Every eager setting at the largest batch, the fastest eager one at every batch; compile last
    # (its warm-up is the compilation, ~100 s each on an H200's 16 cores), largest batch first.
    big = max(z.step_batches)
    fastest_eager = [s for s in settings if not s.compile][-1]
    order = [(s, big) for s in settings if not s.compile]
    order += [(fastest_eager, b) for b in z.step_batches if b != big]
    # The default clipping (per tensor, as TF-slim) against one global norm, side by side at the
    # largest batch: eager, and compiled (the second compilation of the same graph hits the cache).
    glob = [(fastest_eager.with_clip("global"), big)]
    compiled = [s for s in settings if s.compile]
    order += glob
    order += [(s, big) for s in compiled] + [(s.with_clip("global"), big) for s in compiled]
    order += [(s, b) for s in compiled for b in sorted(z.step_batches, reverse=True) if b != big]
    for setting, batch in order:
        if setting.compile and ctx.left() < 150:
            notes.append(f"{setting.name} at batch {batch} skipped: {ctx.left():.0f} s of the budget left")
            continue
        log(f"train-step {setting.name} batch {batch}")
        r = time_training_steps(
            _our_model(ctx, num_classes),
            setting,
            device=ctx.device,
            batch=batch,
            image_size=z.image_size,
            num_classes=num_classes,
            steps=z.step_steps,
            warmup=z.step_warmup,
        )
        r.update(setting=setting.name, batch=batch)
        r["tflops"] = r["images_per_s"] * flops / 1e12
        if peak:
            r["mfu_vs_bf16_peak"] = r["images_per_s"] * flops / peak
        rows.append(r)
        ctx.step_rates[(setting.name, batch)] = r["images_per_s"]
        log(f"  {r['images_per_s']:.0f} img/s, {r['step_ms']:.1f} ms/step, warm-up {r['warmup_s']:.1f} s")
    default_rows = [r for r in rows if "clip]" not in r["setting"]]
    best = max(
        (r for r in default_rows if "bf16" in r["setting"]), key=lambda r: r["images_per_s"], default=None
    )
    figures = {"flops_per_image": flops, "rows": rows}
    clip_ratio = {
        name: ctx.step_rates[(name, big)] / ctx.step_rates[(f"{name} [global clip]", big)]
        for name, b in list(ctx.step_rates)
        if b == big and (f"{name} [global clip]", big) in ctx.step_rates
    }
    if clip_ratio:
        figures["per_tensor_over_global_clip"] = clip_ratio
    if best:
        figures["best"] = {k: best[k] for k in ("setting", "batch", "images_per_s")}
    res = StepResult("train-step", "ok", figures=figures, notes=notes)
    if ctx.cuda and (best is None or best["images_per_s"] < TARGETS["step_images_per_s"]):
        res.status = "below target"
    return res


# --- step 4: peers -------------------------------------------------------------------------------
def _calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Batch-norm running statistics set to one batch's (a random network's eval output stays in range)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _peer_nets(num_classes: int) -> dict[str, Callable[[], torch.nn.Module]]:
    out = {}
    try:
        import torchvision

        out["torchvision"] = lambda: torchvision.models.inception_v3(
            weights=None, aux_logits=True, init_weights=False, transform_input=False, num_classes=num_classes
        )
    except Exception as exc:
        out["torchvision"] = exc
    try:
        import timm

        out["timm"] = lambda: timm.create_model(
            "inception_v3", pretrained=False, num_classes=num_classes, aux_logits=True
        )
    except Exception as exc:
        out["timm"] = exc
    return out


def step_peers(ctx: Context) -> StepResult:
    import models
    from orchestration.step_bench import STEP_SETTINGS, PeerAdapter, time_training_steps

    z = ctx.sizes
    num_classes = 1000
    res = StepResult("peers", "ok")
    peers = _peer_nets(num_classes)
    usable = {k: v for k, v in peers.items() if callable(v)}
    for name, v in peers.items():
        if not callable(v):
            res.notes.append(f"{name} skipped: not importable ({type(v).__name__}: {v})")
    if not usable:
        res.status = "skipped"
        return res
    # equivalence: float32, eval, no TF32, same weights
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        size = 299  # the peers are full-width networks; 299 is their native size
        calib = torch.randn(8, 3, size, size, device=ctx.device)
        ours = _calibrated(models.inception_v3(num_classes=num_classes).to(ctx.device), calib)
        x = torch.randn(4, 3, size, size, device=ctx.device)
        with torch.no_grad():
            ref = ours(x).double()
        equivalence = {}
        for name, build in usable.items():
            net = build().to(ctx.device)
            try:
                net.load_state_dict(ours.state_dict(), strict=True)
                strict = True
            except RuntimeError as exc:  # named in the report; compared without the missing parts
                missing = net.load_state_dict(ours.state_dict(), strict=False)
                strict = False
                res.notes.append(f"{name}: strict load failed ({str(exc).splitlines()[0]}); {missing}")
            with torch.no_grad():
                out = net.eval()(x)
            out = out[0] if isinstance(out, tuple) else out
            rel = float((out.double() - ref).norm() / ref.norm())
            equivalence[name] = {"strict_load": strict, "logits_rel_err": rel}
            if not strict or rel > TARGETS["peer_logits_rel_err"]:
                res.status = "below target"
        res.figures["equivalence"] = equivalence
        del ours, net
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    # timing: same loop, optimizer and settings; ours measured again beside them
    setting = next(s for s in STEP_SETTINGS if s.name == ("bf16+channels_last" if ctx.cuda else "float32"))
    batch = max(z.step_batches) if ctx.cuda else 2
    if ctx.cuda:
        cuda_backends(deterministic=False)
    timing = {}
    builders = {"ours": lambda: models.inception_v3(num_classes=num_classes)}
    for name, build in usable.items():
        probe = build().to(ctx.device).train()
        with torch.no_grad():
            has_aux = isinstance(probe(torch.randn(2, 3, 299, 299, device=ctx.device)), tuple)
        del probe
        builders[name] = lambda build=build, has_aux=has_aux: PeerAdapter(build(), has_aux)
    steps = z.step_steps if ctx.cuda else 1
    for name, build in builders.items():
        log(f"peers: {name} {setting.name} batch {batch}")
        r = time_training_steps(
            build,
            setting,
            device=ctx.device,
            batch=batch,
            image_size=299,
            num_classes=num_classes,
            steps=steps,
            warmup=z.step_warmup,
        )
        timing[name] = {"images_per_s": r["images_per_s"], "step_ms": r["step_ms"]}
    for name in usable:
        timing[f"ours_over_{name}"] = timing["ours"]["images_per_s"] / timing[name]["images_per_s"]
        if ctx.cuda and timing[f"ours_over_{name}"] < 0.98:  # 2%: run-to-run spread of such timings
            res.status = "below target"
    res.figures["timing"] = {"setting": setting.name, "batch": batch, **timing}
    return res


# --- step 5: end to end, checkpoint and resume ---------------------------------------------------
def _train_state(ctx: Context, num_classes: int, seed: int, total_steps: int, channels_last: bool):
    import models
    from orchestration.config import OptimConfig, ScheduleConfig
    from orchestration.ema import ModelEma
    from orchestration.optim import build_optimizer
    from orchestration.schedule import LrSchedule

    torch.manual_seed(seed)
    model = models.inception_v3(num_classes=num_classes, width_mult=ctx.sizes.width_mult).to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = OptimConfig().lr
    optimizer = build_optimizer(model, OptimConfig(), lr)
    schedule = LrSchedule(optimizer, lr, total_steps, ScheduleConfig(), 0.0)
    return model, optimizer, schedule, ModelEma(model, 0.9999)


def _losses(state, loader, s, epoch: int, steps: int, global_step: int) -> list[float]:
    """Per-step training losses of ``steps`` steps of ``epoch`` (logged every step)."""
    from orchestration.loop import train_one_epoch

    model, optimizer, schedule, ema = state
    losses: list[float] = []
    loader.set_epoch(epoch)
    train_one_epoch(
        model,
        loader,
        optimizer,
        schedule,
        ema,
        model,
        replace(s, max_steps=steps, log_every=1),
        global_step,
        on_log=lambda m, _step: losses.append(m["train/loss"]),
    )
    return losses


def step_end_to_end(ctx: Context) -> StepResult:
    from ops.checkpoint import load_checkpoint, save_checkpoint
    from orchestration.loop import train_one_epoch
    from orchestration.step_bench import STEP_SETTINGS, loop_settings_for
    from orchestration.trainer import _rng_state, restore_training_state
    from pipeline import make_loader

    z = ctx.sizes
    num_classes = ctx.num_classes()
    setting = next(s for s in STEP_SETTINGS if s.name == ("bf16+channels_last" if ctx.cuda else "float32"))
    cfg, _ = ctx.train_data(
        "end-to-end",
        z.e2e_steps * z.e2e_batch,
        z.e2e_batch,
        layout="NHWC" if setting.channels_last else "NCHW",
    )
    if ctx.cuda:
        cuda_backends(deterministic=False)
    state = _train_state(ctx, num_classes, 0, z.e2e_steps + 2 * z.resume_steps, setting.channels_last)
    model, optimizer, schedule, ema = state
    aux = tuple(model.aux_loss_weights)
    s = replace(
        loop_settings_for(setting, ctx.device, aux), max_steps=z.e2e_steps, log_every=max(1, z.e2e_steps // 6)
    )
    loader = make_loader(cfg, "train", 0, 1, ctx.device)
    windows = []
    log(f"end-to-end: {z.e2e_steps} steps of {z.e2e_batch} ({setting.name})")
    metrics, step = train_one_epoch(
        model, loader, optimizer, schedule, ema, model, s, 0, on_log=lambda m, k: windows.append(m)
    )
    steady = windows[1:] or windows
    rate = sum(w["train/images_per_sec"] for w in steady) / max(len(steady), 1)
    wait = sum(w["train/loader_wait_frac"] for w in steady) / max(len(steady), 1)
    figures = {
        "setting": setting.name,
        "batch": z.e2e_batch,
        "steps": step,
        "epoch_images_per_s": metrics["train_images_per_sec"],
        "epoch_loader_wait_frac": metrics["train_loader_wait_frac"],
        "steady_images_per_s": rate,
        "steady_loader_wait_frac": wait,
        "windows": [{k: w[k] for k in ("train/images_per_sec", "train/loader_wait_frac")} for w in windows],
    }
    res = StepResult("end-to-end", "ok", figures=figures)
    step_rate = ctx.step_rates.get((setting.name, z.e2e_batch))
    if step_rate:
        figures["step_only_images_per_s"] = step_rate
        figures["over_step_only"] = rate / step_rate
        if ctx.cuda and (
            rate / step_rate < TARGETS["end_to_end_over_step"] or wait > TARGETS["loader_wait_frac"]
        ):
            res.status = "below target"
    else:
        res.notes.append("no step-only rate at this setting and batch (train-step step skipped?)")

    # checkpoint at the epoch boundary, then the same continuation twice: uninterrupted and resumed
    if ctx.cuda:
        cuda_backends(deterministic=True)
    ckpt = ctx.work / "checkpoint"
    save_checkpoint(
        ckpt,
        {
            "model_spec": {"name": "inception_v3", "num_classes": num_classes, "options": {}},
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "epoch": 1,
            "step": step,
            "config": {},
            "class_names": [],
            "extra": {"rng": [_rng_state()], "ema_updates": ema.num_updates, "world_size": 1},
        },
    )
    log(f"resume: {z.resume_steps} steps uninterrupted, then the same from the checkpoint")
    expected = _losses(state, loader, s, 1, z.resume_steps, step)
    del state, model, optimizer, schedule, ema, loader
    resumed = _train_state(ctx, num_classes, 1, z.e2e_steps + 2 * z.resume_steps, setting.channels_last)
    payload = load_checkpoint(ckpt, map_location=ctx.device)  # tensors mapped to the GPU: the hard case
    restore_training_state(payload, *resumed, rank=0, world_size=1)
    got = _losses(resumed, make_loader(cfg, "train", 0, 1, ctx.device), s, 1, z.resume_steps, step)
    diff = max((abs(a - b) for a, b in zip(expected, got, strict=True)), default=float("nan"))
    figures["resume"] = {
        "steps": len(got),
        "bit_exact": expected == got,
        "max_abs_loss_diff": diff,
        "losses": got,
        "expected": expected,
    }
    if expected != got:
        res.status = "fail"
        res.error = f"resumed losses differ from the uninterrupted run (max |diff| {diff:.3g})"
    if ctx.cuda:
        cuda_backends(deterministic=False)
    return res


# --- step 6: multi-crop evaluation ---------------------------------------------------------------
def step_multicrop(ctx: Context) -> StepResult:
    import models
    from ops.evaluate import evaluate_multicrop
    from pipeline.config import DataConfig

    z = ctx.sizes
    num_classes = ctx.num_classes()
    shards = ctx.shards("multicrop", {"val": ("train", z.mc_repeat), "val144": ("train", 1)})
    data = DataConfig(image_size=z.image_size, val_resize=z.val_resize)
    torch.manual_seed(0)
    calib = torch.randn(8, 3, z.image_size, z.image_size, device=ctx.device)
    members = [
        _calibrated(
            models.inception_v3(num_classes=num_classes, width_mult=z.width_mult).to(ctx.device), calib
        )
        for _ in range(2)
    ]
    rows = {}
    for crops in (1, 10, 144):
        split = "val144" if crops == 144 else "val"
        log(f"multicrop: {crops} crop(s) on split {split}")

        def run(crops=crops, split=split):
            table = evaluate_multicrop(
                members,
                str(shards),
                data=data,
                split=split,
                crops=(crops,),
                batch_size=z.mc_batch,
                device=ctx.device,
                progress=False,
                member_counts=(2,),
            )
            if ctx.cuda:
                torch.cuda.synchronize()
            return table

        if ctx.cuda:
            run()  # warm-up: cuDNN autotuning for this batch shape, nvJPEG, page cache
        start = time.perf_counter()
        table = run()
        seconds = time.perf_counter() - start
        rows[str(crops)] = {
            "images": table.num_samples,
            "seconds": seconds,
            "crops_per_s": table.num_samples * crops / seconds,
            "member_forwards_per_s": 2 * table.num_samples * crops / seconds,
        }
    return StepResult("multicrop", "ok", figures={"members": 2, "crops": rows})


STEPS: dict[str, tuple[Callable[[Context], StepResult], bool]] = {  # name -> (function, needs CUDA)
    "gpu-tests": (step_gpu_tests, True),
    "loader": (step_loader, False),
    "train-step": (step_train_step, False),
    "peers": (step_peers, False),
    "end-to-end": (step_end_to_end, False),
    "multicrop": (step_multicrop, False),
}
STEP_NAMES = tuple(STEPS)  # run in this order


# --- running and reporting -----------------------------------------------------------------------
def run_step(ctx: Context, name: str, only: set[str] | None) -> None:
    fn, needs_cuda = STEPS[name]
    if only is not None and name not in only:
        return
    if needs_cuda and not ctx.cuda:
        ctx.results.append(StepResult(name, "skipped", notes=["needs a CUDA GPU"]))
    elif ctx.left() <= 0:
        ctx.results.append(StepResult(name, "skipped", notes=["time budget spent (--budget-s)"]))
    else:
        log(f"step {name} ({ctx.left():.0f} s of the budget left)")
        start = time.perf_counter()
        try:
            res = fn(ctx)
        except Exception as exc:  # one step's failure must not hide the others
            res = StepResult(name, "fail", error=f"{type(exc).__name__}: {exc}")
            (ctx.out / "gpu_check_errors.log").open("a").write(f"--- {name}\n{traceback.format_exc()}\n")
        res.seconds = time.perf_counter() - start
        ctx.results.append(res)
        log(f"step {name}: {res.status} in {res.seconds:.1f} s" + (f" ({res.error})" if res.error else ""))
        if ctx.cuda:  # what a step leaves behind shows here, not as the next step's out-of-memory
            gc.collect()
            torch.cuda.empty_cache()
            res.cuda_gib_after = torch.cuda.memory_allocated(ctx.device) / 2**30
            log(f"  CUDA memory still allocated after {name}: {res.cuda_gib_after:.2f} GiB")
    write_report(ctx)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)


def summary_lines(ctx: Context) -> list[str]:
    """One line per step with its headline figures."""
    lines = [
        f"device: {ctx.env.get('device')}  torch {ctx.env.get('torch')}  DALI {ctx.env.get('nvidia.dali')}"
    ]
    for r in ctx.results:
        f = r.figures
        head = ""
        if r.name == "gpu-tests" and f:
            head = f"{f['passed']} passed, {f['failed']} failed, {f['error']} errors, {f['skipped']} skipped"
        elif r.name == "loader" and f:
            steady = f.get("steady_images_per_s", {})
            head = (
                ", ".join(
                    f"{k} {v:,.0f}" + (f" ({steady[k]:,.0f} steady)" if k in steady else "")
                    for k, v in f["images_per_s"].items()
                )
                + " img/s"
            )
            if "dali_mixed_over_pillow" in f:
                head += f"; mixed/pillow {f['dali_mixed_over_pillow']:.2f}x"
        elif r.name == "train-step" and f.get("rows"):
            head = (
                "; ".join(
                    f"{row['setting']}@{row['batch']} {row['images_per_s']:,.0f}"
                    + (f" ({100 * row['mfu_vs_bf16_peak']:.0f}% MFU)" if "mfu_vs_bf16_peak" in row else "")
                    for row in f["rows"]
                )
                + " img/s"
            )
            if f.get("per_tensor_over_global_clip"):
                head += "; per-tensor/global clip " + ", ".join(
                    f"{k} {v:.2f}x" for k, v in f["per_tensor_over_global_clip"].items()
                )
        elif r.name == "peers" and f:
            eq = ", ".join(
                f"{k} rel err {v['logits_rel_err']:.1e}" for k, v in f.get("equivalence", {}).items()
            )
            t = f.get("timing", {})
            speed = ", ".join(f"ours/{k[10:]} {v:.2f}x" for k, v in t.items() if k.startswith("ours_over_"))
            head = f"{eq}; {speed}"
        elif r.name == "end-to-end" and f:
            head = (
                f"{f['steady_images_per_s']:,.0f} img/s, "
                f"loader wait {100 * f['steady_loader_wait_frac']:.1f}%"
                + (f", {100 * f['over_step_only']:.0f}% of step-only" if "over_step_only" in f else "")
                + (f"; resume bit-exact: {f['resume']['bit_exact']}" if "resume" in f else "")
            )
        elif r.name == "multicrop" and f:
            head = ", ".join(f"{c} crops {v['crops_per_s']:,.0f} crops/s" for c, v in f["crops"].items())
        extra = f" [{r.error}]" if r.error else (f" [{'; '.join(r.notes)}]" if r.notes else "")
        lines.append(f"{r.name:<11} {r.status:<12} {r.seconds:6.1f} s  {head}{extra}")
    return lines


def write_report(ctx: Context) -> None:
    data = {
        "env": ctx.env,
        "smoke": ctx.smoke,
        "sizes": asdict(ctx.sizes),
        "targets": TARGETS,
        "steps": [asdict(r) for r in ctx.results],
    }
    (ctx.out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    md = ["# make gpu-check", "", "```", *summary_lines(ctx), "```", ""]
    for r in ctx.results:
        md += [f"## {r.name}: {r.status} ({r.seconds:.1f} s)", ""]
        if r.error:
            md += [f"error: `{r.error}`", ""]
        md += [f"- {n}" for n in r.notes]
        rows = r.figures.get("rows")
        if rows:
            keys = list(rows[0])
            md += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            md += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
        md += [
            "",
            "```json",
            json.dumps({k: v for k, v in r.figures.items() if k != "rows"}, indent=1, default=str),
            "```",
            "",
        ]
    (ctx.out / "gpu_check.md").write_text("\n".join(md))


def prepare_shards(source: Path, images: int, out: Path, progress: bool = True) -> Path:
    """``out``: one train shard of ``images`` real JPEGs drawn (write-time shuffle) from ``source``,
    small enough to travel to a GPU machine (~105 KB per ImageNet JPEG)."""
    import shutil

    from pipeline.schema import ShardFormatError, SplitInfo, load_manifest, write_manifest
    from pipeline.shards import build_shards

    with tempfile.TemporaryDirectory(prefix="gpucheck-build-") as tmp:
        build_shards(source, Path(tmp), "train", shard_size=images, workers=2, progress=progress)
        manifest = load_manifest(tmp)
        first = manifest.split("train").shards[0]
        if first.count < images:
            raise ShardFormatError(
                f"{source} gave {first.count} images in its first shard, fewer than {images}"
            )
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shutil.copyfile(Path(tmp) / first.tar, out / first.tar)
        shutil.copyfile(Path(tmp) / first.index, out / first.index)
        params = dict(manifest.split("train").params, subset_of=str(source))
        write_manifest(
            out, type(manifest)(classes=manifest.classes, splits={"train": SplitInfo((first,), (), params)})
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.gpu_check",
        description="Measure and check the GPU path: tests, loader, training step, peers, end to end + "
        "resume, multi-crop evaluation. Writes gpu_check.json/.md into --out.",
    )
    p.add_argument("--out", default="gpu-check-out", help="report folder (default: gpu-check-out)")
    p.add_argument(
        "--shards",
        help=f"shard folder with a 'train' split of real JPEGs (default: {DEFAULT_SHARDS}; "
        f"--smoke: built from {SMOKE_SOURCE.relative_to(REPO)})",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU; CUDA-only steps are skipped")
    p.add_argument("--only", help=f"comma list of steps to run ({', '.join(STEP_NAMES)})")
    p.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="time budget; optional parts (compile) and later steps are skipped past it (default 360)",
    )
    p.add_argument(
        "--slow-tests",
        action="store_true",
        help="gpu-tests: run the slow GPU tests too (compiled vs eager step: ~60 s more on an H200)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="DALI threads = DataLoader workers (default: CPU cores, at most 16)",
    )
    p.add_argument(
        "--prepare",
        metavar="SOURCE",
        help="build the default shard folder from SOURCE "
        "(e.g. ../shared/data/imagenet-sample-images.tar) and exit",
    )
    p.add_argument("--images", type=int, default=160, help="--prepare: images to keep (default 160, ~17 MB)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        try:
            out = prepare_shards(Path(args.prepare), args.images, Path(args.shards or DEFAULT_SHARDS))
        except (OSError, ValueError) as exc:  # missing source, too few images, foreign files: one line
            print(f"error: --prepare {args.prepare}: {exc}", file=sys.stderr)
            return 1
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        print(f"prepared {out} ({args.images} images, {size:.1f} MiB)")
        return 0
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    bad = sorted((only or set()) - set(STEP_NAMES))
    if bad:
        print(f"error: unknown step(s) {', '.join(bad)}; steps: {', '.join(STEP_NAMES)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA GPU here; run with --smoke for the CPU check of this script", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as tmp:
        work = Path(tmp)
        shards = Path(args.shards) if args.shards else None
        if shards is None and args.smoke:
            shards = prepare_shards(SMOKE_SOURCE, SMOKE_IMAGES, work / "smoke-source", progress=False)
        shards = shards or DEFAULT_SHARDS
        if not (shards / "manifest.json").exists():
            print(
                f"error: no shards at {shards}: run `make gpu-check-data` (or --prepare SOURCE) first, "
                "or pass --shards DIR",
                file=sys.stderr,
            )
            return 2
        sizes = SMOKE_SIZES if args.smoke else full_sizes(args.threads)
        ctx = Context(
            out,
            sizes,
            args.smoke,
            device,
            shards.resolve(),
            work,
            deadline=time.monotonic() + args.budget_s,
            env=environment(device),
            slow_tests=args.slow_tests,
        )
        log(f"{ctx.env['device']}, budget {args.budget_s:.0f} s, report in {out}")
        for name in STEP_NAMES:
            run_step(ctx, name, only)
    print(
        "\n".join(["", "=== make gpu-check ===", *summary_lines(ctx), f"report: {out}/gpu_check.md"]),
        flush=True,
    )
    return 1 if any(r.status == "fail" for r in ctx.results) else 0


if __name__ == "__main__":
    sys.exit(main())
