"""ops.cluster: a real Ray head and MLflow server on 127.0.0.1, started twice (idempotent), then stopped."""

from __future__ import annotations

import json
import shutil

import pytest
import requests

from ops import cluster


@pytest.mark.slow
def test_up_twice_status_down(tmp_path, capsys):
    state_dir = tmp_path / "cluster"
    ports = {"ray_port": 0, "dashboard_port": 0, "mlflow_port": 0}  # free ports: other tests may run Ray too
    try:
        first = cluster.up(state_dir, num_cpus=1, **ports)
        ray_info, ml = first["ray"], first["mlflow"]
        assert not ray_info["reused"] and not ml["reused"]
        assert ray_info["address"].startswith("127.0.0.1:") and ml["url"].startswith("http://127.0.0.1:")
        # /api/gcs_healthz answers without a token (Ray enables token auth when ~/.ray/auth_token exists)
        assert requests.get(f"{ray_info['dashboard_url']}/api/gcs_healthz", timeout=5).text == "success"
        assert requests.get(f"{ml['url']}/health", timeout=5).text.strip() == "OK"
        assert json.loads((state_dir / "cluster.json").read_text())["mlflow"]["pgid"] == ml["pgid"]
        assert cluster.group_pids(ray_info["pgid"]) and ray_info["gcs_pid"] in cluster.group_pids(
            ray_info["pgid"]
        )

        second = cluster.up(state_dir, num_cpus=1, **ports)
        assert second["ray"]["reused"] and second["mlflow"]["reused"]
        assert (second["ray"]["pgid"], second["ray"]["gcs_pid"], second["mlflow"]["pid"]) == (
            ray_info["pgid"],
            ray_info["gcs_pid"],
            ml["pid"],
        )

        assert cluster.main(["status", "--state-dir", str(state_dir)]) == 0
        out = capsys.readouterr().out
        assert f"ray    running {ray_info['dashboard_url']}" in out and f"mlflow running {ml['url']}" in out
    finally:
        stopped = cluster.down(state_dir)
        shutil.rmtree(cluster._ray_temp_dir(state_dir.resolve()), ignore_errors=True)  # may sit in /tmp
    assert sorted(stopped) == ["mlflow", "ray"]
    assert not cluster.group_pids(ray_info["pgid"]) and not cluster.group_pids(ml["pgid"])
    assert not (state_dir / "cluster.json").exists() and cluster.status(state_dir) == {}


def test_status_without_cluster_and_bad_command(tmp_path, capsys):
    assert cluster.main(["status", "--state-dir", str(tmp_path)]) == 0
    assert "no cluster recorded" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cluster.main(["start"])
    assert exc.value.code == 2
    assert cluster.pick_port(0) > 0
