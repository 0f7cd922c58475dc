"""Multi-crop evaluation of 1..N ensemble members, as in the paper's Tables 4-5.

Run::

    python -m ops.evaluate --model models:/inception@champion --shards DIR --crops 1,10,144 --members 1..4
    inception-evaluate --model runs/a/checkpoint runs/b/checkpoint --shards DIR --split val --crops 1,10

For every crop setting the eval split is read once (``pipeline.make_multicrop_loader``: DALI, GPU
"mixed" decoding where CUDA is present, CPU otherwise); every member runs on every crop, its
softmax is averaged over an image's crops, and the first k members' averages give the ensemble of
size k, so one pass fills a whole column of the table. Prints top-1/top-5 error per (members x
crops) cell and, with ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``), logs them to MLflow as
metrics ``top1_error_m{k}_c{crops}``, a markdown table and a PNG plot (error vs crops, one line per
ensemble size). ``evaluate_multicrop`` is the Python API used by the registry.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

PAPER_CROPS = (1, 10, 144)  # paper §8 / Tables 4-5: single crop, 10 crops, 144 crops
# Crops per forward pass. Inception-v3's largest activation at 299 px is 64 x 147 x 147 float32 =
# 5.5 MB per crop, so 1024 crops (7 images at 144 crops) need ~6 GB per such tensor: fine on a GPU;
# on a CPU machine (DESIGN.md: 24 GiB shared) 256 crops keep the peak near 1.5 GB. Activations scale
# with the crop's area, so smaller inputs (the 75 px demo) get proportionally more crops per pass.
MAX_CROPS_PER_BATCH = {"cuda": 1024, "cpu": 256}
REFERENCE_SIZE = 299


def crops_per_batch(device_type: str, image_size: int) -> int:
    base = MAX_CROPS_PER_BATCH.get(device_type, MAX_CROPS_PER_BATCH["cpu"])
    return max(1, base * (REFERENCE_SIZE * REFERENCE_SIZE) // (image_size * image_size))


@dataclass(frozen=True)
class EvalTable:
    """Top-1/top-5 error (fractions) per (members k, crops) cell on ``num_samples`` images."""

    member_counts: tuple[int, ...]
    crops: tuple[int, ...]
    top1: dict[tuple[int, int], float]
    top5: dict[tuple[int, int], float]
    num_samples: int

    def to_markdown(self) -> str:
        head = "| members | " + " | ".join(
            f"{c} crop{'s' if c > 1 else ''} top-1 / top-5 (%)" for c in self.crops
        )
        lines = [head + " |", "|---|" + "---|" * len(self.crops)]
        for k in self.member_counts:
            cells = [f"{100 * self.top1[(k, c)]:.2f} / {100 * self.top5[(k, c)]:.2f}" for c in self.crops]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + f"\n\nerror in %, {self.num_samples} images\n"

    def metrics(self) -> dict[str, float]:
        out = {}
        for (k, c), v in self.top1.items():
            out[f"top1_error_m{k}_c{c}"] = v
            out[f"top5_error_m{k}_c{c}"] = self.top5[(k, c)]
        return out


def correct_counts(member_probs: torch.Tensor, labels: torch.Tensor, member_counts: Sequence[int]):
    """Top-1 and top-5 hits of the ensembles of the first k members, for each k.

    member_probs: [M, B, C] per-member probabilities (already averaged over crops); labels: [B].
    Returns two dicts k -> number of correct images in this batch.
    """
    cumulative = member_probs.cumsum(dim=0)  # [M, B, C]: sum over the first k members at row k-1
    labels = labels.to(member_probs.device).long()
    top1, top5 = {}, {}
    for k in member_counts:
        probs = cumulative[k - 1] / k  # [B, C]
        topk = probs.topk(min(5, probs.shape[1]), dim=1).indices  # [B, 5]
        hits = topk == labels[:, None]
        top1[k] = int(hits[:, 0].sum())
        top5[k] = int(hits.any(dim=1).sum())
    return top1, top5


@torch.no_grad()
def _member_crop_probabilities(
    members, images: torch.Tensor, crops: int, amp_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """images [B*K, 3, S, S] -> per-member probabilities averaged over each image's K crops: [M, B, C].
    With ``amp_dtype`` the networks run under autocast; softmax and averages stay float32."""
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = [m(images) for m in members]
    probs = torch.stack([torch.softmax(x.float(), dim=1) for x in logits])  # [M, B*K, C]
    return probs.view(probs.shape[0], -1, crops, probs.shape[-1]).mean(dim=2)


def _data_config(data, shards: str, batch_size: int, backend: str):
    from pipeline.config import DataConfig

    if isinstance(data, DataConfig):
        fields = {k: getattr(data, k) for k in ("image_size", "val_resize", "normalization")}
    else:
        fields = {k: data[k] for k in ("image_size", "val_resize", "normalization")}
    return DataConfig(shards=str(Path(shards).resolve()), batch_size=batch_size, backend=backend, **fields)


def evaluate_multicrop(
    members: Sequence[torch.nn.Module],
    shards: str,
    *,
    data,
    split: str = "val",
    crops: Sequence[int] = PAPER_CROPS,
    member_counts: Sequence[int] | None = None,
    batch_size: int = 32,
    backend: str = "dali",
    device: str | torch.device | None = None,
    progress: bool = True,
    amp: str = "auto",
) -> EvalTable:
    """Top-1/top-5 error of the ensembles of the first k ``members`` for every k in ``member_counts``
    (default 1..N) and every crop setting, on ``split`` of ``shards``.

    ``data`` gives the preprocessing (a DataConfig or a dict with image_size, val_resize,
    normalization); ``batch_size`` is images per batch, lowered for many crops so that a batch
    holds at most crops_per_batch(device, image_size) crops. ``amp``: "auto" runs the networks in
    bfloat16 autocast and channels-last memory on CUDA (as training does), float32 on CPU;
    "bf16" / "off" force it.
    """
    from pipeline import make_multicrop_loader

    if not members:
        raise ValueError("evaluate_multicrop needs at least one member")
    member_counts = tuple(member_counts or range(1, len(members) + 1))
    bad = [k for k in member_counts if not 1 <= k <= len(members)]
    if bad:
        raise ValueError(f"member counts {bad} are outside 1..{len(members)} (the number of members given)")
    bad = [c for c in crops if c not in PAPER_CROPS]
    if bad:
        raise ValueError(f"crops {bad} are not supported: use {', '.join(map(str, PAPER_CROPS))}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_flush_denormal(True)  # subnormals slow CPU convolutions ~15x (see ops.ensemble_model)
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be auto, bf16 or off, got {amp!r}")
    on_gpu = device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp == "bf16" or (amp == "auto" and on_gpu) else None
    memory_format = torch.channels_last if on_gpu else torch.preserve_format  # loader: NHWC on CUDA
    members = [m.to(device, memory_format=memory_format).eval() for m in members]
    top1, top5, num_samples = {}, {}, None
    for c in crops:
        cfg = _data_config(data, shards, 1, backend)
        images_per_batch = max(1, min(batch_size, crops_per_batch(device.type, cfg.image_size) // c))
        cfg = _data_config(data, shards, images_per_batch, backend)
        loader = make_multicrop_loader(cfg, split, c, 0, 1, device)
        hits1, hits5, seen = dict.fromkeys(member_counts, 0), dict.fromkeys(member_counts, 0), 0
        for images, labels in tqdm(
            loader, total=len(loader), desc=f"{c} crop(s)", unit="batch", disable=not progress
        ):
            probs = _member_crop_probabilities(members, images.to(device, torch.float32), c, amp_dtype)
            b1, b5 = correct_counts(probs, labels, member_counts)
            for k in member_counts:
                hits1[k] += b1[k]
                hits5[k] += b5[k]
            seen += labels.shape[0]
        if seen == 0:
            raise ValueError(f"split {split!r} of {shards} yielded no images")
        if num_samples is not None and seen != num_samples:
            raise RuntimeError(f"{c} crops saw {seen} images but an earlier pass saw {num_samples}")
        num_samples = seen
        for k in member_counts:
            top1[(k, c)] = 1 - hits1[k] / seen
            top5[(k, c)] = 1 - hits5[k] / seen
    return EvalTable(tuple(member_counts), tuple(crops), top1, top5, num_samples)


def plot_table(table: EvalTable, path: str | Path) -> Path:
    """PNG: top-1 (solid) and top-5 (dashed) error vs number of crops, one colour per ensemble size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, k in enumerate(table.member_counts):
        color = f"C{i}"
        ax.plot(
            table.crops,
            [100 * table.top1[(k, c)] for c in table.crops],
            "o-",
            color=color,
            label=f"{k} model(s) top-1",
        )
        ax.plot(
            table.crops,
            [100 * table.top5[(k, c)] for c in table.crops],
            "s--",
            color=color,
            label=f"{k} model(s) top-5",
        )
    ax.set_xscale("log")
    ax.set_xticks(table.crops, [str(c) for c in table.crops])
    ax.set_xlabel("crops per image")
    ax.set_ylabel("error (%)")
    ax.set_title(f"multi-crop evaluation, {table.num_samples} images")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def log_table(
    table: EvalTable,
    *,
    tracking_uri: str | None,
    model: str,
    shards: str,
    split: str,
    experiment: str = "inception-evaluate",
) -> str:
    """Log the table to MLflow (metrics, markdown, PNG); returns the run id."""
    import mlflow

    from ops.registry import using_tracking_uri
    from pipeline.schema import manifest_sha256

    with using_tracking_uri(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name="multicrop-eval") as run:
            mlflow.set_tags(
                {"model": model[:5000], "eval.shards_sha256": manifest_sha256(shards), "eval.split": split}
            )
            mlflow.log_params(
                {
                    "crops": ",".join(map(str, table.crops)),
                    "num_samples": table.num_samples,
                    "member_counts": ",".join(map(str, table.member_counts)),
                }
            )
            mlflow.log_metrics(table.metrics())
            md = Path(tmp) / "multicrop_table.md"
            md.write_text(table.to_markdown())
            mlflow.log_artifact(str(md))
            mlflow.log_artifact(str(plot_table(table, Path(tmp) / "multicrop_error.png")))
        return run.info.run_id


def load_members(model: Sequence[str], tracking_uri: str | None = None):
    """``[models:/NAME@alias]`` or checkpoint dirs -> (members, class names, preprocessing dict)."""
    from ops.checkpoint import load_checkpoint, model_from_checkpoint

    if len(model) == 1 and model[0].startswith("models:/"):
        from ops.registry import load_ensemble

        ens = load_ensemble(model[0], tracking_uri=tracking_uri)
        d = ens.data_config
        return (
            ens.members,
            ens.class_names,
            {"image_size": d.image_size, "val_resize": d.val_resize, "normalization": d.normalization},
        )
    members, names, data = [], None, None
    for path in model:
        payload = load_checkpoint(path)
        members.append(model_from_checkpoint(payload, weights="ema"))
        this = {k: payload["config"]["data"][k] for k in ("image_size", "val_resize", "normalization")}
        if names is not None and (list(payload["class_names"]) != names or this != data):
            raise ValueError(f"{path}: class names or preprocessing differ from {model[0]}'s")
        names, data = list(payload["class_names"]), this
    return members, names, data


def parse_members(text: str) -> list[int]:
    """ "1..4" -> [1, 2, 3, 4]; "1,2,4" -> [1, 2, 4]."""
    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split(".."))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--members {text!r}: use a range 1..N or a list 1,2,4") from exc


def parse_crops(text: str) -> list[int]:
    try:
        crops = [int(x) for x in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--crops {text!r}: use a list such as 1,10,144") from exc
    if any(c not in PAPER_CROPS for c in crops):
        raise argparse.ArgumentTypeError(f"--crops {text!r}: each must be one of 1, 10, 144")
    return crops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inception-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        nargs="+",
        required=True,
        help="models:/NAME@alias (or models:/NAME/VERSION), or one or more checkpoint directories",
    )
    p.add_argument("--shards", required=True, help="shard folder made by build-shards")
    p.add_argument("--split", default="val")
    p.add_argument("--crops", type=parse_crops, default=list(PAPER_CROPS), help="comma list of 1, 10, 144")
    p.add_argument(
        "--members", type=parse_members, default=None, help="ensemble sizes: 1..N (default) or 1,2,4"
    )
    p.add_argument(
        "--backend", choices=("dali", "torch"), default="dali", help="loader backend (default dali)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (fewer when crops are many)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI to log the table to (default: $MLFLOW_TRACKING_URI; none: no logging)",
    )
    p.add_argument("--experiment", default="inception-evaluate")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from pipeline.schema import ShardFormatError, load_manifest

    try:
        shard_names = load_manifest(args.shards).class_names
        members, names, data = load_members(args.model, args.tracking_uri)
        if shard_names != names:
            raise ValueError(
                f"{args.shards}: its {len(shard_names)} classes differ from the model's {len(names)}"
            )
        table = evaluate_multicrop(
            members,
            args.shards,
            data=data,
            split=args.split,
            crops=args.crops,
            member_counts=args.members,
            batch_size=args.batch_size,
            backend=args.backend,
            device=args.device,
            progress=not args.no_progress,
        )
    except (ValueError, RuntimeError, ShardFormatError, OSError) as exc:
        print(f"inception-evaluate: error: {exc}", file=sys.stderr)
        return 1
    print(table.to_markdown())
    if args.tracking_uri:
        run_id = log_table(
            table,
            tracking_uri=args.tracking_uri,
            model=" ".join(args.model),
            shards=args.shards,
            split=args.split,
            experiment=args.experiment,
        )
        print(f"logged to {args.tracking_uri} run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
