"""``inception-registry``: register, promote and describe the ensemble in the MLflow model registry.

Run::

    inception-registry register runs/m0/checkpoint runs:/<run_id> --name inception \\
        --crops 10 --eval-shards data/shards --tracking-uri http://127.0.0.1:5000
    inception-registry promote --name inception --version 3 [--force]
    inception-registry describe --name inception

(``python -m ops.registry_cli ...`` works the same.) The tracking URI defaults to
``$MLFLOW_TRACKING_URI``. ``promote`` exits 0 when ``champion`` moved and 3 when it did not,
printing the reason either way.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.multicrop import SUPPORTED_CROPS

NOT_PROMOTED_EXIT = 3


def _register(args) -> int:
    from ops.registry import register_ensemble

    tags = dict(t.split("=", 1) for t in args.tag)
    mv = register_ensemble(
        args.sources,
        args.name,
        tracking_uri=args.tracking_uri,
        crops=args.crops,
        eval_shards=args.eval_shards,
        eval_split=args.eval_split,
        tags=tags,
    )
    print(f"registered {mv.name} version {mv.version} (alias candidate)")
    for key in ("eval.top1_error", "eval.top5_error", "eval.shards_sha256"):
        if key in mv.tags:
            value = mv.tags[key]
            print(f"  {key} = {value}" + (f" ({100 * float(value):.2f}%)" if key.endswith("_error") else ""))
    return 0


def _promote(args) -> int:
    from ops.registry import promote

    decision = promote(args.name, args.version, force=args.force, tracking_uri=args.tracking_uri)
    print(("promoted: " if decision.promoted else "not promoted: ") + decision.reason)
    return 0 if decision.promoted else NOT_PROMOTED_EXIT


def _describe(args) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    model = client.get_registered_model(args.name)
    aliases = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    versions = sorted(client.search_model_versions(f"name='{args.name}'"), key=lambda v: int(v.version))
    print(f"{args.name}: {len(versions)} version(s)")
    for v in versions:
        tags = v.tags
        figures = (
            (
                f"top-1 error {100 * float(tags['eval.top1_error']):.2f}% "
                f"top-5 error {100 * float(tags.get('eval.top5_error', 'nan')):.2f}% "
                f"on {tags.get('eval.num_samples', '?')} images of {tags.get('eval.shards_sha256', '?')[:12]}"
            )
            if "eval.top1_error" in tags
            else "not evaluated"
        )
        print(
            f"  v{v.version} [{', '.join(aliases.get(str(v.version), [])) or '-'}] "
            f"members={tags.get('members', '?')} "
            f"crops={tags.get('crops', '?')} {figures}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inception-registry", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("register", help="log checkpoints/runs as one ensemble version (alias candidate)")
    r.add_argument("sources", nargs="+", help="checkpoint directories, runs:/<run_id>[/path] or run ids")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--crops", type=int, default=1, choices=SUPPORTED_CROPS, help="crops per image in predict")
    r.add_argument("--eval-shards", default=None, help="shard folder to evaluate on before registering")
    r.add_argument("--eval-split", default="val")
    r.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra version tag")
    pr = sub.add_parser("promote", help="move alias champion to a version if it beats the champion")
    pr.add_argument("--name", required=True)
    pr.add_argument("--version", required=True)
    pr.add_argument("--force", action="store_true", help="promote without comparing")
    d = sub.add_parser("describe", help="list versions with aliases and evaluation figures")
    d.add_argument("--name", required=True)
    args = p.parse_args(argv)
    if args.command == "register" and any("=" not in t for t in args.tag):
        p.error("--tag takes KEY=VALUE")
    if args.command == "register":
        from ops.registry import RegistryError, check_user_tags

        try:
            check_user_tags(dict(t.split("=", 1) for t in args.tag))
        except RegistryError as exc:
            p.error(str(exc))
    from mlflow.exceptions import MlflowException

    try:
        return {"register": _register, "promote": _promote, "describe": _describe}[args.command](args)
    except (RuntimeError, ValueError, OSError, MlflowException) as exc:
        print(f"inception-registry: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
