"""Step ``multicrop``: ``ops.evaluate.evaluate_multicrop`` of a 2-member ensemble at 1, 10 and 144
crops, crops/s (after a warm-up pass on a GPU: cuDNN autotuning, nvJPEG, page cache)."""

from __future__ import annotations

import time

import torch

from benchmarks.gpu_check.context import Context, StepResult, calibrated, log

NAME = "multicrop"
ORDER = 60
NEEDS_CUDA = False
MEMBERS = 2


def run(ctx: Context) -> StepResult:
    import models
    from ops.evaluate import evaluate_multicrop
    from pipeline.config import DataConfig
    from pipeline.multicrop import SUPPORTED_CROPS

    z = ctx.sizes
    num_classes = ctx.num_classes()
    shards = ctx.shards("multicrop", {"val": ("train", z.mc_repeat), "val144": ("train", 1)})
    data = DataConfig(image_size=z.image_size, val_resize=z.val_resize)
    torch.manual_seed(0)
    calib = torch.randn(8, 3, z.image_size, z.image_size, device=ctx.device)
    members = [
        calibrated(
            models.inception_v3(num_classes=num_classes, width_mult=z.width_mult).to(ctx.device), calib
        )
        for _ in range(MEMBERS)
    ]
    rows = {}
    for crops in SUPPORTED_CROPS:
        split = "val144" if crops == 144 else "val"
        log(f"multicrop: {crops} crop(s) on split {split}")

        def run_once(crops=crops, split=split):
            table = evaluate_multicrop(
                members,
                str(shards),
                data=data,
                split=split,
                crops=(crops,),
                batch_size=z.mc_batch,
                device=ctx.device,
                progress=False,
                member_counts=(MEMBERS,),
            )
            if ctx.cuda:
                torch.cuda.synchronize()
            return table

        if ctx.cuda:
            run_once()  # warm-up: cuDNN autotuning for this batch shape, nvJPEG, page cache
        start = time.perf_counter()
        table = run_once()
        seconds = time.perf_counter() - start
        rows[str(crops)] = {
            "images": table.num_samples,
            "seconds": seconds,
            "crops_per_s": table.num_samples * crops / seconds,
            "member_forwards_per_s": MEMBERS * table.num_samples * crops / seconds,
        }
    return StepResult(NAME, "ok", figures={"members": MEMBERS, "crops": rows})


def headline(f: dict) -> str:
    return ", ".join(f"{c} crops {v['crops_per_s']:,.0f} crops/s" for c, v in f["crops"].items())
