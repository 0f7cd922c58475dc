"""``inception-export``: a member, or the whole ensemble, as one ONNX file for deployment.

Run::

    inception-export --model models:/inception-v3@champion -o inception.onnx --check-images photos/ --log
    inception-export --model runs/a/checkpoint runs/b/checkpoint --member 2 -o member2.onnx

The graph takes ``images``: float32 ``[N, 3, S, S]`` crops, normalised as the model was trained
(mean/std in the file's metadata), N free; it returns ``probabilities`` ``[N, C]``: softmax of each
member's logits, averaged over the members inside the graph (the registered ensemble's rule, one
crop per row; average rows over crops for 10 or 144). The members' averaged (EMA) weights are
exported with ``torch.onnx.export`` (``dynamo=True``). Before anything is written, onnxruntime's
output is checked against PyTorch's on the ``--check-images`` (decoded and centre-cropped as
evaluation does it; a few random inputs when none are given): at most ``--rtol`` (1e-3) relative
difference, else the file is removed and the exit status is 1; the report puts beside it how much
PyTorch's own answer moves between batch sizes (float32's floor, ~1e-4). The file's metadata holds
the class names, the input size, the normalisation and where the weights came from. ``--log`` adds
the file to a registered version's run as an artifact (``onnx/``) and tags the version with its path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

CHECK_BATCH = 8


class EnsembleGraph(nn.Module):
    """Mean over members of softmax(logits): what ``EnsembleModel`` computes per crop."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(images).float(), dim=1) for m in self.members]).mean(dim=0)


def check_inputs(ens, paths: list[str], limit: int = CHECK_BATCH) -> tuple[torch.Tensor, int]:
    """Centre crops of up to ``limit`` real images (``(tensor, how many)``), or random inputs."""
    from ops.predict import iter_inputs
    from pipeline.multicrop import preprocess_images

    crops = []
    for _, data in iter_inputs(paths):
        if isinstance(data, Exception):
            continue
        try:
            crops.append(preprocess_images([data], 1, ens.data_config))
        except ValueError:
            continue
        if len(crops) == limit:
            break
    if crops:
        return torch.cat(crops).float().contiguous(), len(crops)
    size = ens.data_config.image_size
    return torch.randn(limit, 3, size, size, generator=torch.Generator().manual_seed(0)), 0


def export(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    graph.eval()
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        graph,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def compare(path: Path, graph: nn.Module, inputs: torch.Tensor) -> tuple[float, float]:
    """``(onnxruntime against PyTorch, PyTorch one image at a time against the whole batch)``: the
    largest probability difference relative to the largest probability. The second is float32's own
    floor here (another batch size, other convolution kernels): ~1e-4 for a width-1/8 member."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": inputs.numpy()})[0])
    # onnxruntime keeps subnormal numbers; a loaded ensemble flushes them to zero on the CPU for speed
    # (EnsembleModel.setup, ops.predict.load_ensemble): the reference keeps them too, like with like
    torch.set_flush_denormal(False)
    try:
        with torch.no_grad():
            want = graph(inputs)
            one_by_one = torch.cat([graph(inputs[i : i + 1]) for i in range(len(inputs))])
    finally:
        torch.set_flush_denormal(True)
    return relative(got, want), relative(one_by_one, want)


def write_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def log_to_registry(model_uri: str, path: Path, tracking_uri: str) -> str:
    """Add the file to the version's registration run, beside the model (``onnx/<name>``); returns
    the artifact path."""
    from mlflow import MlflowClient

    from ops.registry import resolve_version

    client = MlflowClient(tracking_uri=tracking_uri)
    mv = resolve_version(client, model_uri)
    run_id = mv.tags.get("registration_run") or mv.run_id
    client.log_artifact(run_id, str(path), "onnx")
    artifact = f"onnx/{path.name}"
    client.set_model_version_tag(mv.name, mv.version, "onnx.artifact", f"runs:/{run_id}/{artifact}")
    return f"runs:/{run_id}/{artifact}"


def parser() -> argparse.ArgumentParser:
    from ops.evaluate_cli import add_model_arguments

    p = argparse.ArgumentParser(
        prog="inception-export",
        description="Export a registered ensemble (members averaged in the graph), or one member, as ONNX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument(
        "--member", type=int, default=0, help="export member K alone (1-based); 0: the whole ensemble"
    )
    p.add_argument(
        "--check-images",
        nargs="*",
        default=[],
        help="image files, folders or tars to compare onnxruntime with PyTorch on (first 8 images)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-3,
        help="largest probability difference accepted, relative to the largest probability (float32 "
        "itself moves ~1e-4 between batch sizes)",
    )
    p.add_argument("--log", action="store_true", help="add the file to the registered version's run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ops.checkpoint import CheckpointError
    from ops.evaluate_cli import registry_needed
    from ops.predict import load_ensemble
    from ops.registry import RegistryError
    from pipeline.config import NORMALIZATIONS

    registered = args.model[0].startswith("models:/")
    problem = registry_needed(args.model, args.tracking_uri)
    if problem:
        print(f"inception-export: error: {problem}", file=sys.stderr)
        return 2
    if args.log and not registered:
        print(
            "inception-export: error: --log needs a registered version (--model models:/...)", file=sys.stderr
        )
        return 2
    try:
        ens = load_ensemble(args.model, args.tracking_uri, 1, "cpu")
    except (ValueError, OSError, RegistryError, CheckpointError) as exc:
        print(f"inception-export: error: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.member <= len(ens.members):
        print(
            f"inception-export: error: --member {args.member}: the model has {len(ens.members)}",
            file=sys.stderr,
        )
        return 2
    members = [ens.members[args.member - 1]] if args.member else list(ens.members)
    graph = EnsembleGraph(members).eval()
    inputs, real = check_inputs(ens, args.check_images)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    export(graph, inputs[:2], out)
    diff, floor = compare(out, graph, inputs)
    checked_on = f"{real} real image(s)" if real else f"{len(inputs)} random inputs (no --check-images)"
    if not diff <= args.rtol:
        out.unlink(missing_ok=True)
        print(
            f"inception-export: error: onnxruntime differs from PyTorch by {diff:.2e} (relative) on "
            f"{checked_on}, above --rtol {args.rtol:g} (PyTorch alone, one image at a time against the "
            f"batch: {floor:.1e}); nothing written",
            file=sys.stderr,
        )
        return 1
    mean, std = NORMALIZATIONS[ens.data_config.normalization]
    write_metadata(
        out,
        {
            "class_names": json.dumps(list(ens.class_names)),
            "input": f"float32 [N, 3, {ens.data_config.image_size}, {ens.data_config.image_size}], RGB, NCHW",
            "normalization": json.dumps({"name": ens.data_config.normalization, "mean": mean, "std": std}),
            "val_resize": str(ens.data_config.val_resize),
            "members": str(len(members)),
            "source": " ".join(args.model) + (f" member {args.member}" if args.member else ""),
        },
    )
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {len(members)} member(s); onnxruntime matches "
        f"PyTorch within {diff:.1e} (relative) on {checked_on}; PyTorch alone, one image at a time against "
        f"the batch: {floor:.1e}"
    )
    if args.log:
        print(f"logged as {log_to_registry(args.model[0], out, args.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
