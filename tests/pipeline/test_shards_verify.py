"""verify_shards and the two CLIs: clean folders pass, each kind of damage is named, exit codes."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile

import pytest

from pipeline.schema import encode_label
from pipeline.shards import build_shards, verify_shards
from pipeline.shards.cli import build_main, verify_main
from pipeline.shards.writer import Sample, write_shard
from tests.pipeline.test_shards_data import all_files, good_files, write_folder


@pytest.fixture
def built(tmp_path):
    src = write_folder(tmp_path / "src", all_files())
    out = tmp_path / "out"
    build_shards(src, out, "train", shard_size=5, progress=False)
    return out


def test_clean_folder_passes_deep(built):
    report = verify_shards(built, deep=True, progress=False)
    assert report.ok, report.summary()
    assert report.splits["train"].samples == len(good_files())
    assert report.splits["train"].shards == 4
    assert report.splits["train"].skipped == 3
    assert sorted(report.splits["train"].class_counts.items()) == [(0, 5), (1, 6), (2, 6)]
    assert report.summary().endswith("OK")


def test_corrupt_shard_is_reported(built):
    tar = built / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x01
    tar.write_bytes(bytes(data))
    report = verify_shards(built, progress=False)
    assert not report.ok
    assert report.errors == [
        "train-000001.tar: sha256 differs from the manifest (corrupt or replaced); rebuild it"]


def test_index_mismatch_is_reported(built):
    idx = built / "train-000002.idx"
    lines = idx.read_text().splitlines()
    first = lines[1].split()
    first[1] = str(int(first[1]) + 512)
    idx.write_text("\n".join([lines[0], " ".join(first), *lines[2:]]) + "\n")
    report = verify_shards(built, progress=False)
    assert report.errors == [
        "train-000002.idx: entry 0 does not match the tar member (offset/size/name); rebuild the shard"]


def test_bad_labels_found_when_manifest_matches(built):
    """A shard rewritten consistently (sha256 in the manifest) whose lbl disagrees with cls and range."""
    manifest = json.loads((built / "manifest.json").read_text())
    s = Sample("k1", good_files()["cat/cat_000.jpg"], 2, {"label": 2})
    write_shard(built / "train-000003.tar", built / "train-000003.idx", [s])
    buf = io.BytesIO()  # same members and offsets, lbl replaced by 9 (3 classes)
    with tarfile.open(built / "train-000003.tar") as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            dst.addfile(m, io.BytesIO(encode_label(9)[1] if m.name.endswith(".lbl") else data))
    shard = manifest["splits"]["train"]["shards"][3]
    (built / shard["tar"]).write_bytes(buf.getvalue())
    shard.update(sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue()), count=1)
    (built / "manifest.json").write_text(json.dumps(manifest))
    errors = verify_shards(built, progress=False).errors
    assert errors == ["train-000003.tar: sample k1: cls '2' != lbl 9",
                      "train-000003.tar: sample k1: label 9 outside 0..2"]


def test_verify_cli_exit_codes(built, capsys):
    assert verify_main([str(built), "--no-progress"]) == 0
    assert "train: 17 samples in 4 shards" in capsys.readouterr().out
    (built / "train-000000.idx").unlink()
    assert verify_main([str(built), "--split", "train", "--no-progress"]) == 1
    assert "train-000000.idx: missing" in capsys.readouterr().out
    assert verify_main([str(built.parent / "nowhere"), "--no-progress"]) == 1


def test_build_cli_success_and_one_line_errors(tmp_path, capsys):
    src = write_folder(tmp_path / "src", all_files())
    out = tmp_path / "out"
    assert build_main([str(src), str(out), "--split", "train", "--shard-size", "8", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "train: 17 samples in 3 shards, 3 classes, 3 skipped" in text
    assert "skipped dog/dog_empty.jpg: zero-byte file" in text
    assert build_main([str(tmp_path / "missing"), str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"build-shards: error: source {tmp_path / 'missing'} does not exist"]


def test_console_scripts_help():
    for script in ("build-shards", "verify-shards"):
        res = subprocess.run([str(__import__("pathlib").Path(sys.executable).with_name(script)), "--help"],
                             capture_output=True, text=True)
        assert res.returncode == 0 and "usage:" in res.stdout
    res = subprocess.run([sys.executable, "-m", "pipeline.shards.cli", "x", "y", "--workers", "two"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "invalid int value: 'two'" in res.stderr
