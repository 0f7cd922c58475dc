"""``inception-evaluate`` / ``python -m ops.evaluate_cli``: multi-crop evaluation of 1..N ensemble
members from the command line, as in the paper's Tables 4-5.

Run::

    python -m ops.evaluate_cli --model models:/inception@champion --shards DIR --crops 1,10,144 --members 1..4
    inception-evaluate --model runs/a/checkpoint runs/b/checkpoint --shards DIR --split val --crops 1,10

The members come from a registered version (``models:/NAME@alias``, through ``ops.registry``) or from
checkpoint folders. The split is first checked against its manifest (``verify-shards``: sizes,
sha256, members, labels, index entries) and refused if it differs; ``ops.evaluate.evaluate_multicrop``
fills the table, which is printed and, with ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``), logged
to MLflow (``ops.evaluate.log_table``). ``--no-log`` (or ``--tracking-uri none`` with checkpoint
folders) prints the table only; a ``models:/`` URI still needs the registry to load from.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ops.evaluate import evaluate_multicrop, log_table
from pipeline.multicrop import SUPPORTED_CROPS


def load_members(model: Sequence[str], tracking_uri: str | None = None):
    """``[models:/NAME@alias]`` or checkpoint dirs -> (members, class names, preprocessing dict)."""
    from ops.checkpoint import load_checkpoint, model_from_checkpoint

    if len(model) == 1 and model[0].startswith("models:/"):
        from ops.registry import load_ensemble  # MLflow is imported only for registered models

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
    if any(c not in SUPPORTED_CROPS for c in crops):
        raise argparse.ArgumentTypeError(f"--crops {text!r}: each must be one of 1, 10, 144")
    return crops


def parse_subset(text: str) -> tuple[int, int]:
    """ "144=200" -> (144, 200): evaluate 144 crops on the first 200 images only."""
    try:
        crops, n = (int(x) for x in text.split("="))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--subset {text!r}: use CROPS=IMAGES, e.g. 144=200") from exc
    if crops not in SUPPORTED_CROPS or n < 1:
        raise argparse.ArgumentTypeError(f"--subset {text!r}: crops must be 1, 10 or 144 and images >= 1")
    return crops, n


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def check_device(device: str | None) -> None:
    """A device this machine has: one line instead of a traceback from deep inside torch."""
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r}: use cpu or cuda[:N]") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: use cpu or cuda[:N]")


NO_TRACKING = ("none", "")
MODEL_HELP = "models:/NAME@alias (or models:/NAME/VERSION), or one or more checkpoint folders"
REGISTRY_HELP = "MLflow registry for models:/ URIs (default: $MLFLOW_TRACKING_URI)"


def add_model_arguments(p: argparse.ArgumentParser, tracking_help: str = REGISTRY_HELP) -> None:
    """``--model`` and ``--tracking-uri``, as every command that loads members takes them."""
    p.add_argument("--model", nargs="+", required=True, help=MODEL_HELP)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help=tracking_help)


def registry_needed(model: Sequence[str], tracking_uri: str | None) -> str | None:
    """The one-line error for a ``models:/`` URI without a registry to load it from (None: fine)."""
    if tracking_uri is None or tracking_uri.strip().lower() in NO_TRACKING:
        if model and model[0].startswith("models:/"):
            return (
                f"{model[0]} is loaded from an MLflow registry: give --tracking-uri URI (or set "
                "MLFLOW_TRACKING_URI)"
            )
    return None


def tracking_plan(
    model: Sequence[str], tracking_uri: str | None, no_log: bool
) -> tuple[str | None, str | None]:
    """``(registry to load from, tracking URI to log to)``; ValueError before any work when a
    ``models:/`` URI has no registry to come from."""
    problem = registry_needed(model, tracking_uri)
    if problem:
        raise ValueError(f"{problem}; add --no-log to print the table without logging it")
    uri = None if tracking_uri is None or tracking_uri.strip().lower() in NO_TRACKING else tracking_uri
    return uri, (None if no_log else uri)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="inception-evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(
        p,
        "MLflow server or store: the registry models:/ URIs load from, and where the table is logged "
        "(default: $MLFLOW_TRACKING_URI; none: neither, for checkpoint folders)",
    )
    p.add_argument("--shards", required=True, help="shard folder made by build-shards")
    p.add_argument("--split", default="val", help="split of the shard folder to evaluate")
    p.add_argument(
        "--crops",
        type=parse_crops,
        default="1,10,144",
        help="crop settings, a comma list of 1 (center), 10 (corners+center, mirrored), 144 (GoogLeNet's)",
    )
    p.add_argument(
        "--members", type=parse_members, default=None, help="ensemble sizes: 1..N (all) or a list 1,2,4"
    )
    p.add_argument("--backend", choices=("dali", "torch"), default="dali", help="loader backend")
    p.add_argument(
        "--subset",
        type=parse_subset,
        action="append",
        default=[],
        metavar="CROPS=IMAGES",
        help="evaluate that crop setting on the first IMAGES images of the split only (the same images "
        "for every setting), e.g. --subset 144=200; repeatable",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per batch (fewer when crops are many)"
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--no-log", action="store_true", help="print the table only; log nothing to MLflow")
    p.add_argument("--experiment", default="inception-evaluate", help="MLflow experiment of the logged run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if isinstance(args.crops, str):  # the default, unparsed by argparse
        args.crops = parse_crops(args.crops)
    from ops.tracking import quiet_mlflow_console
    from pipeline.schema import ShardFormatError, load_manifest
    from pipeline.shards.verify import verified_manifest_hash

    quiet_mlflow_console()  # no download bar per registry artifact

    try:
        registry_uri, log_uri = tracking_plan(args.model, args.tracking_uri, args.no_log)
        check_device(args.device)
        verified_manifest_hash(args.shards, args.split)  # figures only for shards that are what they say
        shard_names = load_manifest(args.shards).class_names
        members, names, data = load_members(args.model, registry_uri)
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
            max_images=dict(args.subset),
        )
    except (ValueError, RuntimeError, ShardFormatError, OSError) as exc:
        print(f"inception-evaluate: error: {exc}", file=sys.stderr)
        return 1
    print(table.to_markdown())
    if log_uri:
        try:
            run_id = log_table(
                table,
                tracking_uri=log_uri,
                model=" ".join(args.model),
                shards=args.shards,
                split=args.split,
                experiment=args.experiment,
            )
        except Exception as exc:  # noqa: BLE001 - the table is printed above: say why it is not logged
            print(f"inception-evaluate: error: the table was not logged to {log_uri}: {exc}", file=sys.stderr)
            return 1
        print(f"logged to {log_uri} run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
