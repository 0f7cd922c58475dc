"""Chaos suite: failures injected from outside into real runs on this machine. Slow; each test
prints its timings (``pytest -s`` shows them).

(a) a Ray node holding a training worker is killed mid-epoch on a real 2-node Ray cluster
    (``ray.cluster_utils.Cluster``, every node on 127.0.0.1) and replaced: the run ends with the
    same weights as an undisturbed run on the same cluster;
(b) the MLflow server dies mid-run and comes back: training goes on, and the metrics of the outage
    are logged once it is back (buffered in the rank-0 tracker);
(c) the process writing a checkpoint is killed during the write: the previous checkpoint stays
    loadable and is the one a resume picks;
(d) an elastic run (Ray Train's worker range) loses a node that is not replaced: it goes on with
    one worker from its last mid-epoch checkpoint and consumes the undisturbed run's sample order;
(e) nothing shared but an object store (a real S3-compatible server on 127.0.0.1): shards,
    checkpoints (Ray's storage) and MLflow's artifacts on ``s3://``, each node with its own shard
    cache; a node is killed mid-epoch and the run ends with the weights of (a)'s undisturbed run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from ops.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from orchestration.config import load_config
from tests.orchestration.test_ray_training import _cfg as run_cfg

REPO = Path(__file__).resolve().parents[2]


def _cfg(shards, tmp_path, *overrides):
    return run_cfg(shards, tmp_path, "tracking.log_every_steps=100", *overrides)


def _wait_for(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def _hold_port(port: int):
    """A listening socket on 127.0.0.1:``port`` (None when something already listens there)."""
    import socket

    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen()
    return s


# ---- (a) node loss on a 2-node cluster --------------------------------------------------------
def _node_env(caches: Path) -> dict[str, str]:
    """A new node's own shard cache folder (``$INCEPTION_CACHE_DIR``)."""
    folder = Path(tempfile.mkdtemp(prefix="node-", dir=caches))
    return {"INCEPTION_CACHE_DIR": str(folder)}


@pytest.fixture(scope="module")
def two_node_cluster(s3_server):
    """Every node on 127.0.0.1; started with the object store's AWS_* variables in its environment,
    as nodes are started with their credentials (test (e))."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on 127.0.0.1
    import ray
    from ray.cluster_utils import Cluster

    from ops.serving import free_port

    start = time.monotonic()
    # Ray's default dashboard port taken, as another Ray instance on this machine would take it:
    # before, the cluster failed to start ("Failed to bind to 127.0.0.1:8265").
    taken = _hold_port(8265)
    # The head runs the driver-side actors (controller, 0 CPUs); each worker node has room for one
    # training worker, so a 2-worker run spans both nodes.
    # (the head's dashboard serves the state API that Ray Train's placement-group cleaner polls)
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    caches = Path(tempfile.mkdtemp(prefix="chaos-node-caches-"))
    # every node its own shard cache (what nodes that share no file system have)
    nodes = [cluster.add_node(num_cpus=1, env_vars=_node_env(caches)) for _ in range(2)]
    cluster.node_caches = caches
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    cluster.wait_for_nodes()
    print(f"\n[chaos] 2-node cluster up in {time.monotonic() - start:.1f}s")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(caches, ignore_errors=True)
    if taken is not None:
        taken.close()


NODE_LOSS = ("schedule.epochs=3", "checkpoint.max_failures=2")


@pytest.fixture(scope="module")
def undisturbed_run(two_node_cluster, small_cifar_shards, tmp_path_factory):
    """The run (a) and (e) disturb, undisturbed, on the same cluster: ``(outcome, seconds)``."""
    from orchestration.ensemble import run_training

    tmp = tmp_path_factory.mktemp("undisturbed")
    start = time.monotonic()
    clean = run_training(_cfg(small_cifar_shards, tmp, *NODE_LOSS, "checkpoint.name=clean"), REPO)
    return clean, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.realdata
def test_node_killed_mid_epoch_ends_with_the_undisturbed_weights(
    two_node_cluster, undisturbed_run, small_cifar_shards, tmp_path
):
    from orchestration.ensemble import run_training

    cluster, nodes = two_node_cluster
    caches = cluster.node_caches
    clean, clean_s = undisturbed_run

    cfg = _cfg(small_cifar_shards, tmp_path, *NODE_LOSS, "checkpoint.name=chaos")
    run_dir = Path(cfg.checkpoint.storage_path) / "chaos"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(cfg, REPO)), daemon=True)
    start = time.monotonic()
    thread.start()
    # epoch 1 checkpointed: the node dies a moment into epoch 2 (31 steps of ~0.12 s per epoch)
    _wait_for(lambda: any(run_dir.glob("checkpoint_*")), 300, "the first checkpoint")
    time.sleep(1.5)
    killed_at = time.monotonic() - start
    cluster.remove_node(nodes[1], allow_graceful=False)  # raylet and its workers, SIGKILL
    nodes[1] = cluster.add_node(num_cpus=1, env_vars=_node_env(caches))  # the run restarts on it
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish after the node loss"
    chaos_s = time.monotonic() - start
    print(
        f"[chaos a] undisturbed run {clean_s:.1f}s; node killed at {killed_at:.1f}s; "
        f"run with the loss {chaos_s:.1f}s"
    )

    (c,), (b,) = clean.members, outcome["result"].members
    pc, pb = load_checkpoint(c.checkpoint_dir), load_checkpoint(b.checkpoint_dir)
    assert (pb["epoch"], pb["step"]) == (pc["epoch"], pc["step"]) == (3, 3 * 31)
    for part in ("model", "ema"):
        for key, value in pc[part].items():
            assert torch.allclose(pb[part][key].float(), value.float(), atol=1e-5), (part, key)
    assert b.metrics["val_top1"] == pytest.approx(c.metrics["val_top1"])


# ---- (b) the MLflow server dies mid-run and comes back ----------------------------------------
@pytest.mark.slow
@pytest.mark.realdata
def test_mlflow_outage_mid_run_loses_no_metric(two_node_cluster, small_cifar_shards, tmp_path):
    from mlflow import MlflowClient

    from ops import cluster as services
    from orchestration.ensemble import run_training

    state = tmp_path / "mlflow"
    state.mkdir()
    server = services.start_mlflow(state, 0, timeout=120)
    uri, port = server["url"], server["port"]
    cfg = _cfg(
        small_cifar_shards,
        tmp_path,
        "schedule.epochs=4",
        "checkpoint.name=outage",
        f"tracking.uri={uri}",
        "tracking.log_every_steps=5",
    )
    run_dir = Path(cfg.checkpoint.storage_path) / "outage"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(cfg, REPO)), daemon=True)
    start = time.monotonic()
    try:
        thread.start()
        _wait_for(lambda: any(run_dir.glob("checkpoint_*")), 300, "the first checkpoint")
        os.killpg(server["pgid"], signal.SIGKILL)
        down_at = time.monotonic() - start
        time.sleep(8.0)  # epoch 2 ends (and is logged) while the server is down
        server = services.start_mlflow(state, port, timeout=120)
        assert server["port"] == port  # back on the same URL
        up_at = time.monotonic() - start
        thread.join(timeout=600)
        assert not thread.is_alive() and "result" in outcome, "training did not finish"
        print(
            f"\n[chaos b] server down from {down_at:.1f}s to {up_at:.1f}s; "
            f"run ended at {time.monotonic() - start:.1f}s"
        )
        (member,) = outcome["result"].members
        client = MlflowClient(uri)
        epochs = sorted(m.value for m in client.get_metric_history(member.run_id, "epoch"))
        assert epochs == [1, 2, 3, 4]  # every epoch's figures, the outage's included
        assert len(client.get_metric_history(member.run_id, "val/top1_acc")) == 4
        steps = sorted(m.step for m in client.get_metric_history(member.run_id, "train/loss"))
        assert steps == list(range(5, 4 * 31 + 1, 5))
        assert client.get_run(member.run_id).info.status == "FINISHED"
    finally:
        services.stop_group(server["pgid"])


# ---- (c) killed while writing a checkpoint -----------------------------------------------------
WRITER = """
import sys, torch
from ops.checkpoint import save_checkpoint
big = {"w": torch.ones(64, 1024, 1024)}  # 256 MB: the write takes long enough to be interrupted
payload = {"model_spec": {}, "model": big, "ema": big, "epoch": 2, "step": 20, "config": {},
           "class_names": []}
print("writing", flush=True)
save_checkpoint(sys.argv[1], payload)
print("written", flush=True)
"""


@pytest.mark.slow
def test_killed_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    from orchestration.resume import newest_local_checkpoint

    ckpt = tmp_path / "runs" / "job" / "checkpoint_2026-01-01_00-00-01.000000"
    small = {"w": torch.arange(6.0)}
    save_checkpoint(
        ckpt,
        {
            "model_spec": {},
            "model": small,
            "ema": small,
            "epoch": 1,
            "step": 10,
            "config": {},
            "class_names": [],
        },
    )
    before = (ckpt / CHECKPOINT_FILE).read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(ckpt)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    waited = _wait_for(
        lambda: (
            any(ckpt.glob(".checkpoint-*.tmp"))
            and next(ckpt.glob(".checkpoint-*.tmp")).stat().st_size > 1 << 20
        ),
        120,
        "the write to start",
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = next(ckpt.glob(".checkpoint-*.tmp"))
    print(
        f"\n[chaos c] killed {waited:.2f}s into the write of a 268 MB checkpoint, "
        f"{partial.stat().st_size / 1e6:.0f} MB written"
    )
    assert (ckpt / CHECKPOINT_FILE).read_bytes() == before  # the last complete checkpoint, untouched
    assert load_checkpoint(ckpt)["epoch"] == 1

    # the same kill while Ray copies a reported checkpoint into the storage path leaves a newer
    # folder with a partial file: a resume skips it and takes the last complete one
    newer = ckpt.parent / "checkpoint_2026-01-01_00-00-02.000000"
    newer.mkdir()
    (newer / CHECKPOINT_FILE).write_bytes(partial.read_bytes()[: 1 << 20])
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"checkpoint.storage_path={tmp_path / 'runs'}", "checkpoint.name=job"],
        root=str(REPO),
    )
    assert newest_local_checkpoint(cfg, newer_than_step=0) == ckpt


# ---- (d) elastic: a node is lost and the run goes on with the workers it has -------------------
@pytest.mark.slow
@pytest.mark.realdata
def test_elastic_run_continues_the_same_order_on_fewer_workers(
    two_node_cluster, small_cifar_shards, tmp_path
):
    """Ray Train's elastic range (``scaling.min_workers=1``, ``num_workers=2``): a node holding a
    worker is killed and not replaced; the run resumes from its last mid-epoch checkpoint on the one
    worker left (``data.global_batch`` keeps the global batch of 64) and consumes exactly the global
    sequence of samples of an undisturbed 2-worker run."""
    import json

    from orchestration.ensemble import run_training

    cluster, nodes = two_node_cluster
    common = (
        "schedule.epochs=2",
        "checkpoint.max_failures=2",
        "scaling.min_workers=1",
        "scaling.num_workers=2",
        "data.global_batch=64",
        "checkpoint.every_steps=5",
    )

    def cfg(name):
        trace = f"debug.trace_file={tmp_path / 'trace' / name}"
        return _cfg(small_cifar_shards, tmp_path, *common, f"checkpoint.name={name}", trace)

    def records(name):
        ranks = sorted((tmp_path / "trace").glob(f"{name}.rank*"))
        return [[json.loads(x) for x in r.read_text().splitlines()] for r in ranks]

    run_training(cfg("elastic-clean"), REPO)
    r0, r1 = records("elastic-clean")
    undisturbed = [a["ids"] + b["ids"] for a, b in zip(r0, r1, strict=True)]
    assert len(undisturbed) == 2 * 31

    run_dir = Path(tmp_path / "runs" / "elastic")
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=run_training(cfg("elastic"), REPO)), daemon=True
    )
    start = time.monotonic()
    thread.start()
    complete: set = set()

    def complete_checkpoints() -> int:  # a folder appears before its files are all copied into it
        for folder in set(run_dir.glob("checkpoint_*")) - complete:
            try:
                load_checkpoint(folder)
                complete.add(folder)
            except Exception:
                time.sleep(0.2)  # still being copied
        return len(complete)

    _wait_for(lambda: complete_checkpoints() >= 2, 300, "two complete mid-epoch checkpoints")
    time.sleep(0.5)
    killed_at = time.monotonic() - start
    cluster.remove_node(nodes[1], allow_graceful=False)  # not replaced: the run must shrink
    try:
        thread.join(timeout=600)
        assert not thread.is_alive(), "the run did not finish on the remaining worker"
    finally:
        caches = cluster.node_caches
        nodes[1] = cluster.add_node(num_cpus=1, env_vars=_node_env(caches))  # as the other tests expect
    print(f"[chaos d] node killed at {killed_at:.1f}s; elastic run {time.monotonic() - start:.1f}s")
    ranks = records("elastic")
    first, after = ranks[0], []
    # the one-worker run's records hold the whole global batch (64); it may redo steps after its
    # checkpoint, or start right after it when the node died just after that checkpoint
    drop = next(i for i, r in enumerate(first) if len(r["ids"]) == 64)
    resumed_from = first[drop]["step"] - 1  # the checkpoint the one-worker run started from
    assert resumed_from % 5 == 0 and resumed_from >= 10
    before = [a["ids"] + b["ids"] for a, b in zip(first[:resumed_from], ranks[1][:resumed_from], strict=True)]
    after = [r["ids"] for r in first[drop:]]
    assert all(len(ids) == 64 for ids in after)  # one worker, the whole global batch
    assert before + after == undisturbed
    payload = load_checkpoint(outcome["result"].members[0].checkpoint_dir)
    assert (payload["epoch"], payload["step"]) == (2, 62) and payload["extra"]["world_size"] == 1


# ---- (e) nothing shared but the object store ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.realdata
def test_nothing_shared_but_the_object_store(
    two_node_cluster, undisturbed_run, small_cifar_shards, s3_server, tmp_path
):
    """Shards, checkpoints and MLflow artifacts on ``s3://``; the driver's MLflow server keeps its
    artifacts there too. A worker node is killed a moment into epoch 2 and replaced by a node with
    an empty cache: the run resumes from the checkpoint in the bucket and ends with the weights of
    the undisturbed run that read the same shards from a folder. Each node downloads a shard once."""
    from mlflow import MlflowClient

    from ops import cluster as services
    from orchestration.ensemble import run_training
    from pipeline.schema import load_manifest
    from pipeline.shards.upload import upload_shards

    cluster, nodes = two_node_cluster
    clean, _ = undisturbed_run
    for bucket in ("data", "runs"):
        s3_server.make_bucket(bucket)
    upload_shards(small_cifar_shards, "s3://data/cifar-small", progress=False)
    state = tmp_path / "mlflow"
    state.mkdir()
    server = services.start_mlflow(state, 0, timeout=120, artifacts_destination="s3://runs/mlartifacts")
    cfg = _cfg(
        small_cifar_shards,
        tmp_path,
        *NODE_LOSS,
        "checkpoint.name=cloud",
        "data.shards=s3://data/cifar-small",
        "checkpoint.storage_path=s3://runs/cloud",
        f"tracking.uri={server['url']}",
    )
    run_dir = s3_server.root / "runs" / "cloud" / "cloud"  # what the server holds, seen from its folder
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_training(cfg, REPO)), daemon=True)
    start = time.monotonic()
    try:
        thread.start()
        _wait_for(
            lambda: any(run_dir.glob("checkpoint_*")) or not thread.is_alive(),
            300,
            "a checkpoint in the bucket",
        )
        assert thread.is_alive(), f"the run ended before its first checkpoint: {outcome}"
        time.sleep(1.5)
        killed_at = time.monotonic() - start
        cluster.remove_node(nodes[1], allow_graceful=False)
        nodes[1] = cluster.add_node(num_cpus=1, env_vars=_node_env(cluster.node_caches))  # empty cache
        thread.join(timeout=600)
        assert not thread.is_alive() and "result" in outcome, "the run did not finish after the node loss"
        print(f"\n[chaos e] node killed at {killed_at:.1f}s; run on s3 {time.monotonic() - start:.1f}s")
        (c,), (b,) = clean.members, outcome["result"].members
        assert b.checkpoint_dir.startswith("s3://runs/cloud/cloud/checkpoint_")
        pc = load_checkpoint(c.checkpoint_dir)
        pb = load_checkpoint(s3_server.root / b.checkpoint_dir[len("s3://") :])
        assert (pb["epoch"], pb["step"]) == (pc["epoch"], pc["step"]) == (3, 3 * 31)
        for part in ("model", "ema"):
            for key, value in pc[part].items():
                assert torch.allclose(pb[part][key].float(), value.float(), atol=1e-5), (part, key)
        # the member's checkpoint artifacts went through the MLflow server into the bucket
        artifacts = MlflowClient(server["url"]).list_artifacts(b.run_id, "checkpoint")
        assert artifacts and any((s3_server.root / "runs" / "mlartifacts").rglob("checkpoint.pt"))
    finally:
        services.stop_group(server["pgid"])
    # each node that trained filled its own cache with every train shard, once
    manifest = load_manifest(small_cifar_shards)
    tars = sorted(sh.tar for sh in manifest.split("train").shards)
    filled = [sorted(p.name for p in d.rglob("train-*.tar")) for d in cluster.node_caches.iterdir()]
    filled = [f for f in filled if f]
    assert len(filled) >= 2 and all(f == tars for f in filled)
    gets = s3_server.gets("data", "cifar-small/train-")
    steps = 3 * 31
    assert sum(gets.values()) <= len(tars) * len(filled) + steps  # no request per sample
