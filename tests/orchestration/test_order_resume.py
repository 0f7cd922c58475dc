"""Mid-epoch checkpoints and resumes through real Ray Train jobs (2 CPU workers, tiny real CIFAR-10
shards): a worker killed in the middle of an epoch resumes at the next sample of the epoch's global
order, and a job resubmitted with another number of workers continues the same global sequence.
Slow (about 3 minutes); needs REAL_DATA_DIR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.checkpoint import load_checkpoint
from orchestration.config import load_config
from orchestration.ensemble import run_training
from pipeline.order import SampleOrder
from pipeline.samples import Quarantine, SampleTable

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.realdata]
COMMON = (
    "ensemble.members=1",
    "ensemble.register=false",
    "schedule.epochs=2",
    "tracking.log_every_steps=100",
    "data.global_batch=64",  # 2 workers x 32, or 1 x 64: the same schedule either way
    "checkpoint.every_steps=3",
)


def _cfg(shards, tmp_path, name, *overrides):
    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.shards={shards}",
            f"checkpoint.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"checkpoint.name={name}",
            f"debug.trace_file={tmp_path / 'trace' / name}",
            *COMMON,
            *overrides,
        ],
        root=str(REPO),
    )


def _trace(tmp_path, name):
    """``{(epoch, step): (global ids of the step, rank 0's loss)}``, the last record of each step
    (a step run again after a failure replaces the first attempt), and every record in order."""
    ranks = sorted((tmp_path / "trace").glob(f"{name}.rank*"))
    lines = [[json.loads(x) for x in r.read_text().splitlines()] for r in ranks]
    last: dict = {}
    for rank, records in enumerate(lines):
        for rec in records:
            ids, loss = last.get((rec["epoch"], rec["step"]), ({}, None))
            ids = {**ids, rank: rec["ids"]}
            last[(rec["epoch"], rec["step"])] = (ids, rec["loss"] if rank == 0 else loss)
    steps = {k: ([i for r in sorted(ids) for i in ids[r]], loss) for k, (ids, loss) in last.items()}
    return steps, lines


@pytest.fixture(scope="module")
def undisturbed(ray_2cpu, tiny_cifar_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("undisturbed")
    run_training(_cfg(tiny_cifar_shards, tmp, "clean"), REPO)
    return _trace(tmp, "clean")[0]


def test_mid_epoch_kill_resumes_at_the_next_sample(ray_2cpu, tiny_cifar_shards, tmp_path, undisturbed):
    marker = tmp_path / "failed.marker"
    cfg = _cfg(
        tiny_cifar_shards,
        tmp_path,
        "broken",
        "debug.fail_at_step=5",  # 7 steps per epoch; the last checkpoint before it is at step 3
        f"debug.fail_marker={marker}",
        "debug.fail_mode=kill",
        "checkpoint.max_failures=1",
    )
    outcome = run_training(cfg, REPO)
    assert marker.read_text() == "failed at step 5\n"
    steps, lines = _trace(tmp_path, "broken")
    # rank 0 ran steps 1..5, died, and ran 4..14 again from the step-3 checkpoint
    assert [r["step"] for r in lines[0]] == [1, 2, 3, 4, 5, *range(4, 15)]
    assert sorted(steps) == sorted(undisturbed) and len(steps) == 14
    table = SampleTable.load(str(tiny_cifar_shards), "train")
    order = SampleOrder(table, Quarantine(table), 0, 32, 0, 2, train=True)
    for epoch in (0, 1):
        seen = [i for s in range(1, 15) if (epoch, s) in steps for i in steps[(epoch, s)][0]]
        assert len(seen) == len(set(seen)) == 7 * 64  # exactly once, the tail of < 64 dropped
        assert seen == order.epoch_ids(epoch)[: 7 * 64].tolist()
    for key, (ids, loss) in undisturbed.items():
        assert steps[key][0] == ids, key  # the same samples at every step
        assert steps[key][1] == pytest.approx(loss, rel=1e-5, abs=1e-6), key  # and the same losses
    payload = load_checkpoint(outcome.members[0].checkpoint_dir)
    assert (payload["epoch"], payload["step"]) == (2, 14)
    assert payload["extra"]["data"]["position"] == 0 and payload["extra"]["data"]["quarantine"] == []


def test_resume_with_one_worker_continues_the_two_worker_sequence(
    ray_2cpu, tiny_cifar_shards, tmp_path, undisturbed
):
    marker = tmp_path / "failed.marker"
    failing = ("debug.fail_at_step=5", f"debug.fail_marker={marker}", "checkpoint.max_failures=0")
    with pytest.raises(Exception, match="fail_at_step=5"):
        run_training(_cfg(tiny_cifar_shards, tmp_path, "elastic", *failing), REPO)
    states = sorted((tmp_path / "runs" / "elastic").glob("checkpoint_*/data_state.json"))
    assert json.loads(states[-1].read_text())["position"] == 3 * 64
    outcome = run_training(_cfg(tiny_cifar_shards, tmp_path, "elastic", "scaling.num_workers=1"), REPO)
    _, lines = _trace(tmp_path, "elastic")
    assert len(lines) == 2 and [r["step"] for r in lines[1]] == [1, 2, 3, 4, 5]  # rank 1 left after step 5
    assert [r["step"] for r in lines[0]] == [1, 2, 3, 4, 5, *range(4, 15)]
    two = [lines[0][s]["ids"] + lines[1][s]["ids"] for s in range(3)]  # steps 1-3 on two workers
    one = [r["ids"] for r in lines[0][5:]]  # steps 4-14 on one worker, from the step-3 checkpoint
    assert two + one == [undisturbed[(e, s)][0] for e, s in sorted(undisturbed)]
    assert load_checkpoint(outcome.members[0].checkpoint_dir)["step"] == 14


def test_changed_shards_are_refused_before_a_resume(
    ray_2cpu, tiny_cifar_shards, small_cifar_shards, tmp_path
):
    from orchestration.resume import DataCheckError

    cfg = _cfg(tiny_cifar_shards, tmp_path, "data", "schedule.epochs=1", "debug.max_steps_per_epoch=3")
    run_training(cfg, REPO)
    other = _cfg(small_cifar_shards, tmp_path, "data", "schedule.epochs=2", "debug.max_steps_per_epoch=3")
    refused = "are not those the checkpoint was trained on .*--force-data-change"
    with pytest.raises(DataCheckError, match=refused):
        run_training(other, REPO)
    # the same shards with shorter epochs: the workers refuse the schedule, as one error naming the
    # setting with its old and new value, not retried (before: "resume with the same data, batch
    # size and number of workers", raised max_failures + 1 times with a traceback each)
    shorter = _cfg(
        tiny_cifar_shards, tmp_path, "data", "schedule.epochs=2", "debug.max_steps_per_epoch=2",
        "checkpoint.max_failures=2", f"debug.trace_file={tmp_path / 'trace' / 'shorter'}",
    )  # fmt: skip
    with pytest.raises(DataCheckError) as exc:
        run_training(shorter, REPO)
    assert str(exc.value) == (
        "the checkpoint's epochs have 3 steps and this run's 2, so its learning-rate schedule cannot "
        "continue; changed since: debug.max_steps_per_epoch 3 -> 2. Resume with the checkpoint's "
        "values, or start a new run (checkpoint.name)"
    )
    assert not list((tmp_path / "trace").glob("shorter*"))  # no worker got as far as a step


def _zero_scan(shards: Path, table: SampleTable, i: int) -> None:
    """Zero sample ``i``'s JPEG scan data in place (its header intact, so DALI fails on its data)."""
    offset, size = (int(v) for v in table.jpg[i])
    tar = shards / Path(table.tars[int(table.tar_of[i])]).name
    data = bytearray(tar.read_bytes())
    sos = bytes(data[offset : offset + size]).index(b"\xff\xda") + 20  # into the start of scan
    data[offset + sos : offset + size] = bytes(size - sos)  # zeros: "Input file read error" in DALI
    tar.write_bytes(bytes(data))


def test_corrupt_sample_is_quarantined_by_all_ranks(ray_2cpu, tiny_cifar_shards, tmp_path):
    """A training sample and a validation sample whose scan data is zeroed inside real shards:
    training completes, both ranks run every step with full batches, the training sample is named
    once, replaced in its batch and absent from epoch 2; the validation sample, in rank 1's range, is
    left out and every other one read exactly once in every pass (before: rank 1's range moved in
    its next pass and one sample was read twice); both are shared by the ranks, kept in the
    checkpoint and logged to MLflow."""
    import shutil

    from mlflow import MlflowClient

    from pipeline.order import epoch_permutation

    shards = tmp_path / "shards"
    shutil.copytree(tiny_cifar_shards, shards)
    table = SampleTable.load(str(shards), "train")
    bad = int(epoch_permutation(0, 0, len(table))[10])  # read in the second step of epoch 1
    _zero_scan(shards, table, bad)
    val = SampleTable.load(str(shards), "val")
    bad_val = len(val) * 3 // 4  # in rank 1's half of the split
    _zero_scan(shards, val, bad_val)
    # the shards no longer match their manifest's sha256: training would stop at the first pass
    # (pipeline.checksums); this test is about what quarantine does with what it meets
    overrides = ("data.skip_corrupt=true", "data.verify_sha256=false")
    outcome = run_training(_cfg(shards, tmp_path, "quarantine", *overrides), REPO)
    steps, lines = _trace(tmp_path, "quarantine")
    assert [len(r) for r in lines] == [14, 14] and all(len(ids) == 64 for ids, _ in steps.values())
    first = [i for s in range(1, 8) for i in steps[(0, s)][0]]
    assert bad not in first and len(set(first)) == 64 * 7 - 1  # its substitute appears twice
    second = [i for s in range(8, 15) for i in steps[(1, s)][0]]
    assert bad not in second and len(set(second)) == len(second) == 64 * 7
    shard_name, key = table.name(bad)
    val_shard, val_key = val.name(bad_val)
    assert outcome.members[0].metrics["val_count"] == len(val) - 1  # the last epoch's pass
    payload = load_checkpoint(outcome.members[0].checkpoint_dir)
    records = payload["extra"]["data"]["quarantine"]
    assert [(r["shard"], r["key"], r["epoch"]) for r in records] == [
        (shard_name, key, 0),
        (val_shard, val_key, -1),
    ]
    client = MlflowClient(outcome.tracking_uri)
    path = client.download_artifacts(outcome.members[0].run_id, "data/quarantine.json", str(tmp_path))
    assert [r["key"] for r in json.loads(Path(path).read_text())] == [key, val_key]
    metrics = client.get_run(outcome.members[0].run_id).data.metrics
    assert metrics["data/train_quarantined"] == 1 and metrics["data/val_quarantined"] == 1
    history = client.get_metric_history(outcome.members[0].run_id, "val/images")
    assert [m.value for m in history] == [len(val) - 1] * 2
