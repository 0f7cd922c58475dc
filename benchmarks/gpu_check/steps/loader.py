"""Step ``loader``: the train pipeline at 299 on real ImageNet JPEGs (replicated for steady state):
DALI "mixed" (through ``make_loader`` and bare), DALI CPU and the Pillow DataLoader, images/s each
on the same CPU threads (``benchmarks.bench_loader``), and the cost of starting an epoch (pipeline
build + first batch)."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from benchmarks.gpu_check.context import TARGETS, Context, StepResult

NAME = "loader"
ORDER = 20
NEEDS_CUDA = False


def epoch_start_s(cfg, device: str) -> float:
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


def _gpu_rates(cfg, rounds: int, rates: dict, steady: dict, figures: dict) -> None:
    from benchmarks.bench_loader import run_rounds

    gpu = run_rounds(cfg, "cuda", ["dali", "graph", "previous", "raw", "torch"], rounds)
    rates["dali_mixed"] = gpu["dali"]["images_per_s"]
    rates["dali_mixed_graph"] = gpu["graph"]["images_per_s"]  # the ordered graph without the loader
    rates["dali_mixed_previous"] = gpu["previous"]["images_per_s"]  # the replaced make_loader path
    rates["dali_mixed_bare"] = gpu["raw"]["images_per_s"]
    rates["pillow_dataloader"] = gpu["torch"]["images_per_s"]
    steady["dali_mixed"] = gpu["dali"]["steady_images_per_s"]
    steady["pillow_dataloader"] = gpu["torch"]["steady_images_per_s"]
    # an epoch's start (pipeline build + first batch), with and without pre-sized decoder buffers
    figures["epoch_start_s_dali_mixed"] = epoch_start_s(cfg, "cuda")
    figures["epoch_start_s_dali_mixed_no_preallocate"] = epoch_start_s(
        replace(cfg, dali_preallocate=False), "cuda"
    )


def run(ctx: Context) -> StepResult:
    from benchmarks.bench_loader import run_rounds

    z = ctx.sizes
    cfg, epoch_images = ctx.train_data("loader", z.loader_epoch_images, z.loader_batch)
    figures = {"threads": z.threads, "batch": z.loader_batch, "epoch_images": epoch_images}
    rates = {}
    steady = {}  # make_loader epochs after their first batch: what a long (real) epoch runs at
    if ctx.cuda:
        _gpu_rates(cfg, z.loader_rounds, rates, steady, figures)
    cpu = run_rounds(cfg, "cpu", ["dali"] if ctx.cuda else ["dali", "torch"], z.loader_rounds)
    rates["dali_cpu"] = cpu["dali"]["images_per_s"]
    steady["dali_cpu"] = cpu["dali"]["steady_images_per_s"]
    if "torch" in cpu:
        rates["pillow_dataloader"] = cpu["torch"]["images_per_s"]
        steady["pillow_dataloader"] = cpu["torch"]["steady_images_per_s"]
    figures["epoch_start_s_dali_cpu"] = epoch_start_s(cfg, "cpu")
    figures["images_per_s"] = rates
    figures["steady_images_per_s"] = steady
    res = StepResult(NAME, "ok", figures=figures)
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


def headline(f: dict) -> str:
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
    return head
