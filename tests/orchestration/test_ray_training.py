"""Ray Train end to end on tiny real data (2 CPU workers): learning, MLflow contents, failure + resume,
ensemble members with registration. Slow (a minute or more each); need REAL_DATA_DIR."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ops.checkpoint import load_checkpoint
from orchestration.config import load_config
from orchestration.ensemble import run_training
from pipeline import manifest_sha256

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def _cfg(shards, tmp_path, *overrides):
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.shards={shards}",
            f"checkpoint.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "ensemble.members=1",
            "ensemble.register=false",
            "debug.max_steps_per_epoch=0",
            "tracking.log_every_steps=3",
            *overrides,
        ],
        root=str(REPO),
    )


def _epoch_steps(client, run_id, key="val/top1_acc"):
    """The epoch each logged value of ``key`` belongs to (every metric is on the global-step axis;
    ``epoch`` is logged beside the epoch's figures), in logging order."""
    epoch_at = {m.step: int(m.value) for m in client.get_metric_history(run_id, "epoch")}
    return [
        epoch_at[m.step] for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    ]


def test_two_workers_learn_and_track(ray_2cpu, small_cifar_shards, tmp_path):
    from mlflow import MlflowClient

    shards = small_cifar_shards
    cfg = _cfg(shards, tmp_path, "schedule.epochs=5", "checkpoint.name=learn", "tracking.log_every_steps=10")
    outcome = run_training(cfg, REPO)
    (member,) = outcome.members
    client = MlflowClient(outcome.tracking_uri)
    run_id = member.run_id
    losses = [
        m.value for m in sorted(client.get_metric_history(run_id, "epoch/train_loss"), key=lambda m: m.step)
    ]
    top1 = [m.value for m in sorted(client.get_metric_history(run_id, "val/top1_acc"), key=lambda m: m.step)]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.3, losses
    assert max(top1[-2:]) > 0.17, top1  # chance is 0.1 on 200 test images (3.5 sigma ~ 0.07)
    assert member.metrics["val_count"] == 200.0 and member.metrics["epoch"] == 5
    assert member.metrics["step"] == 5 * 31  # 2000 images / (2 workers x 32) = 31 full batches per epoch

    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == str(cfg.optim.lr) and run.data.params["data.shards"] == str(shards)
    assert run.data.params["scaling.num_workers"] == "2" and run.data.params["ensemble.members"] == "1"
    tags = run.data.tags
    assert tags["shards_manifest_sha256"] == manifest_sha256(shards)
    assert len(tags["ray_job_id"]) > 0 and tags["global_batch"] == "64" and tags["steps_per_epoch"] == "31"
    assert "git_commit" in tags or not (REPO / ".git").exists()
    for key in (
        "train/loss",
        "train/lr",
        "train/images_per_sec",
        "train/loader_wait_frac",
        "train/step_time_s",
        "train/peak_memory_mib",
    ):
        assert len(client.get_metric_history(run_id, key)) == 5 * 31 // 10, key
    assert _epoch_steps(client, run_id) == list(range(1, 6))
    for key in (
        "val/ema_top1_acc",
        "val/top5_acc",
        "epoch/images_per_sec",
        "epoch/loader_wait_frac",
        "epoch",
    ):
        assert len(client.get_metric_history(run_id, key)) == 5, key
    # one name per quantity: the epoch's learning rate is train/lr's, and no old name is left
    assert not {"lr", "train_loss", "val_top1"} & set(client.get_run(run_id).data.metrics)
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [31 * e for e in range(1, 6)]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config", "class_names.txt", "training_curves.png", "checkpoint"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == [
        "checkpoint/checkpoint.pt",
        "checkpoint/data_state.json",  # position, manifest hash and global batch: checked before a resume
    ]
    names = Path(client.download_artifacts(run_id, "class_names.txt", str(tmp_path))).read_text().split()
    assert names[:3] == ["airplane", "automobile", "bird"] and len(names) == 10

    payload = load_checkpoint(member.checkpoint_dir)
    assert (payload["epoch"], payload["step"]) == (5, 155)
    assert payload["config"]["data"]["shards"] == str(shards)
    assert payload["model_spec"] == {
        "name": "inception_v3",
        "num_classes": 10,
        "options": {"aux_logits": True, "width_mult": 0.25, "stem": "factorized", "aux_bn": True},
    }
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in payload["model"])
    assert payload["extra"]["ema_updates"] == 155 and len(payload["extra"]["rng"]) == 2
    assert payload["extra"]["data"] == {
        "position": 0,
        "quarantine": [],
        "manifest_sha256": manifest_sha256(shards),
        "global_batch": 64,
    }


def test_killed_worker_resumes_exactly(ray_2cpu, tiny_cifar_shards, tmp_path):
    """Kill rank 0 mid-epoch 2; the run resumes from the epoch-1 checkpoint and ends exactly where an
    uninterrupted run ends: no repeated or lost epoch, same weights, optimizer state and EMA."""
    from mlflow import MlflowClient

    marker = tmp_path / "failed.marker"
    common = ("schedule.epochs=3", "tracking.log_every_steps=100")
    broken = run_training(
        _cfg(
            tiny_cifar_shards,
            tmp_path,
            *common,
            "checkpoint.name=broken",
            "debug.fail_at_step=10",
            f"debug.fail_marker={marker}",
            "debug.fail_mode=kill",
            "checkpoint.max_failures=1",
        ),
        REPO,
    )
    assert marker.read_text() == "failed at step 10\n"  # it did die (7 steps/epoch: mid-epoch 2)
    clean = run_training(_cfg(tiny_cifar_shards, tmp_path, *common, "checkpoint.name=clean"), REPO)

    client = MlflowClient(broken.tracking_uri)
    (b,), (c,) = broken.members, clean.members
    for key in ("val/top1_acc", "epoch/train_loss", "val/ema_top1_acc"):
        assert _epoch_steps(client, b.run_id, key) == [1, 2, 3], key  # each epoch reported exactly once
    assert b.metrics["epoch"] == 3 and b.metrics["step"] == 21
    pb, pc = load_checkpoint(b.checkpoint_dir), load_checkpoint(c.checkpoint_dir)
    assert (pb["epoch"], pb["step"]) == (pc["epoch"], pc["step"]) == (3, 21)
    for part in ("model", "ema"):
        for key, value in pc[part].items():
            assert torch.allclose(pb[part][key].float(), value.float(), atol=1e-5), (part, key)
    assert pb["scheduler"] == pc["scheduler"]
    assert b.metrics["val_top1"] == pytest.approx(c.metrics["val_top1"])


def test_ensemble_members_children_and_registration(ray_2cpu, tiny_cifar_shards, tmp_path):
    """Two 1-worker members fit the 2-CPU cluster together, so they train concurrently."""
    from mlflow import MlflowClient

    from orchestration.ensemble import member_slots

    cfg = _cfg(
        tiny_cifar_shards,
        tmp_path,
        "schedule.epochs=1",
        "debug.max_steps_per_epoch=2",
        "ensemble.members=2",
        "ensemble.register=true",
        "ensemble.model_name=tiny-ens",
        "checkpoint.name=ens",
        "seed=5",
        "scaling.num_workers=1",
    )
    assert member_slots(cfg) == 2
    outcome = run_training(cfg, REPO)
    client = MlflowClient(outcome.tracking_uri)
    assert outcome.parent_run_id and len(outcome.members) == 2
    for i, member in enumerate(outcome.members):
        run = client.get_run(member.run_id)
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert run.data.params["seed"] == str(5 + i) and run.info.run_name == f"ens-member{i}"
        assert Path(member.checkpoint_dir).parent.name == f"ens-member{i}"
        assert load_checkpoint(member.checkpoint_dir)["config"]["seed"] == 5 + i
    w0 = load_checkpoint(outcome.members[0].checkpoint_dir)["model"]["fc.weight"]
    w1 = load_checkpoint(outcome.members[1].checkpoint_dir)["model"]["fc.weight"]
    assert not torch.allclose(w0, w1)  # different seeds, different members
    version = outcome.registered
    assert version is not None and version.name == "tiny-ens"
    assert client.get_model_version("tiny-ens", version.version).tags["members"] == "2"
    assert outcome.promotion is not None and outcome.promotion.promoted
    assert client.get_run(outcome.parent_run_id).data.tags["registered_version"] == str(version.version)
    # where users look in MLflow: the parent run's metrics are the ensemble's evaluation; every
    # member run lists its shards under "Datasets" (digest = the manifest hash); the version's
    # description is its evaluation table and its runs (before: no metrics, no datasets, no description)
    tags = client.get_model_version("tiny-ens", version.version).tags
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["eval.top1_error"] == pytest.approx(float(tags["eval.top1_error"]))
    from pipeline import manifest_sha256

    digest = manifest_sha256(tiny_cifar_shards)[:36]
    for member in outcome.members:
        inputs = client.get_run(member.run_id).inputs.dataset_inputs
        seen = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in inputs}
        name = Path(tiny_cifar_shards).name
        assert seen == {(f"{name}/train", digest, "training"), (f"{name}/val", digest, "validation")}
    description = client.get_model_version("tiny-ens", version.version).description
    assert description.startswith("Ensemble of 2 Inception member(s), averaged; 1 crop(s) per image.")
    assert f"{100 * float(tags['eval.top1_error']):.2f} %" in description
    assert all(f"`{m.run_id}`" in description for m in outcome.members)  # a sqlite store: ids, no URLs
    # the training run lists the version under "Registered models" (the UI searches versions by
    # run id; before: the registration run only)
    found = client.search_model_versions(f"run_id='{outcome.parent_run_id}'")
    assert [(v.name, v.version) for v in found] == [("tiny-ens", version.version)]
    assert client.get_model_version("tiny-ens", version.version).run_id == outcome.parent_run_id


def test_new_job_on_same_run_continues(ray_2cpu, tiny_cifar_shards, tmp_path):
    """A second job with the same storage path and name resumes the finished epochs and the MLflow run."""
    from mlflow import MlflowClient

    common = ("debug.max_steps_per_epoch=2", "checkpoint.name=again")
    first = run_training(_cfg(tiny_cifar_shards, tmp_path, *common, "schedule.epochs=1"), REPO)
    second = run_training(_cfg(tiny_cifar_shards, tmp_path, *common, "schedule.epochs=2"), REPO)
    (a,), (b,) = first.members, second.members
    assert a.run_id == b.run_id  # the same MLflow run continues
    assert _epoch_steps(MlflowClient(second.tracking_uri), b.run_id) == [1, 2]
    payload = load_checkpoint(b.checkpoint_dir)
    assert (payload["epoch"], payload["step"]) == (2, 4)  # epoch 1 was not trained again
