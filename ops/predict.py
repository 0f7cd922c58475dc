"""``inception-predict``: class predictions for image files, folders and tar archives.

Run::

    inception-predict cat.jpg photos/ more.tar --model models:/inception-v3@champion --top-k 5
    inception-predict photos/ --model runs/a/checkpoint runs/b/checkpoint --crops 10 --format csv -o out.csv

The members come from a registered version (``models:/NAME@alias``, through ``ops.registry``) or from
checkpoint folders (their averaged, EMA, weights); each image is decoded, turned upright by its EXIF
orientation and cropped as evaluation and serving do it (1, 10 or 144 crops), every member runs on
every crop, and the probabilities are averaged (``ops.ensemble_model.EnsembleModel``). Folders are
read recursively; tar archives are read member by member (regular files only, nothing is extracted).
A file that is not a decodable image is listed at the end with the reason, and the others are still
predicted; the exit status is then 1 (0: every image predicted, 2: bad arguments).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CHUNK = 16  # images per forward pass (fewer crops each when crops are many: EnsembleModel splits)


@dataclass(frozen=True)
class Prediction:
    source: str
    classes: list[str]
    indices: list[int]
    probabilities: list[float]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def iter_inputs(paths: Sequence[str]) -> Iterator[tuple[str, bytes | Exception]]:
    """``(name, bytes)`` of every image in the paths, in order; ``(name, error)`` for what cannot be read."""
    for path in paths:
        p = Path(path)
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file() and is_image_name(x.name)):
                yield from _read_file(f)
        elif p.is_file() and tarfile.is_tarfile(p) and not is_image_name(p.name):
            yield from _read_tar(p)
        elif p.is_file():
            yield from _read_file(p)
        else:
            yield str(p), FileNotFoundError("no such file or folder")


def _read_file(path: Path) -> Iterator[tuple[str, bytes | Exception]]:
    try:
        yield str(path), path.read_bytes()
    except OSError as exc:
        yield str(path), exc


def _read_tar(path: Path) -> Iterator[tuple[str, bytes | Exception]]:
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not (member.isreg() and is_image_name(member.name)):
                    continue  # links, devices, folders, non-images: never followed or written anywhere
                fh = tar.extractfile(member)
                yield f"{path}:{member.name}", fh.read() if fh else OSError("unreadable member")
    except (tarfile.TarError, OSError) as exc:
        yield str(path), exc


def load_ensemble(model: Sequence[str], tracking_uri: str | None, crops: int | None, device: str | None):
    """An ``EnsembleModel`` from a registered version or checkpoint folders."""
    from ops.ensemble_model import EnsembleModel
    from ops.evaluate_cli import load_members
    from pipeline.config import DataConfig

    if len(model) == 1 and model[0].startswith("models:/"):
        from ops.registry import load_ensemble as load_registered

        ens = load_registered(model[0], tracking_uri=tracking_uri)
    else:
        members, names, data = load_members(model)
        ens = EnsembleModel()
        ens.members, ens.class_names = members, list(names)
        ens.data_config = DataConfig(**data)
        ens.crops = 1
    import torch

    torch.set_flush_denormal(True)  # as EnsembleModel.setup: subnormal activations are ~15x slower on CPUs
    ens.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ens.members = [m.to(ens.device).eval() for m in ens.members]
    ens.crops = crops or ens.crops
    return ens


def predict(ens, inputs: Iterator[tuple[str, bytes | Exception]], top_k: int, show_progress: bool):
    """``(predictions, failures)``: failures are ``(source, reason)``, the others are still predicted."""
    from ops.ensemble_model import EnsembleInputError
    from pipeline.progress import progress

    done: list[Prediction] = []
    failed: list[tuple[str, str]] = []
    bar = progress(desc="predict", unit="img", disable=not show_progress)

    def run(chunk: list[tuple[str, bytes]]) -> None:
        try:
            frame = ens.predict_images([b for _, b in chunk], top_k=top_k, crops=ens.crops)
        except EnsembleInputError as exc:
            if len(chunk) > 1:  # find the undecodable one(s): the rest still get their answer
                for item in chunk:
                    run([item])
                return
            failed.append((chunk[0][0], exc.message.replace("row 0 of column 'image' ", "", 1)))
            bar.update(1)
            return
        for (name, _), row in zip(chunk, frame.itertuples(index=False), strict=True):
            probabilities = [float(q) for q in row.probabilities]
            done.append(Prediction(name, list(row.classes), list(row.indices), probabilities))
        bar.update(len(chunk))

    chunk: list[tuple[str, bytes]] = []
    for name, data in inputs:
        if isinstance(data, Exception):
            failed.append((name, f"{type(data).__name__}: {data}"))
            continue
        chunk.append((name, data))
        if len(chunk) == CHUNK:
            run(chunk)
            chunk = []
    if chunk:
        run(chunk)
    bar.close()
    return done, failed


def write(predictions: list[Prediction], fmt: str, out) -> None:
    if fmt == "json":
        for p in predictions:
            out.write(json.dumps(p.__dict__) + "\n")
    elif fmt == "csv":
        w = csv.writer(out)
        w.writerow(["source", "rank", "class", "index", "probability"])
        for p in predictions:
            for r, (c, i, q) in enumerate(zip(p.classes, p.indices, p.probabilities, strict=True), 1):
                w.writerow([p.source, r, c, i, f"{q:.6f}"])
    else:
        width = max([len(p.source) for p in predictions] + [6])
        out.write(f"{'source':<{width}}  top classes (probability)\n")
        for p in predictions:
            best = "  ".join(f"{c} ({q:.1%})" for c, q in zip(p.classes, p.probabilities, strict=True))
            out.write(f"{p.source:<{width}}  {best}\n")


def parser() -> argparse.ArgumentParser:
    from ops.evaluate_cli import add_model_arguments
    from pipeline.multicrop import SUPPORTED_CROPS

    p = argparse.ArgumentParser(
        prog="inception-predict",
        description=__doc__.split("\n\n")[0].strip("`").replace("``", ""),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) and tar archives")
    add_model_arguments(p)
    p.add_argument(
        "--crops",
        type=int,
        choices=SUPPORTED_CROPS,
        default=None,
        help="crops per image (default: the registered version's setting; 1 for checkpoints)",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per image, best first (0: every class)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    p.add_argument("-o", "--output", default=None, help="write the predictions here instead of stdout")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ops.checkpoint import CheckpointError
    from ops.evaluate_cli import check_device, registry_needed
    from ops.registry import RegistryError
    from ops.tracking import quiet_mlflow_console

    quiet_mlflow_console()
    if args.top_k < 0:
        print("inception-predict: error: --top-k must be >= 0 (0: every class)", file=sys.stderr)
        return 2
    problem = registry_needed(args.model, args.tracking_uri)
    if problem:
        print(f"inception-predict: error: {problem}", file=sys.stderr)
        return 2
    try:
        check_device(args.device)
        ens = load_ensemble(args.model, args.tracking_uri, args.crops, args.device)
    except (ValueError, OSError, RegistryError, CheckpointError) as exc:
        print(f"inception-predict: error: {exc}", file=sys.stderr)
        return 2
    predictions, failed = predict(ens, iter_inputs(args.inputs), args.top_k, not args.no_progress)
    if args.output:
        with open(args.output, "w", newline="") as out:
            write(predictions, args.format, out)
    else:
        write(predictions, args.format, sys.stdout)
    for source, reason in failed:
        print(f"not predicted: {source}: {reason}", file=sys.stderr)
    print(
        f"{len(predictions)} image(s) predicted with {len(ens.members)} member(s) x {ens.crops} crop(s)"
        + (f"; {len(failed)} not (listed above)" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
