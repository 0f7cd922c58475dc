"""Training config: strict keys, typed overrides, path resolution, dict round trip, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    flatten,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def test_defaults_are_the_paper():
    cfg = TrainConfig()
    assert (cfg.optim.lr, cfg.optim.decay, cfg.optim.eps, cfg.optim.momentum) == (0.045, 0.9, 1.0, 0.9)
    assert (cfg.schedule.decay_rate, cfg.schedule.decay_epochs) == (0.94, 2.0)
    assert (cfg.optim.clip_grad_norm, cfg.optim.label_smoothing, cfg.ema.decay) == (2.0, 0.1, 0.9999)
    assert cfg.data.batch_size == 32 and cfg.data.image_size == 299


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"^optim\.lrr: unknown key"),
        ("optimizer.lr=1", r"^optimizer: unknown key"),
        ("optim.lr=fast", r"^optim\.lr: expected a number, got 'fast'"),
        ("optim.lr=-1", r"^optim\.lr: invalid value -1\.0"),
        ("data.batch_size=0", r"^data\.batch_size: invalid value 0"),
        ("data.batch_size=2.5", r"^data\.batch_size: expected an integer"),
        ("data.crop_area=0.1", r"^data\.crop_area: expected a list of 2 values"),
        ("model.compile=maybe", r"^model\.compile: expected true/false"),
        ("ensemble.eval_crops=3", r"^ensemble\.eval_crops: invalid value 3"),
        ("scaling.use_gpu=sometimes", r"^scaling\.use_gpu: invalid value 'sometimes'"),
        ("debug.fail_at_step=3", r"^debug\.fail_marker: invalid value ''"),
        ("seed=x", r"^seed: expected an integer"),
        ("optim", r"expected section\.key=value"),
        ("optim.lr.x=1", r"^optim\.lr: expected a number"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_override_parsing_and_types():
    assert parse_override("optim.lr=0.1") == (["optim", "lr"], 0.1)
    assert parse_override("data.crop_area=0.25,1") == (["data", "crop_area"], [0.25, 1])
    assert parse_override("schedule.warmup_epochs=null") == (["schedule", "warmup_epochs"], None)
    assert parse_override("tracking.uri=http://127.0.0.1:5000") == (
        ["tracking", "uri"],
        "http://127.0.0.1:5000",
    )
    cfg = load_config(
        None,
        [
            "optim.lr=1",
            "data.crop_area=0.25,1",
            "model.compile=true",
            "seed=7",
            "schedule.warmup_epochs=2",
            "tracking.experiment=123",
        ],
    )
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.crop_area == (0.25, 1.0)
    assert cfg.model.compile is True and cfg.seed == 7 and cfg.schedule.warmup_epochs == 2.0
    assert cfg.tracking.experiment == "123"
    assert apply_overrides({"optim": {"lr": 1}}, ["optim.eps=2"]) == {"optim": {"lr": 1, "eps": 2}}
    # on/off settings as the errors and the README spell them (YAML reads on/off as booleans; before:
    # "scaling.use_gpu: expected a string, got True")
    cfg = load_config(None, ["scaling.use_gpu=on", "model.amp=off", "model.channels_last=off"])
    assert (cfg.scaling.use_gpu, cfg.model.amp, cfg.model.channels_last) == ("on", "off", "off")
    with pytest.raises(ConfigError, match=r"^model\.amp: invalid value 'on'"):
        load_config(None, ["model.amp=on"])


def test_paths_resolved_against_root(tmp_path):
    cfg = load_config(
        None,
        [
            "data.shards=shards",
            "tracking.uri=sqlite:///db/mlflow.db",
            "debug.fail_at_step=2",
            "debug.fail_marker=m/marker",
        ],
        root=str(tmp_path),
    )
    assert cfg.data.shards == str(tmp_path / "shards")
    assert cfg.checkpoint.storage_path == str(tmp_path / "runs")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/db/mlflow.db"
    assert cfg.debug.fail_marker == str(tmp_path / "m/marker")
    http = load_config(
        None, ["tracking.uri=http://127.0.0.1:5000", "checkpoint.storage_path=/abs/x"], root=str(tmp_path)
    )
    assert http.tracking.uri == "http://127.0.0.1:5000" and http.checkpoint.storage_path == "/abs/x"


def test_dict_round_trip_and_flatten():
    cfg = load_config(None, ["ensemble.members=3", "data.crop_area=0.3,1"])
    plain = cfg.to_dict()
    assert plain["data"]["crop_area"] == [0.3, 1.0]
    assert TrainConfig.from_dict(plain) == cfg
    flat = flatten(plain)
    assert flat["optim.lr"] == 0.045 and flat["ensemble.members"] == 3 and "data.shards" in flat


def test_members_get_own_seeds_and_names():
    cfg = load_config(None, ["ensemble.members=3", "seed=10", "data.seed=5", "checkpoint.name=run"])
    m2 = cfg.for_member(2)
    assert (m2.seed, m2.data.seed, m2.checkpoint.name) == (12, 7, "run-member2")
    assert cfg.global_batch() == 32


@pytest.mark.parametrize("recipe", ["imagenet", "demo", "cifar10"])
def test_shipped_recipes_load(recipe):
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml", root=str(REPO))
    assert Path(cfg.data.shards).is_absolute() and Path(cfg.checkpoint.storage_path).is_absolute()
    if recipe == "imagenet":
        assert cfg.data.image_size == 299 and cfg.data.batch_size == 32 and cfg.schedule.epochs == 100
    else:
        assert cfg.scaling.num_workers == 2 and cfg.model.width_mult == 0.25


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  momentumm: 0.5\n")
    with pytest.raises(ConfigError, match=r"^optim\.momentumm: unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "notmap.yaml").write_text("optim: 3\n")
    with pytest.raises(ConfigError, match=r"^optim: expected a mapping"):
        load_config(tmp_path / "notmap.yaml")


def test_overrides_may_follow_print_config(capsys):
    """Before: ``--print-config schedule.epochs=3`` was "unrecognized arguments"."""
    from orchestration.train import main

    assert main(["--config", str(DEMO), "--print-config", "schedule.epochs=3"]) == 0
    assert "\n  epochs: 3\n" in capsys.readouterr().out


def test_an_empty_shard_folder_is_one_line_naming_the_setting(capsys):
    """Before: "manifest.json is missing: is  a shard folder made by `build-shards`?"."""
    from orchestration.train import main

    assert main(["--config", str(DEMO), "data.shards="]) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "error: no shard folder given (data.shards is empty): set it to a folder made by `build-shards`\n"
    )


@pytest.mark.slow
def test_a_local_run_asking_for_more_cpus_than_it_has_is_one_line(tmp_path):
    """Before: ``configs/imagenet.yaml`` on a laptop (8 CPUs per worker) waited forever, printing a
    ``WorkerGroupStartupTimeoutError`` traceback every minute."""
    import subprocess
    import sys

    from tests.pipeline.shard_fixtures import write_coded_shards

    write_coded_shards(tmp_path / "shards", {"train": 8, "val": 4}, num_classes=4, shard_size=8)
    cmd = [sys.executable, str(REPO / "orchestration" / "train.py"), "--config", str(DEMO), "--num-cpus", "2"]
    args = [
        f"data.shards={tmp_path / 'shards'}",
        f"checkpoint.storage_path={tmp_path}",
        "scaling.cpus_per_worker=8",
    ]
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: the job needs 16 CPUs (2 worker(s) x scaling.cpus_per_worker=8) but the Ray cluster has 2; "
        "lower scaling.cpus_per_worker or scaling.num_workers (or start it with more: --num-cpus)"
    )
