"""The training config: typed, frozen, strict; YAML recipes plus ``section.key=value`` overrides.

Used by ``orchestration/train.py`` (``load_config(path, overrides)``) and by every Ray worker, which
rebuilds the typed config from the plain dict Ray hands it (``TrainConfig.from_dict``) on its first
line. Defaults are the paper's recipe (Szegedy et al. 2016, §8: RMSProp decay 0.9, ε 1.0, lr 0.045
decayed ×0.94 every 2 epochs for batch 32 per replica, gradient clipping 2.0, label smoothing 0.1,
evaluation on a running average of the parameters).

Relative paths (shards, storage, marker files, a relative ``sqlite:///`` URI) are resolved to
absolute paths against ``root`` (``--root``, else ``$INCEPTION_ROOT``, else the current directory)
before anything is handed to Ray: ``ray job submit --working-dir .`` runs the job in a temporary copy
of the repo, and paths relative to that copy would vanish with it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import DataConfig
from pipeline.multicrop import SUPPORTED_CROPS


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "inception_v3"  # models.build_model name: "inception_v3" | "googlenet"
    num_classes: int = 0  # 0: take it from the shard manifest
    aux_logits: bool = True  # paper §4: the auxiliary head acts as a regulariser
    width_mult: float = 1.0  # channel multiplier (1.0 = the paper's network)
    amp: str = "auto"  # "auto": bfloat16 autocast on CUDA only | "bf16" | "off"
    channels_last: str = "auto"  # "auto": on CUDA only | "on" | "off"
    compile: bool = False  # torch.compile the model (GPU throughput; slow to start)
    # BatchNorm running-average momentum, PyTorch's convention (new = (1 - m) * old + m * batch):
    # 0.1 is PyTorch's default; TF-slim's Inception-v3 uses decay 0.9997, i.e. m = 0.0003
    bn_momentum: float = 0.1
    dropout: float | None = None  # drop probability before the classifier; None: the model's default
    # Ablations of paper Table 3 (models/inception_v3.py, models/googlenet.py):
    stem: str = "factorized"  # inception_v3: "factorized" (3x3 stack, paper §6) | "7x7" (v2 baseline)
    aux_bn: bool = True  # inception_v3: batch norm in the auxiliary head's fc ("BN-auxiliary", paper §7)
    branch3_kernel: int = 5  # googlenet: 5 (paper's 5x5 branch) | 3 (torchvision's layout)
    pooling: str = "paper"  # googlenet: "paper" (aux 5x5/3, maxpool4 3x3/2) | "torchvision"

    def __post_init__(self) -> None:
        _check(
            "model",
            self,
            {
                "name": self.name in ("inception_v3", "googlenet"),
                "num_classes": self.num_classes >= 0,
                "width_mult": self.width_mult > 0,
                "amp": self.amp in ("auto", "bf16", "off"),
                "channels_last": self.channels_last in ("auto", "on", "off"),
                "bn_momentum": 0 < self.bn_momentum <= 1,
                "dropout": self.dropout is None or 0 <= self.dropout < 1,
                "stem": self.stem in ("factorized", "7x7"),
                "branch3_kernel": self.branch3_kernel in (3, 5),
                "pooling": self.pooling in ("paper", "torchvision"),
            },
        )
        if self.name != "inception_v3" and (self.stem != "factorized" or not self.aux_bn):
            raise ConfigError("model.stem / model.aux_bn: Inception-v3 ablations; model.name is " + self.name)
        if self.name != "googlenet" and (self.branch3_kernel != 5 or self.pooling != "paper"):
            raise ConfigError(
                "model.branch3_kernel / model.pooling: GoogLeNet options; model.name is " + self.name
            )

    def build_options(self) -> dict[str, Any]:
        """Constructor options of ``models.build_model(self.name, ...)`` (also stored in checkpoints)."""
        options: dict[str, Any] = {"aux_logits": self.aux_logits, "width_mult": self.width_mult}
        if self.dropout is not None:
            options["dropout"] = self.dropout
        if self.name == "inception_v3":
            options.update(stem=self.stem, aux_bn=self.aux_bn)
        else:
            options.update(branch3_kernel=self.branch3_kernel, pooling=self.pooling)
        return options


@dataclass(frozen=True)
class OptimConfig:
    name: str = "rmsprop_tf"  # "rmsprop_tf" (paper) | "sgd" (momentum SGD, for ablations)
    lr: float = 0.045  # paper §8: 0.045 ...
    lr_reference_batch: int = 32  # ... for batch 32 (one replica's batch in the paper)
    lr_scaling: str = "linear"  # "linear" (Goyal et al. 2017; timm's rule for rmsproptf) | "sqrt" | "none"
    decay: float = 0.9  # paper §8: RMSProp decay 0.9
    momentum: float = 0.9  # TF-slim inception recipe: rmsprop_momentum 0.9
    eps: float = 1.0  # paper §8: ε = 1.0 (inside the square root, TF style)
    weight_decay: float = 4e-5  # TF-slim inception_v3_arg_scope default weight_decay=0.00004 (L2 on weights)
    clip_grad_norm: float = 2.0  # paper §8: gradient clipping with threshold 2.0 (0 = off)
    # "per_tensor": each variable's gradient clipped to the threshold on its own, as TF-slim's
    # create_train_op(clip_gradient_norm=...) -> clip_gradient_norms; "global": one norm over all
    clip_mode: str = "per_tensor"
    # "in_loss": the L2 term's gradient (wd * w) joins the loss gradient before clipping, as TF-slim's
    # weights_regularizer (part of the total loss); "after_clip": added by the optimizer after clipping
    weight_decay_placement: str = "in_loss"
    label_smoothing: float = 0.1  # paper §7: ε = 0.1

    def __post_init__(self) -> None:
        _check(
            "optim",
            self,
            {
                "name": self.name in ("rmsprop_tf", "sgd"),
                "lr": self.lr > 0,
                "lr_reference_batch": self.lr_reference_batch >= 1,
                "lr_scaling": self.lr_scaling in ("linear", "sqrt", "none"),
                "decay": 0 <= self.decay < 1,
                "momentum": 0 <= self.momentum < 1,
                "eps": self.eps > 0,
                "weight_decay": self.weight_decay >= 0,
                "clip_grad_norm": self.clip_grad_norm >= 0,
                "clip_mode": self.clip_mode in ("per_tensor", "global"),
                "weight_decay_placement": self.weight_decay_placement in ("in_loss", "after_clip"),
                "label_smoothing": 0 <= self.label_smoothing < 1,
            },
        )


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 100  # ImageNet recipe length (paper: trained until convergence; ~100 epochs)
    decay_rate: float = 0.94  # paper §8: exponential rate 0.94 ...
    decay_epochs: float = 2.0  # ... every two epochs (staircase, as TF-slim's exponential_decay)
    warmup_epochs: float | None = None  # None: 0 up to global batch 256, else 5 (Goyal et al. 2017)
    warmup_start_factor: float = 0.1  # warm-up starts at this fraction of the scaled lr

    def __post_init__(self) -> None:
        _check(
            "schedule",
            self,
            {
                "epochs": self.epochs >= 1,
                "decay_rate": 0 < self.decay_rate <= 1,
                "decay_epochs": self.decay_epochs > 0,
                "warmup_epochs": self.warmup_epochs is None or self.warmup_epochs >= 0,
                "warmup_start_factor": 0 < self.warmup_start_factor <= 1,
            },
        )


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999  # paper §8: "a running average of the parameters" (TF-slim: 0.9999)
    warmup: bool = True  # TF ExponentialMovingAverage num_updates: decay = min(decay, (1+n)/(10+n))

    def __post_init__(self) -> None:
        _check("ema", self, {"decay": 0 < self.decay < 1})


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1  # Ray Train workers (data-parallel replicas); the most, when min_workers is set
    # >0: elastic training, Ray Train's ScalingConfig(num_workers=(min_workers, num_workers)): the job
    # starts with what the cluster has and resizes after failures; set data.global_batch with it, so
    # that the global batch (and the lr schedule) stays the same whatever the number of workers
    min_workers: int = 0
    use_gpu: str = "auto"  # "auto": GPUs when ray.cluster_resources() has any | "on" | "off"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu resolves to on

    def __post_init__(self) -> None:
        _check(
            "scaling",
            self,
            {
                "num_workers": self.num_workers >= 1,
                "min_workers": 0 <= self.min_workers <= self.num_workers,
                "use_gpu": self.use_gpu in ("auto", "on", "off"),
                "cpus_per_worker": self.cpus_per_worker > 0,
                "gpus_per_worker": self.gpus_per_worker > 0,
            },
        )


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" -> $MLFLOW_TRACKING_URI -> sqlite:///<storage_path>/mlflow.db
    experiment: str = "inception-v3"
    log_every_steps: int = 50  # step metrics cadence (rank 0)
    log_checkpoint: bool = True  # upload the final checkpoint as a run artifact

    def __post_init__(self) -> None:
        _check("tracking", self, {"log_every_steps": self.log_every_steps >= 1})


@dataclass(frozen=True)
class ConsoleConfig:
    # rank 0 prints a progress line inside each epoch this often (step/steps, img/s, loader wait,
    # the epoch's ETA); 0 = epoch lines only
    progress_every_s: float = 60.0

    def __post_init__(self) -> None:
        _check("console", self, {"progress_every_s": self.progress_every_s >= 0})


@dataclass(frozen=True)
class EnsembleConfig:
    members: int = 1  # paper §10 ensembled 4 models; members train with seeds seed+i
    concurrent: str = "auto"  # "auto": in parallel when the cluster has room | "on" | "off"
    register: bool = True  # register the members via ops.registry.register_ensemble at the end
    model_name: str = "inception-v3-ensemble"  # registered model name
    promote: bool = True  # ask ops.registry.promote (its gate decides) after registering
    eval_crops: int = 1  # crops for the registry's evaluation on the val split

    def __post_init__(self) -> None:
        _check(
            "ensemble",
            self,
            {
                "members": self.members >= 1,
                "concurrent": self.concurrent in ("auto", "on", "off"),
                "eval_crops": self.eval_crops in SUPPORTED_CROPS,
            },
        )


@dataclass(frozen=True)
class CheckpointConfig:
    storage_path: str = "runs"  # Ray RunConfig storage_path; shared storage (NFS/S3) on multi-node clusters
    name: str = "inception-v3"  # run name: <storage_path>/<name>; a new job with the same name resumes
    num_to_keep: int = 2  # Ray CheckpointConfig(num_to_keep)
    max_failures: int = 3  # Ray FailureConfig(max_failures): worker restarts from the latest checkpoint
    # >0: also checkpoint every this many optimizer steps inside an epoch (the position in the epoch's
    # sample order goes with it: a resume continues at the next sample, nothing repeated or skipped)
    every_steps: int = 0
    # resume even though the shards' manifest differs from the one the checkpoint was trained on
    # (train.py --force-data-change); the position in the epoch then means other samples
    force_data_change: bool = False

    def __post_init__(self) -> None:
        _check(
            "checkpoint",
            self,
            {
                "every_steps": self.every_steps >= 0,
                "name": bool(self.name) and "/" not in self.name,
                "num_to_keep": self.num_to_keep >= 1,
                "max_failures": self.max_failures >= -1,
            },
        )


@dataclass(frozen=True)
class DebugConfig:
    """Test and smoke-run switches; all off by default."""

    fail_at_step: int = 0  # >0: rank 0 fails once at this global step (fault-tolerance tests)
    fail_marker: str = ""  # file created when failing; its presence prevents failing again
    fail_mode: str = "raise"  # "raise" an exception | "kill" the worker process (SIGKILL)
    max_steps_per_epoch: int = 0  # >0: cut epochs short (smoke runs)
    max_eval_batches: int = 0  # >0: evaluate on this many batches per rank only
    # a file that every rank appends one JSON line per training step to (epoch, step, position,
    # samples, loss): what the resume tests compare; per-step losses cost a device sync
    trace_file: str = ""

    def __post_init__(self) -> None:
        _check(
            "debug",
            self,
            {
                "fail_at_step": self.fail_at_step >= 0,
                "fail_marker": self.fail_at_step == 0 or bool(self.fail_marker),
                "fail_mode": self.fail_mode in ("raise", "kill"),
                "max_steps_per_epoch": self.max_steps_per_epoch >= 0,
                "max_eval_batches": self.max_eval_batches >= 0,
            },
        )


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 0  # model init / RNG seed; ensemble member i uses seed + i (and data.seed + i)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-safe dict (tuples become lists); ``from_dict`` inverts it."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")

    def global_batch(self) -> int:
        return self.data.global_batch or self.data.batch_size * self.scaling.num_workers

    def for_member(self, index: int) -> TrainConfig:
        """Config of ensemble member ``index``: its own seeds and run name."""
        if self.ensemble.members == 1:
            return self
        return dataclasses.replace(
            self,
            seed=self.seed + index,
            data=dataclasses.replace(self.data, seed=self.data.seed + index),
            checkpoint=dataclasses.replace(self.checkpoint, name=f"{self.checkpoint.name}-member{index}"),
        )


def _check(section: str, obj: Any, checks: dict[str, bool]) -> None:
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"{section}.{bad[0]}: invalid value {getattr(obj, bad[0])!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce a YAML/override value to the field's annotated type, or raise naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, bool):  # YAML reads on/off as booleans: scaling.use_gpu=on, model.amp=off
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {hint!r}")  # pragma: no cover - schema bug


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known in {where}: {', '.join(names)})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # DataConfig's own checks already name the key ("data.x: ...")
        raise ConfigError(str(exc)) from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.1"`` -> (["optim", "lr"], 0.1); the value is parsed as YAML (``a,b`` lists allowed)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key component")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and "," in value and not raw.strip().startswith(("'", '"')):
        value = [yaml.safe_load(part) for part in value.split(",")]
    return path, value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    data = _plain(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def resolve_paths(cfg: TrainConfig, root: str | Path | None = None) -> TrainConfig:
    """Absolute paths for every path-valued field, relative ones taken against ``root``."""
    base = Path(root or os.environ.get("INCEPTION_ROOT") or os.getcwd()).resolve()

    def absolute(path: str) -> str:
        if not path or "://" in path:
            return path
        return str((base / os.path.expanduser(path)).resolve())

    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + absolute(uri[len("sqlite:///") :])
    elif uri and "://" not in uri:  # a bare path: a sqlite file
        uri = "sqlite:///" + absolute(uri)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards)),
        checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=absolute(cfg.checkpoint.storage_path)),
        tracking=dataclasses.replace(cfg.tracking, uri=uri),
        debug=dataclasses.replace(
            cfg.debug, fail_marker=absolute(cfg.debug.fail_marker), trace_file=absolute(cfg.debug.trace_file)
        ),
    )


def load_config(
    path: str | Path | None, overrides: typing.Iterable[str] = (), root: str | None = None
) -> TrainConfig:
    """Read a YAML recipe (``None``: the defaults), apply overrides, validate, resolve paths."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    cfg = TrainConfig.from_dict(apply_overrides(data, overrides))
    return resolve_paths(cfg, root)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
