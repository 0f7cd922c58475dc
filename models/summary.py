"""Parameter and multiply-add table of a network, per top-level block and in total.

Run::

    python -m models.summary inception_v3 --image-size 299
    python -m models.summary inception_v3 --image-size 75 --width-mult 0.25 --num-classes 10
    python -m models.summary googlenet --image-size 224 --no-aux
    python -m models.summary inception_v3 -o stem=7x7 -o aux_bn=False
    inception-summary inception_v3          # the same, as the installed console script

Multiply-adds come from PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` on one image
(MACs = FLOPs / 2; convolutions and matrix products, not BatchNorm, ReLU or pooling, the convention of
the paper and timm). Auxiliary heads run only in training, so the inference total excludes them and a
second total includes them.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import MIN_INPUT_SIZE, MODELS, build_model

AUX_BLOCKS = ("AuxLogits", "aux1", "aux2")
DEFAULT_IMAGE_SIZE = {"inception_v3": 299, "googlenet": 224}  # the papers' training crop sizes


@dataclass(frozen=True)
class BlockRow:
    name: str
    output_shape: tuple[int, ...]  # of one image, without the batch dimension
    params: int
    macs: int


@dataclass(frozen=True)
class ModelSummary:
    rows: tuple[BlockRow, ...]
    params: int  # all parameters, auxiliary heads included
    params_inference: int  # without auxiliary heads
    macs: int  # one image, inference path (no auxiliary heads)
    macs_with_aux: int  # one image, training path


def summarize(model: nn.Module, image_size: int) -> ModelSummary:
    """Count parameters and multiply-adds of ``model`` per direct child on one ``image_size`` image."""
    model = model.eval()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, child in model.named_children():

        def record(_module, _inputs, output, name=name):
            tensor = output[0] if isinstance(output, tuple) else output
            shapes[name] = tuple(tensor.shape[1:])

        hooks.append(child.register_forward_hook(record))
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, image_size, image_size), with_aux=True)
    finally:
        for hook in hooks:
            hook.remove()
    root = type(model).__name__
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    rows = []
    for name, child in model.named_children():
        params = sum(p.numel() for p in child.parameters())
        rows.append(BlockRow(name, shapes.get(name, ()), params, flops.get(f"{root}.{name}", 0) // 2))
    total_params = sum(p.numel() for p in model.parameters())
    aux_params = sum(r.params for r in rows if r.name in AUX_BLOCKS)
    aux_macs = sum(r.macs for r in rows if r.name in AUX_BLOCKS)
    macs_with_aux = counter.get_total_flops() // 2
    return ModelSummary(
        tuple(rows), total_params, total_params - aux_params, macs_with_aux - aux_macs, macs_with_aux
    )


def format_table(summary: ModelSummary, title: str) -> str:
    header = ("block", "output (C x H x W)", "parameters", "MACs")
    lines = [
        (
            r.name + (" (training only)" if r.name in AUX_BLOCKS else ""),
            " x ".join(map(str, r.output_shape)),
            f"{r.params:,}",
            f"{r.macs:,}",
        )
        for r in summary.rows
    ]
    has_aux = summary.params != summary.params_inference
    totals = [("total (inference)", "", f"{summary.params_inference:,}", f"{summary.macs:,}")]
    if has_aux:
        totals.append(("total with auxiliary heads", "", f"{summary.params:,}", f"{summary.macs_with_aux:,}"))
    widths = [max(len(row[i]) for row in [header, *lines, *totals]) for i in range(4)]

    def render(row):
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "-" * len(render(header))
    out = [title, rule, render(header), rule, *map(render, lines), rule, *map(render, totals), rule]
    if has_aux:
        out.append(
            f"parameters {summary.params:,} ({summary.params_inference:,} without auxiliary heads); "
            f"multiply-adds {_short(summary.macs)} per image ({_short(summary.macs_with_aux)} in training)"
        )
    else:
        out.append(f"parameters {summary.params:,}; multiply-adds {_short(summary.macs)} per image")
    return "\n".join(out)


def _short(count: int) -> str:
    return f"{count / 1e9:.3f} G" if count >= 1e8 else f"{count / 1e6:.2f} M"


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"option must look like KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string such as stem=7x7
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.summary",
        description="Parameters and multiply-adds (PyTorch FlopCounterMode, MACs = FLOPs / 2) per block.",
    )
    parser.add_argument("model", choices=sorted(MODELS), help="network name")
    parser.add_argument(
        "--image-size", type=int, default=None, help="square input side (299 / 224 by default)"
    )
    parser.add_argument("--width-mult", type=float, default=1.0, help="filter-bank multiplier (default 1.0)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--no-aux", action="store_true", help="build without auxiliary heads")
    parser.add_argument(
        "-o",
        "--option",
        type=_parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="other constructor option, e.g. -o stem=7x7, -o aux_bn=False, -o branch3_kernel=3",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.model]
    if image_size < MIN_INPUT_SIZE:
        parser.error(f"--image-size must be at least {MIN_INPUT_SIZE}, got {image_size}")
    options = dict(args.option, width_mult=args.width_mult, aux_logits=not args.no_aux)
    try:
        model = build_model(args.model, num_classes=args.num_classes, **options)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    summary = summarize(model, image_size)
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    print(
        format_table(
            summary, f"{args.model} at {image_size}x{image_size}, {args.num_classes} classes ({shown})"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
