"""Step ``peers``: torchvision's ``Inception3`` and timm's ``inception_v3`` load our ``state_dict``
(``strict=True``) and must give our logits to 1e-4 (float32, eval); their training step is timed
beside ours under the same loop, optimizer and settings (``benchmarks.step_bench.PeerAdapter``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.gpu_check.context import TARGETS, Context, StepResult, calibrated, cuda_backends, log

NAME = "peers"
ORDER = 40
NEEDS_CUDA = False
NUM_CLASSES = 1000
SIZE = 299  # the peers are full-width networks; 299 is their native size


def peer_nets(num_classes: int) -> dict[str, Callable[[], torch.nn.Module] | Exception]:
    """Builders of the peers' networks, or the exception that importing them raised."""
    out: dict = {}
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


def equivalence(ctx: Context, usable: dict, res: StepResult) -> dict:
    """Each peer with our weights against our logits: float32, eval, no TF32."""
    import models

    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        calib = torch.randn(8, 3, SIZE, SIZE, device=ctx.device)
        ours = calibrated(models.inception_v3(num_classes=NUM_CLASSES).to(ctx.device), calib)
        x = torch.randn(4, 3, SIZE, SIZE, device=ctx.device)
        with torch.no_grad():
            ref = ours(x).double()
        out = {}
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
                logits = net.eval()(x)
            logits = logits[0] if isinstance(logits, tuple) else logits
            rel = float((logits.double() - ref).norm() / ref.norm())
            out[name] = {"strict_load": strict, "logits_rel_err": rel}
            if not strict or rel > TARGETS["peer_logits_rel_err"]:
                res.status = "below target"
            del net
        return out
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def timing(ctx: Context, usable: dict, res: StepResult) -> dict:
    """Ours and each peer through the same loop, optimizer and settings."""
    import models
    from benchmarks.step_bench import STEP_SETTINGS, PeerAdapter, time_training_steps

    z = ctx.sizes
    setting = next(s for s in STEP_SETTINGS if s.name == ("bf16+channels_last" if ctx.cuda else "float32"))
    batch = max(z.step_batches) if ctx.cuda else 2
    if ctx.cuda:
        cuda_backends(deterministic=False)
    builders = {"ours": lambda: models.inception_v3(num_classes=NUM_CLASSES)}
    for name, build in usable.items():
        probe = build().to(ctx.device).train()
        with torch.no_grad():
            has_aux = isinstance(probe(torch.randn(2, 3, SIZE, SIZE, device=ctx.device)), tuple)
        del probe
        builders[name] = lambda build=build, has_aux=has_aux: PeerAdapter(build(), has_aux)
    out = {}
    for name, build in builders.items():
        log(f"peers: {name} {setting.name} batch {batch}")
        r = time_training_steps(
            build,
            setting,
            device=ctx.device,
            batch=batch,
            image_size=SIZE,
            num_classes=NUM_CLASSES,
            steps=z.step_steps if ctx.cuda else 1,
            warmup=z.step_warmup,
        )
        out[name] = {"images_per_s": r["images_per_s"], "step_ms": r["step_ms"]}
    for name in usable:
        out[f"ours_over_{name}"] = out["ours"]["images_per_s"] / out[name]["images_per_s"]
        if ctx.cuda and out[f"ours_over_{name}"] < 0.98:  # 2%: run-to-run spread of such timings
            res.status = "below target"
    return {"setting": setting.name, "batch": batch, **out}


def run(ctx: Context) -> StepResult:
    res = StepResult(NAME, "ok")
    peers = peer_nets(NUM_CLASSES)
    usable = {k: v for k, v in peers.items() if callable(v)}
    for name, v in peers.items():
        if not callable(v):
            res.notes.append(f"{name} skipped: not importable ({type(v).__name__}: {v})")
    if not usable:
        res.status = "skipped"
        return res
    res.figures["equivalence"] = equivalence(ctx, usable, res)
    res.figures["timing"] = timing(ctx, usable, res)
    return res


def headline(f: dict) -> str:
    eq = ", ".join(f"{k} rel err {v['logits_rel_err']:.1e}" for k, v in f.get("equivalence", {}).items())
    t = f.get("timing", {})
    speed = ", ".join(f"ours/{k[10:]} {v:.2f}x" for k, v in t.items() if k.startswith("ours_over_"))
    return f"{eq}; {speed}"
