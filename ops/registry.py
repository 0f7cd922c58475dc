"""Register, promote and load the ensemble in the MLflow model registry
(docs/architecture.md, "Registered ensemble").

Used from Python (``register_ensemble``, ``promote``, ``load``), from the ``inception-registry``
console script (``ops.registry_cli``), and by the end of an ensemble training job.

- ``register_ensemble(sources, name)`` logs one pyfunc model (:class:`ops.ensemble_model.EnsembleModel`)
  holding every member's EMA weights, the class names and the preprocessing/crop configuration,
  registers it as a new version of ``name`` and gives it the alias ``candidate``. With
  ``eval_shards`` it first evaluates the ensemble (all members, the configured crops) on those
  shards and tags the version with the figures and the shard manifest hash.
- ``promote(name, version)`` moves the alias ``champion`` to ``version`` only if its top-1 error
  beats the current champion's on the same shards (same manifest hash), or with ``force``.
- ``load("models:/NAME@champion")`` returns the pyfunc model.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from ops.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ops.ensemble_model import CONFIG_ARTIFACT, DEFAULT_TOP_K, IMAGE_COLUMN, EnsembleModel, member_artifact
from ops.evaluate import evaluate_multicrop
from ops.tracking import run_url, shard_dataset_input, using_tracking_uri
from pipeline.multicrop import SUPPORTED_CROPS

CANDIDATE, CHAMPION = "candidate", "champion"
DEFAULT_EXPERIMENT = "inception-registry"
MODEL_CODE = Path(__file__).with_name("ensemble_model_code.py")  # the pyfunc, logged as code
ENSEMBLE_CONFIG_VERSION = 1
# Packages the served model imports. torch is a floor, never a local "+cpu" build, so a GPU
# machine keeps its CUDA wheel and a CPU machine installs the CPU one (docs/architecture.md).
PIP_REQUIREMENTS = [
    "torch>=2.4",
    "numpy>=1.24",
    "pillow>=10.0",
    "pandas>=2.0",
    f"mlflow=={mlflow.__version__}",
]
# Version tags (MLflow tag keys); promotion compares METRIC_TAG only when SHARDS_TAG matches.
SHARDS_TAG = "eval.shards_sha256"
METRIC_TAG = "eval.top1_error"
# What the gate compares besides the shards: a figure is only comparable to one measured on the same
# split with the same crop setting.
SAME_SETTING_TAGS = ("eval.split", "eval.crops")
# Written by register_ensemble itself; a caller's extra tags may not set them (or anything under
# "eval.": those figures come only from the evaluation the registry runs).
RESERVED_TAGS = ("members", "member_runs", "member_sources", "crops", "num_classes", "registration_run")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RegistryError(RuntimeError):
    """A source, model or version the registry cannot use; the message says which and what to do."""


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    name: str
    version: str
    previous_champion: str | None  # version that held "champion" before the call


# ---- sources -----------------------------------------------------------------------------------
def _checkpoint_paths_in_run(client: MlflowClient, run_id: str, path: str = "", depth: int = 0) -> list[str]:
    """Artifact paths (relative to the run) of every file named checkpoint.pt, 4 folders deep at most."""
    found = []
    for info in client.list_artifacts(run_id, path or None):
        if info.is_dir and depth < 4:
            found += _checkpoint_paths_in_run(client, run_id, info.path, depth + 1)
        elif not info.is_dir and Path(info.path).name == CHECKPOINT_FILE:
            found.append(info.path)
    return found


def resolve_source(
    source: str, tracking_uri: str | None = None, dst: str | None = None
) -> tuple[Path, str | None]:
    """A checkpoint directory, ``runs:/<run_id>[/path]`` or a run id -> (local checkpoint dir, run id)."""
    path = Path(source)
    if path.exists():
        if not (path / CHECKPOINT_FILE).is_file() and not path.name == CHECKPOINT_FILE:
            raise RegistryError(
                f"{source}: no {CHECKPOINT_FILE} in this directory (not a training checkpoint)"
            )
        return (path if path.is_dir() else path.parent), None
    if source.startswith("runs:/"):
        run_id, _, sub = source[len("runs:/") :].partition("/")
    elif _RUN_ID.match(source):
        run_id, sub = source, ""
    else:
        raise RegistryError(
            f"source {source!r} is neither a checkpoint directory nor runs:/<run_id> nor a run id"
        )
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except Exception as exc:
        raise RegistryError(f"source {source!r}: run {run_id} not found on {client.tracking_uri}") from exc
    candidates = _checkpoint_paths_in_run(client, run_id, sub)
    if not candidates:
        raise RegistryError(f"run {run_id} has no {CHECKPOINT_FILE} under artifact path {sub or '/'}")
    if len(candidates) > 1:
        final = [c for c in candidates if "final" in c]
        if len(final) != 1:
            raise RegistryError(
                f"run {run_id} holds several checkpoints ({', '.join(candidates)}): "
                f"name one as runs:/{run_id}/<path>"
            )
        candidates = final
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=str(Path(candidates[0]).parent), dst_path=dst, tracking_uri=tracking_uri
    )
    return Path(local), run_id


# ---- the logged model --------------------------------------------------------------------------
def ensemble_signature() -> ModelSignature:
    """Input: column ``image`` of JPEG bytes; params ``top_k`` and ``crops``; output: top-k classes."""
    inputs = Schema([ColSpec(DataType.binary, IMAGE_COLUMN)])
    outputs = Schema(
        [
            ColSpec(Array(DataType.string), "classes"),
            ColSpec(Array(DataType.long), "indices"),
            ColSpec(Array(DataType.double), "probabilities"),
        ]
    )
    params = ParamSchema(
        [ParamSpec("top_k", DataType.long, DEFAULT_TOP_K), ParamSpec("crops", DataType.long, 0)]
    )  # crops 0: the version's own crop setting
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def example_jpeg(size: int = 64) -> bytes:
    """A small gradient JPEG used as the model's input example."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128, np.uint8)],
        -1,
    )
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _code_paths() -> list[str]:
    """Our packages, copied into the model so ``mlflow models serve`` imports the same code."""
    import models
    import ops
    import pipeline

    return [str(Path(pkg.__file__).parent) for pkg in (models, pipeline, ops)]


def _shards_hash(folder: str | None) -> str | None:
    from pipeline.schema import manifest_sha256

    if folder and (Path(folder) / "manifest.json").is_file():
        return manifest_sha256(folder)
    return None


def build_ensemble_config(payloads: list[dict], crops: int, sources: list[str], run_ids: list) -> dict:
    """The ``ensemble_config`` artifact; members must share classes and preprocessing."""
    first = payloads[0]
    data = {k: first["config"]["data"][k] for k in ("image_size", "val_resize", "normalization")}
    for src, p in zip(sources, payloads, strict=True):
        if list(p["class_names"]) != list(first["class_names"]):
            raise RegistryError(
                f"{src}: class names differ from {sources[0]}'s; members must share one label map"
            )
        other = {k: p["config"]["data"][k] for k in data}
        if other != data:
            raise RegistryError(f"{src}: preprocessing {other} differs from {sources[0]}'s {data}")
    if crops not in SUPPORTED_CROPS:
        raise RegistryError(f"crops must be 1, 10 or 144 (the paper's settings), got {crops}")
    return {
        "version": ENSEMBLE_CONFIG_VERSION,
        "class_names": list(first["class_names"]),
        "data": data,
        "crops": crops,
        "members": [
            {"artifact": member_artifact(i), "source": s, "run_id": r, "model_spec": p["model_spec"]}
            for i, (s, r, p) in enumerate(zip(sources, run_ids, payloads, strict=True))
        ],
    }


def register_ensemble(
    sources: list[str],
    name: str,
    *,
    tracking_uri: str | None = None,
    crops: int = 1,
    eval_shards: str | None = None,
    tags: dict | None = None,
    eval_split: str = "val",
    eval_batch_size: int = 16,
    experiment: str = DEFAULT_EXPERIMENT,
):
    """Log the members as one pyfunc model, register it as a new version of ``name`` aliased
    ``candidate``, and return that ``ModelVersion`` (tags hold runs, shards hash and figures)."""
    if not sources:
        raise RegistryError("register_ensemble needs at least one checkpoint or run")
    check_user_tags(tags or {})
    with tempfile.TemporaryDirectory(prefix="ensemble-") as tmp, using_tracking_uri(tracking_uri):
        payloads, run_ids, artifacts = [], [], {}
        for i, source in enumerate(sources):
            ckpt_dir, run_id = resolve_source(source, tracking_uri, dst=str(Path(tmp) / f"download-{i}"))
            payload = load_checkpoint(ckpt_dir)
            payloads.append(payload)
            run_ids.append(run_id)
            member_file = Path(tmp) / f"member_{i}.pt"  # only what inference needs: no optimizer state
            torch.save({"model_spec": payload["model_spec"], "ema": payload["ema"]}, member_file)
            artifacts[member_artifact(i)] = str(member_file)
        config = build_ensemble_config(payloads, crops, list(sources), run_ids)
        config_file = Path(tmp) / "ensemble_config.json"
        config_file.write_text(json.dumps(config, indent=2))
        artifacts[CONFIG_ARTIFACT] = str(config_file)

        version_tags = {str(k): str(v) for k, v in (tags or {}).items()}  # first: ours overwrite nothing
        version_tags |= {
            "members": str(len(sources)),
            "member_runs": ",".join(r or "-" for r in run_ids),
            "member_sources": ",".join(sources)[:4000],
            "crops": str(crops),
            "num_classes": str(len(config["class_names"])),
        }
        train_hash = _shards_hash(payloads[0]["config"]["data"].get("shards"))
        if train_hash:
            version_tags["train.shards_sha256"] = train_hash
        metrics = {}
        if eval_shards:
            version_tags.update(
                _evaluate_for_registry(config, artifacts, eval_shards, eval_split, eval_batch_size)
            )
            metrics = {
                k.split(".", 1)[1]: float(version_tags[k]) for k in ("eval.top1_error", "eval.top5_error")
            }

        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=f"register-{name}") as run:
            mlflow.set_tags({f"ensemble.{k}": v for k, v in version_tags.items()})
            mlflow.log_params({"members": len(sources), "crops": crops, "registered_model": name})
            if metrics:
                mlflow.log_metrics(metrics)
                dataset = shard_dataset_input(eval_shards, eval_split, "evaluation")
                if dataset is not None:
                    MlflowClient().log_inputs(run.info.run_id, [dataset])
            info = mlflow.pyfunc.log_model(
                name="ensemble",
                python_model=str(MODEL_CODE),  # models from code: nothing of ours is pickled
                artifacts=artifacts,
                code_paths=_code_paths(),
                pip_requirements=PIP_REQUIREMENTS,
                signature=ensemble_signature(),
                input_example=pd.DataFrame({IMAGE_COLUMN: [example_jpeg()]}),
            )
        client = MlflowClient()
        # the version's run is the training run it came from (the ensemble's parent, or the single
        # member's), so that run lists it under "Registered models"; the registration run, which holds
        # the model and its evaluation, is in the tags and the description
        source_run = training_run(version_tags, run_ids) or run.info.run_id
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        created = client.create_model_version(name, info.model_uri, run_id=source_run, model_id=info.model_id)
        version = str(created.version)
        for key, value in version_tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_model_version_tag(name, version, "registration_run", run.info.run_id)
        client.update_model_version(
            name, version, description=version_description(client, version_tags, run_ids, run.info.run_id)
        )
        client.set_registered_model_alias(name, CANDIDATE, version)
        return client.get_model_version(name, version)


def training_run(tags: dict, member_runs: list) -> str | None:
    """The run a version was trained in: the ensemble's parent run, or its only member's run."""
    parent = tags.get("training_parent_run")
    if parent and parent != "-":
        return parent
    distinct = {r for r in member_runs if r}
    return distinct.pop() if len(member_runs) == 1 and len(distinct) == 1 else None


def version_description(client: MlflowClient, tags: dict, member_runs: list, registration_run: str) -> str:
    """What the version page says first: its evaluation, and links to the runs behind it."""
    uri = client.tracking_uri

    def link(run_id: str | None) -> str:
        if not run_id:
            return "-"
        try:
            url = run_url(uri, client.get_run(run_id).info.experiment_id, run_id)
        except Exception:  # a run in another store: its id is still a lineage
            url = None
        return f"[{run_id}]({url})" if url else f"`{run_id}`"

    lines = [
        f"Ensemble of {tags['members']} Inception member(s), averaged; {tags['crops']} crop(s) per image.",
        "",
    ]
    if "eval.top1_error" in tags:
        top1, top5 = (100 * float(tags[f"eval.{k}_error"]) for k in ("top1", "top5"))
        lines += [
            "| members | crops | top-1 error | top-5 error | images | split |",
            "|---:|---:|---:|---:|---:|---|",
            f"| {tags['members']} | {tags['eval.crops']} | {top1:.2f} % | {top5:.2f} % | "
            f"{tags['eval.num_samples']} | {tags['eval.split']} |",
            "",
            f"Evaluation shards: manifest sha256 `{tags['eval.shards_sha256']}` (verified first).",
        ]
    else:
        lines.append(
            "Not evaluated at registration (no --eval-shards): the promotion gate has nothing to compare."
        )
    lines += [
        "",
        "Member runs: " + ", ".join(link(r) for r in member_runs),
        f"Registration run: {link(registration_run)}",
    ]
    if tags.get("train.shards_sha256"):
        lines.append(f"Training shards: manifest sha256 `{tags['train.shards_sha256']}`")
    return "\n".join(lines) + "\n"


def check_user_tags(tags: dict) -> None:
    """Refuse caller tags that would pose as the registry's own: anything under ``eval.`` (the gate
    reads those) and the keys register_ensemble writes."""
    bad = sorted(
        str(k)
        for k in tags
        if str(k).startswith("eval.") or str(k).startswith("train.") or k in RESERVED_TAGS
    )
    if bad:
        raise RegistryError(
            f"tag(s) {', '.join(bad)} are written by the registry itself (evaluation figures come only "
            "from --eval-shards); choose other names"
        )


def verified_shards_hash(shards: str, split: str) -> str:
    """The manifest hash of ``shards`` once every tar and index of ``split`` has been checked against
    it (size, sha256, members, labels, index entries: ``verify_shards``): the figures the gate compares
    are recorded only for shards that are what their manifest says. A manifest edited to match
    doctored tars has another hash, so the gate will not compare its figures with the champion's."""
    from pipeline.schema import ShardFormatError
    from pipeline.shards.verify import verified_manifest_hash

    try:
        return verified_manifest_hash(shards, split)
    except ShardFormatError as exc:
        raise RegistryError(f"{exc}; no figure is recorded") from None


def _evaluate_for_registry(config: dict, artifacts: dict, shards: str, split: str, batch_size: int) -> dict:
    """Evaluate all members with the configured crops on ``shards`` (verified first): the version's
    figures as tags."""
    from pipeline.schema import load_manifest, manifest_sha256

    digest = verified_shards_hash(shards, split)
    manifest_names = load_manifest(shards).class_names
    if manifest_names != config["class_names"]:
        raise RegistryError(
            f"{shards}: its classes differ from the members' class names; "
            "evaluate on shards of the same label map"
        )
    model = EnsembleModel()
    model.setup(config, [artifacts[member_artifact(i)] for i in range(len(config["members"]))])
    table = evaluate_multicrop(
        model.members,
        shards,
        data=config["data"],
        split=split,
        crops=[config["crops"]],
        batch_size=batch_size,
    )
    m, c = len(model.members), config["crops"]
    if manifest_sha256(shards) != digest:
        raise RegistryError(f"{shards}: its manifest changed while it was evaluated; nothing is recorded")
    return {
        SHARDS_TAG: digest,
        "eval.split": split,
        "eval.crops": str(c),
        "eval.num_samples": str(table.num_samples),
        METRIC_TAG: f"{table.top1[(m, c)]:.6f}",
        "eval.top5_error": f"{table.top5[(m, c)]:.6f}",
    }


# ---- promotion and loading ---------------------------------------------------------------------
def _version_or_error(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except Exception as exc:
        raise RegistryError(f"model {name!r} has no version {version} on {client.tracking_uri}") from exc


def resolve_version(client: MlflowClient, model_uri: str):
    """The ModelVersion a ``models:/NAME@alias`` or ``models:/NAME/VERSION`` URI names."""
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        try:
            return client.get_model_version_by_alias(name, alias)
        except Exception as exc:
            raise RegistryError(f"model {name!r} has no alias {alias!r} on {client.tracking_uri}") from exc
    name, _, version = ref.rpartition("/")
    if not name:
        raise RegistryError(f"{model_uri}: use models:/NAME@alias or models:/NAME/VERSION")
    return _version_or_error(client, name, version)


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no alias yet (MLflow raises RESOURCE_DOES_NOT_EXIST)
        return None


def _evaluation_setting(mv, key: str) -> str | None:
    # versions registered before eval.crops was recorded were evaluated with their own crop setting
    return mv.tags.get(key, mv.tags.get("crops") if key == "eval.crops" else None)


def promote(
    name: str, version: str | int, *, force: bool = False, tracking_uri: str | None = None
) -> PromotionDecision:
    """Move ``champion`` to ``version`` if it beats the current champion (lower top-1 error on the
    same shards, split and crop setting), if there is no champion yet, or with ``force``. Always
    says why."""
    client = MlflowClient(tracking_uri=tracking_uri)
    version = str(version)
    cand = _version_or_error(client, name, version)
    current = _champion(client, name)
    previous = str(current.version) if current else None

    def decide(promoted: bool, reason: str) -> PromotionDecision:
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, version)
        return PromotionDecision(promoted, reason, name, version, previous)

    if previous == version:
        return decide(False, f"version {version} already is the champion")
    if force:
        return decide(True, f"forced: version {version} replaces champion {previous or '(none)'}")
    if current is None:
        return decide(True, f"no champion yet: version {version} becomes champion")
    c_err, p_err = cand.tags.get(METRIC_TAG), current.tags.get(METRIC_TAG)
    if c_err is None:
        return decide(
            False, f"version {version} has no evaluation ({METRIC_TAG}); register with eval_shards or force"
        )
    if p_err is None:
        return decide(
            False, f"champion {previous} has no evaluation ({METRIC_TAG}) to compare with; use force"
        )
    if cand.tags.get(SHARDS_TAG) != current.tags.get(SHARDS_TAG):
        return decide(
            False,
            f"version {version} and champion {previous} were evaluated on different shards "
            f"({cand.tags.get(SHARDS_TAG, '?')[:12]} vs {current.tags.get(SHARDS_TAG, '?')[:12]}); "
            "evaluate both on the same shards or force",
        )
    for key in SAME_SETTING_TAGS:
        c_set, p_set = _evaluation_setting(cand, key), _evaluation_setting(current, key)
        if c_set != p_set:
            return decide(
                False,
                f"version {version} and champion {previous} were evaluated with different {key} "
                f"({c_set or 'unknown'} vs {p_set or 'unknown'}); evaluate both the same way or force",
            )
    if float(c_err) < float(p_err):
        return decide(True, f"top-1 error {float(c_err):.4f} beats champion {previous}'s {float(p_err):.4f}")
    return decide(
        False, f"top-1 error {float(c_err):.4f} does not beat champion {previous}'s {float(p_err):.4f}"
    )


def load(model_uri: str, *, tracking_uri: str | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` for ``models:/NAME@alias`` (or ``models:/NAME/VERSION``)."""
    with using_tracking_uri(tracking_uri):
        try:
            return mlflow.pyfunc.load_model(model_uri)
        except Exception as exc:
            raise RegistryError(f"cannot load {model_uri} from {mlflow.get_tracking_uri()}: {exc}") from exc


def load_ensemble(model_uri: str, *, tracking_uri: str | None = None) -> EnsembleModel:
    """The :class:`EnsembleModel` inside a registered version (members, class names, crops)."""
    model = load(model_uri, tracking_uri=tracking_uri).unwrap_python_model()
    if not isinstance(model, EnsembleModel):
        raise RegistryError(f"{model_uri} is not an ensemble registered by ops.registry")
    return model
