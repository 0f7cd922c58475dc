"""``inception-predict`` on files, a folder and a tar of real JPEGs, from checkpoint folders and from a
registered version: the same classes and probabilities as the ensemble computed by hand; unreadable
files are listed, not fatal."""

from __future__ import annotations

import csv
import json
import tarfile

import numpy as np
import pytest

from ops import predict, registry
from tests.ops.conftest import CLASSES, jpeg_bytes, synthetic_image
from tests.ops.test_registry import hand_probabilities


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    folder = root / "photos" / "sub"
    folder.mkdir(parents=True)
    data = {f"img{i}.jpg": jpeg_bytes(synthetic_image(i % len(CLASSES), i)) for i in range(5)}
    for name in ("img0.jpg", "img1.jpg"):
        (folder / name).write_bytes(data[name])
    (root / "photos" / "notes.txt").write_text("not an image: skipped by name")
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    with tarfile.open(root / "more.tar", "w") as tar:
        for name in ("img2.jpg", "img3.jpg"):
            (root / name).write_bytes(data[name])
            tar.add(root / name, arcname=f"inner/{name}")
        link = tarfile.TarInfo("inner/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    (root / "img4.jpg").write_bytes(data["img4.jpg"])
    return root, data


def test_checkpoints_folder_tar_and_file_as_json(images, checkpoints, tmp_path, capsys):
    root, data = images
    out = tmp_path / "p.jsonl"
    rc = predict.main(
        [
            str(root / "photos"), str(root / "more.tar"), str(root / "img4.jpg"), str(root / "missing.jpg"),
            "--model", *map(str, checkpoints[:2]), "--crops", "10", "--top-k", "0",
            "--format", "json", "-o", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 1  # two inputs were not predicted
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"].split("/")[-1] for r in rows] == [
        "img0.jpg",
        "img1.jpg",
        "img2.jpg",
        "img3.jpg",
        "img4.jpg",
    ]
    assert rows[2]["source"] == f"{root / 'more.tar'}:inner/img2.jpg"
    want = hand_probabilities(checkpoints[:2], [data[f"img{i}.jpg"] for i in range(5)], 10)
    for row, p in zip(rows, want, strict=True):
        assert row["classes"] == list(CLASSES) and row["indices"] == list(range(len(CLASSES)))
        # CPU convolutions round differently with another batch size (the images around broken.jpg
        # are run one by one): ~1e-3 on these tiny random members
        np.testing.assert_allclose(row["probabilities"], p.numpy(), atol=3e-3)
        assert np.argmax(row["probabilities"]) == int(p.argmax())
    err = capsys.readouterr().err
    assert f"not predicted: {root / 'photos' / 'broken.jpg'}: is not a decodable image" in err
    assert f"not predicted: {root / 'missing.jpg'}: FileNotFoundError: no such file or folder" in err
    assert "link.jpg" not in err + out.read_text()  # a link in a tar is never followed
    assert "5 image(s) predicted with 2 member(s) x 10 crop(s); 2 not (listed above)" in err


def test_registered_version_as_csv_and_table(images, checkpoints, tmp_path, capsys, monkeypatch):
    root, data = images
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mv = registry.register_ensemble(
        [str(c) for c in checkpoints[:2]], "predict-me", tracking_uri=uri, crops=1
    )
    model = f"models:/predict-me/{mv.version}"
    common = [
        str(root / "img4.jpg"),
        "--model",
        model,
        "--tracking-uri",
        uri,
        "--no-progress",
        "--top-k",
        "3",
    ]
    assert predict.main([*common, "--format", "csv", "-o", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    p = hand_probabilities(checkpoints[:2], [data["img4.jpg"]], 1)[0]
    order = p.argsort(descending=True)[:3].tolist()
    assert [r["class"] for r in rows] == [CLASSES[i] for i in order] and [r["rank"] for r in rows] == [
        "1",
        "2",
        "3",
    ]
    np.testing.assert_allclose([float(r["probability"]) for r in rows], p[order].numpy(), atol=1e-5)
    capsys.readouterr()
    assert predict.main(common) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("source") and table[1].endswith(
        f"{CLASSES[order[0]]} ({p[order[0]]:.1%})  "
        + "  ".join(f"{CLASSES[i]} ({p[i]:.1%})" for i in order[1:])
    )
    assert predict.main([str(root / "img4.jpg"), "--model", model, "--tracking-uri", ""]) == 2
    assert "is loaded from an MLflow registry" in capsys.readouterr().err


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    """Before: a CheckpointError traceback."""
    assert predict.main([str(tmp_path), "--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"inception-predict: error: no checkpoint.pt in {tmp_path / 'nope'}: not a checkpoint directory\n"
    )
