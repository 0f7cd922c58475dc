"""Multi-crop evaluation of 1..N ensemble members, as in the paper's Tables 4-5.

Library module; its command line is ``ops.evaluate_cli`` (``inception-evaluate``), and
``ops.registry`` evaluates a version's members through ``evaluate_multicrop``.

For every crop setting the eval split is read once (``pipeline.make_multicrop_loader``: DALI, GPU
"mixed" decoding where CUDA is present, CPU otherwise); every member runs on every crop, its
softmax is averaged over an image's crops, and the first k members' averages give the ensemble of
size k, so one pass fills a whole column of the table: top-1/top-5 error per (members x crops)
cell. ``log_table`` logs it to MLflow as metrics ``top1_error_m{k}_c{crops}``, a markdown table and
a PNG plot (error vs crops, one line per ensemble size).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ops.tracking import using_tracking_uri
from pipeline.multicrop import SUPPORTED_CROPS
from pipeline.progress import progress as progress_bar

# Crops per forward pass. Inception-v3's largest activation at 299 px is 64 x 147 x 147 float32 =
# 5.5 MB per crop, so 1024 crops (7 images at 144 crops) need ~6 GB per such tensor: fine on a GPU;
# on a CPU machine (24 GiB shared by every process) 256 crops keep the peak near 1.5 GB. Activations scale
# with the crop's area, so smaller inputs (the 75 px demo) get proportionally more crops per pass.
MAX_CROPS_PER_BATCH = {"cuda": 1024, "cpu": 256}
REFERENCE_SIZE = 299


def crops_per_batch(device_type: str, image_size: int) -> int:
    base = MAX_CROPS_PER_BATCH.get(device_type, MAX_CROPS_PER_BATCH["cpu"])
    return max(1, base * (REFERENCE_SIZE * REFERENCE_SIZE) // (image_size * image_size))


def binomial_stderr(error: float, n: int) -> float:
    """One standard error of an error rate measured on ``n`` images (binomial)."""
    return math.sqrt(max(error * (1 - error), 0.0) / n) if n > 0 else float("nan")


@dataclass(frozen=True)
class Difference:
    """Top-1 error of cell ``a`` minus cell ``b``, paired on the same ``n`` images, with its standard
    error (from the per-image differences): a change is only read as one beyond two standard errors."""

    a: tuple[int, int]  # (members, crops)
    b: tuple[int, int]
    diff: float
    stderr: float
    n: int

    @property
    def significant(self) -> bool:
        return abs(self.diff) > 2 * self.stderr

    def describe(self) -> str:
        (ka, ca), (kb, cb) = self.a, self.b
        what = (
            f"{ka} member{'s' if ka > 1 else ''}: {ca} vs {cb} crop{'s' if cb > 1 else ''}"
            if ka == kb
            else f"{ca} crop{'s' if ca > 1 else ''}: {ka} vs {kb} member{'s' if kb > 1 else ''}"
        )
        verdict = "beyond 2 SE" if self.significant else "within noise"
        change = f"{100 * self.diff:+.2f} ± {100 * self.stderr:.2f} points"
        return f"{what}: {change} on {self.n} images ({verdict})"


@dataclass(frozen=True)
class EvalTable:
    """Top-1/top-5 error (fractions) per (members k, crops) cell.

    ``num_samples`` images were read for every crop setting, except those in ``samples``, which
    were evaluated on the first ``samples[c]`` images of the same read order (a documented subset,
    e.g. for 144 crops on a CPU). ``hits`` holds, per cell, each image's top-1 hit in read order:
    with it, differences between cells are measured on the same images (:meth:`differences`)."""

    member_counts: tuple[int, ...]
    crops: tuple[int, ...]
    top1: dict[tuple[int, int], float]
    top5: dict[tuple[int, int], float]
    num_samples: int
    samples: dict[int, int] = field(default_factory=dict)
    hits: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    seconds: dict[int, float] = field(default_factory=dict)  # wall time of each crop setting's pass

    def images(self, crops: int) -> int:
        return self.samples.get(crops, self.num_samples)

    def stderr(self, cell: tuple[int, int], top: int = 1) -> float:
        return binomial_stderr((self.top1 if top == 1 else self.top5)[cell], self.images(cell[1]))

    def difference(self, a: tuple[int, int], b: tuple[int, int]) -> Difference | None:
        """Paired top-1 difference of cells ``a`` and ``b`` on the images both saw (None without hits)."""
        if a not in self.hits or b not in self.hits:
            return None
        n = min(len(self.hits[a]), len(self.hits[b]))
        d = self.hits[b][:n].double() - self.hits[a][:n].double()  # error(a) - error(b) per image
        mean = float(d.mean())
        se = math.sqrt(max(float((d * d).mean()) - mean * mean, 0.0) / n) if n > 1 else float("nan")
        return Difference(a, b, mean, se, n)

    def differences(self) -> list[Difference]:
        """More crops vs the first crop setting (per ensemble size), and k members vs the first
        ensemble size (per crop setting): the comparisons Tables 4-5 of the paper are read for."""
        out = []
        c0, k0 = self.crops[0], self.member_counts[0]
        for k in self.member_counts:
            out += [self.difference((k, c), (k, c0)) for c in self.crops[1:]]
        for c in self.crops:
            out += [self.difference((k, c), (k0, c)) for k in self.member_counts[1:]]
        return [d for d in out if d is not None]

    def to_markdown(self) -> str:
        head = "| members | " + " | ".join(
            f"{c} crop{'s' if c > 1 else ''} top-1 / top-5 (%)" for c in self.crops
        )
        lines = [head + " |", "|---|" + "---|" * len(self.crops)]
        for k in self.member_counts:
            cells = [
                f"{100 * self.top1[(k, c)]:.2f} ± {100 * self.stderr((k, c)):.2f} / "
                f"{100 * self.top5[(k, c)]:.2f} ± {100 * self.stderr((k, c), 5):.2f}"
                for c in self.crops
            ]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        subsets = [c for c in self.crops if self.images(c) != self.num_samples]
        note = f"error in %, ± one standard error (binomial), {self.num_samples} images"
        if subsets:
            note += "; " + ", ".join(f"{c} crops on the first {self.images(c)} of them" for c in subsets)
        text = "\n".join(lines) + f"\n\n{note}\n"
        diffs = self.differences()
        if diffs:
            text += "\nTop-1 differences, paired on the same images (± one standard error):\n"
            text += "".join(f"- {d.describe()}\n" for d in diffs)
        return text

    def metrics(self) -> dict[str, float]:
        out = {}
        for (k, c), v in self.top1.items():
            out[f"top1_error_m{k}_c{c}"] = v
            out[f"top5_error_m{k}_c{c}"] = self.top5[(k, c)]
            out[f"top1_error_se_m{k}_c{c}"] = self.stderr((k, c))
        return out


def image_hits(member_probs: torch.Tensor, labels: torch.Tensor, member_counts: Sequence[int]):
    """Per image, whether the ensemble of the first k members has its label in the top 1 / top 5.

    member_probs: [M, B, C] per-member probabilities (already averaged over crops); labels: [B].
    Returns a dict k -> (top-1 hits [B] bool, top-5 hits [B] bool) on the CPU.
    """
    cumulative = member_probs.cumsum(dim=0)  # [M, B, C]: sum over the first k members at row k-1
    labels = labels.to(member_probs.device).long()
    out = {}
    for k in member_counts:
        probs = cumulative[k - 1] / k  # [B, C]
        topk = probs.topk(min(5, probs.shape[1]), dim=1).indices  # [B, 5]
        hits = topk == labels[:, None]
        out[k] = (hits[:, 0].cpu(), hits.any(dim=1).cpu())
    return out


def correct_counts(member_probs: torch.Tensor, labels: torch.Tensor, member_counts: Sequence[int]):
    """Top-1 and top-5 hits of the ensembles of the first k members, for each k: two dicts
    k -> number of correct images in this batch."""
    hits = image_hits(member_probs, labels, member_counts)
    top1 = {k: int(h1.sum()) for k, (h1, _) in hits.items()}
    return top1, {k: int(h5.sum()) for k, (_, h5) in hits.items()}


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
    location = shards if "://" in str(shards) else str(Path(shards).resolve())
    return DataConfig(shards=location, batch_size=batch_size, backend=backend, **fields)


def evaluate_multicrop(
    members: Sequence[torch.nn.Module],
    shards: str,
    *,
    data,
    split: str = "val",
    crops: Sequence[int] = SUPPORTED_CROPS,
    member_counts: Sequence[int] | None = None,
    batch_size: int = 32,
    backend: str = "dali",
    device: str | torch.device | None = None,
    progress: bool = True,
    amp: str = "auto",
    max_images: dict[int, int] | None = None,
) -> EvalTable:
    """Top-1/top-5 error of the ensembles of the first k ``members`` for every k in ``member_counts``
    (default 1..N) and every crop setting, on ``split`` of ``shards``.

    ``data`` gives the preprocessing (a DataConfig or a dict with image_size, val_resize,
    normalization); ``batch_size`` is images per batch, lowered for many crops so that a batch
    holds at most crops_per_batch(device, image_size) crops. ``amp``: "auto" runs the networks in
    bfloat16 autocast and channels-last memory on CUDA (as training does), float32 on CPU;
    "bf16" / "off" force it. ``max_images`` ({crops: n}) evaluates those crop settings on the first
    n images of the split only (the same images for every setting: the read order is fixed).
    """
    if not members:
        raise ValueError("evaluate_multicrop needs at least one member")
    member_counts = tuple(member_counts or range(1, len(members) + 1))
    bad = [k for k in member_counts if not 1 <= k <= len(members)]
    if bad:
        raise ValueError(f"member counts {bad} are outside 1..{len(members)} (the number of members given)")
    bad = [c for c in crops if c not in SUPPORTED_CROPS]
    if bad:
        raise ValueError(f"crops {bad} are not supported: use {', '.join(map(str, SUPPORTED_CROPS))}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_flush_denormal(True)  # subnormals slow CPU convolutions ~15x (see ops.ensemble_model)
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be auto, bf16 or off, got {amp!r}")
    on_gpu = device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp == "bf16" or (amp == "auto" and on_gpu) else None
    memory_format = torch.channels_last if on_gpu else torch.preserve_format  # loader: NHWC on CUDA
    members = [m.to(device, memory_format=memory_format).eval() for m in members]
    limits = {int(c): int(n) for c, n in (max_images or {}).items() if c in crops}
    top1, top5, hits, samples, seconds, full, labels_seen = {}, {}, {}, {}, {}, None, None
    for c in crops:
        started = time.monotonic()
        limit = limits.get(c)
        h1, h5, labels_c = _crop_pass(
            members,
            shards,
            data,
            split,
            c,
            member_counts,
            batch_size,
            backend,
            device,
            amp_dtype,
            limit,
            progress,
        )
        seen = len(labels_c)
        if limit is None:
            if full is not None and seen != full:
                raise RuntimeError(f"{c} crops saw {seen} images but an earlier pass saw {full}")
            full = seen
        else:
            samples[c] = seen
        # every pass reads the split in the same order: pairing images across cells relies on it
        if labels_seen is not None:
            n = min(len(labels_seen), seen)
            if not torch.equal(labels_seen[:n], labels_c[:n]):
                raise RuntimeError(f"{c} crops read the images of {split!r} in another order than before")
        if labels_seen is None or seen > len(labels_seen):
            labels_seen = labels_c
        for k in member_counts:
            hits[(k, c)] = h1[k]
            top1[(k, c)] = 1 - float(h1[k].double().mean())
            top5[(k, c)] = 1 - float(h5[k].double().mean())
        seconds[c] = time.monotonic() - started
    num_samples = full if full is not None else max(samples.values())
    samples = {c: n for c, n in samples.items() if n != num_samples}
    return EvalTable(tuple(member_counts), tuple(crops), top1, top5, num_samples, samples, hits, seconds)


def _crop_pass(
    members, shards, data, split, c, member_counts, batch_size, backend, device, amp_dtype, limit, progress
):
    """One read of ``split`` at ``c`` crops (its first ``limit`` images when given): per ensemble size
    k, each image's top-1 and top-5 hits in read order, and the labels read."""
    from pipeline import make_multicrop_loader

    cfg = _data_config(data, shards, 1, backend)
    images_per_batch = max(1, min(batch_size, crops_per_batch(device.type, cfg.image_size) // c))
    cfg = _data_config(data, shards, images_per_batch, backend)
    loader = make_multicrop_loader(cfg, split, c, 0, 1, device)
    h1 = {k: [] for k in member_counts}
    h5 = {k: [] for k in member_counts}
    labels_c, seen = [], 0
    total = len(loader) if limit is None else min(len(loader), -(-limit // images_per_batch))
    for images, labels in progress_bar(
        loader, total=total, desc=f"{c} crop(s)", unit="batch", disable=not progress
    ):
        if limit is not None:  # the first `limit` images of the read order
            keep = min(labels.shape[0], limit - seen)
            images, labels = images[: keep * c], labels[:keep]
        probs = _member_crop_probabilities(members, images.to(device, torch.float32), c, amp_dtype)
        for k, (b1, b5) in image_hits(probs, labels, member_counts).items():
            h1[k].append(b1)
            h5[k].append(b5)
        labels_c.append(labels.cpu().long())
        seen += labels.shape[0]
        if limit is not None and seen >= limit:
            break
    loader.close()
    if seen == 0:
        raise ValueError(f"split {split!r} of {shards} yielded no images")
    return (
        {k: torch.cat(v) for k, v in h1.items()},
        {k: torch.cat(v) for k, v in h5.items()},
        torch.cat(labels_c),
    )


def plot_table(table: EvalTable, path: str | Path) -> Path:
    """PNG: top-1 (solid) and top-5 (dashed) error vs number of crops, one colour per ensemble size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, k in enumerate(table.member_counts):
        color = f"C{i}"
        for top, values, fmt in ((1, table.top1, "o-"), (5, table.top5, "s--")):
            ax.errorbar(
                table.crops,
                [100 * values[(k, c)] for c in table.crops],
                yerr=[100 * table.stderr((k, c), top) for c in table.crops],  # one standard error
                fmt=fmt,
                color=color,
                capsize=3,
                label=f"{k} model(s) top-{top}",
            )
    ax.set_xscale("log")
    ax.set_xticks(table.crops, [str(c) for c in table.crops])
    ax.set_xlabel("crops per image")
    ax.set_ylabel("error (%)")
    subset = "".join(f", {c} crops: first {table.images(c)}" for c in table.crops if c in table.samples)
    ax.set_title(f"multi-crop evaluation, {table.num_samples} images{subset} (bars: ±1 SE)", fontsize=9)
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

    from ops.tracking import shard_dataset_input
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
                    **{f"images_c{c}": n for c, n in table.samples.items()},
                }
            )
            mlflow.log_metrics(table.metrics())
            dataset = shard_dataset_input(shards, split, "evaluation")
            if dataset is not None:
                mlflow.MlflowClient().log_inputs(run.info.run_id, [dataset])
            md = Path(tmp) / "multicrop_table.md"
            md.write_text(table.to_markdown())
            mlflow.log_artifact(str(md))
            mlflow.log_artifact(str(plot_table(table, Path(tmp) / "multicrop_error.png")))
        return run.info.run_id
