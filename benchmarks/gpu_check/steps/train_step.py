"""Step ``train-step``: full Inception-v3 at 299 on synthetic device batches through the product's
loop (``benchmarks.step_bench``): float32, bf16 autocast, + channels_last, + ``torch.compile``;
batch 128 and 256; images/s and model FLOP utilisation (3 x forward multiply-adds x 2 FLOP). The
default clipping (per tensor, as TF-slim) is timed against one global norm, side by side."""

from __future__ import annotations

from benchmarks.gpu_check.context import TARGETS, Context, StepResult, bf16_peak, cuda_backends, log

NAME = "train-step"
ORDER = 30
NEEDS_CUDA = False
COMPILE_NEEDS_S = 150  # budget a compiled setting needs (its warm-up is the compilation)


def our_model(ctx: Context, num_classes: int):
    import models

    return lambda: models.inception_v3(num_classes=num_classes, width_mult=ctx.sizes.width_mult)


def flops_per_image(ctx: Context, num_classes: int) -> float:
    from models.summary import summarize

    summary = summarize(our_model(ctx, num_classes)(), ctx.sizes.image_size)
    return 3 * 2 * summary.macs_with_aux  # forward + backward (~2x forward), 2 FLOP per multiply-add


def plan(settings, batches: tuple[int, ...]) -> list:
    """``(setting, batch)`` in the order they run: every eager setting at the largest batch, the
    fastest eager one at every batch, global clipping beside it; compiled settings last (their
    warm-up is the compilation, ~100 s each on an H200's 16 cores), largest batch first; the second
    compilation of the same graph (global clipping) hits the cache."""
    big = max(batches)
    fastest_eager = [s for s in settings if not s.compile][-1]
    order = [(s, big) for s in settings if not s.compile]
    order += [(fastest_eager, b) for b in batches if b != big]
    order += [(fastest_eager.with_clip("global"), big)]
    compiled = [s for s in settings if s.compile]
    order += [(s, big) for s in compiled] + [(s.with_clip("global"), big) for s in compiled]
    order += [(s, b) for s in compiled for b in sorted(batches, reverse=True) if b != big]
    return order


def run(ctx: Context) -> StepResult:
    from benchmarks.step_bench import STEP_SETTINGS, time_training_steps

    z = ctx.sizes
    num_classes = 1000 if not ctx.smoke else ctx.num_classes()
    flops = flops_per_image(ctx, num_classes)
    peak = bf16_peak(ctx.env) if ctx.cuda else None
    settings = (
        STEP_SETTINGS
        if ctx.cuda
        else [s for s in STEP_SETTINGS if s.name in ("float32", "bf16+channels_last")]
    )
    rows, notes = [], []
    if ctx.cuda:
        cuda_backends(deterministic=False)
    for setting, batch in plan(settings, z.step_batches):
        if setting.compile and ctx.left() < COMPILE_NEEDS_S:
            notes.append(f"{setting.name} at batch {batch} skipped: {ctx.left():.0f} s of the budget left")
            continue
        log(f"train-step {setting.name} batch {batch}")
        r = time_training_steps(
            our_model(ctx, num_classes),
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
    return _result(ctx, rows, notes, flops, max(z.step_batches))


def _result(ctx: Context, rows: list[dict], notes: list[str], flops: float, big: int) -> StepResult:
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
    res = StepResult(NAME, "ok", figures=figures, notes=notes)
    if ctx.cuda and (best is None or best["images_per_s"] < TARGETS["step_images_per_s"]):
        res.status = "below target"
    return res


def headline(f: dict) -> str:
    if not f.get("rows"):
        return ""
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
    return head
