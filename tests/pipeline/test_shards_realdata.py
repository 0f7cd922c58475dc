"""build-shards on real data (REAL_DATA_DIR): the 1000 ImageNet sample images and CIFAR-10."""

from __future__ import annotations

import csv
import io
import tarfile

import pytest
from PIL import Image

from pipeline.shards import build_shards, verify_shards
from pipeline.shards.cli import build_main
from tests.pipeline.test_shards_build import read_back

pytestmark = pytest.mark.realdata


def imagenet_labels(real_data_dir) -> dict[str, dict]:
    with tarfile.open(real_data_dir / "imagenet-sample-images.tar") as tf:
        text = tf.extractfile("./labels.csv").read().decode()
    return {row["file"]: row for row in csv.DictReader(io.StringIO(text))}


def test_imagenet_sample_images(real_data_dir, tmp_path):
    out = tmp_path / "out"
    rc = build_main([
        str(real_data_dir / "imagenet-sample-images.tar"), str(out), "--split", "val",
        "--labels", "labels.csv", "--classes", str(real_data_dir / "imagenet_synset_words.txt"),
        "--shard-size", "250", "--workers", "2", "--no-progress",
    ])
    assert rc == 0
    report = verify_shards(out, deep=True, progress=False)
    assert report.ok, report.summary()
    from pipeline.schema import load_manifest

    manifest = load_manifest(out)
    assert manifest.num_classes == 1000
    assert manifest.classes[0].name == "n01440764" and manifest.classes[0].description == "tench, Tinca tinca"
    info = manifest.split("val")
    assert info.num_samples == 1000 and [s.count for s in info.shards] == [250] * 4 and info.skipped == ()
    # the 23 grayscale images; n02951585_can_opener.JPEG carries EXIF orientation 6 (two others carry
    # the meaningless 0 and pass through)
    assert info.params["actions"] == {"converted": 23, "oriented": 1, "passthrough": 976}
    labels = imagenet_labels(real_data_dir)
    got = read_back(out, "val")
    assert sorted(g["lbl"] for g in got.values()) == list(range(1000))
    with tarfile.open(real_data_dir / "imagenet-sample-images.tar") as tf:
        for g in got.values():
            row = labels[g["json"]["source"]]
            assert g["lbl"] == int(row["index_1000"]) and g["json"]["class"] == row["synset"]
            original = tf.extractfile("./" + row["file"]).read()
            if row["file"] == "n02951585_can_opener.JPEG":  # 392x294 stored, 294x392 upright
                assert Image.open(io.BytesIO(g["jpg"])).size == (294, 392)
            elif Image.open(io.BytesIO(original)).mode == "RGB":
                assert g["jpg"] == original
            else:
                assert Image.open(io.BytesIO(g["jpg"])).mode == "RGB"


def test_imagenet_sample_images_auto_labels_match_explicit(real_data_dir, tmp_path):
    """Without --labels, the labels.csv at the archive root is found; sorted synsets = index_1000 order."""
    manifest = build_shards(real_data_dir / "imagenet-sample-images.tar", tmp_path / "out", "val",
                            progress=False, shard_size=1000)
    assert manifest.split("val").params["format"] == "imagenet-val"
    got = read_back(tmp_path / "out", "val")
    labels = imagenet_labels(real_data_dir)
    assert all(g["lbl"] == int(labels[g["json"]["source"]]["index_1000"]) for g in got.values())


@pytest.mark.slow  # ~6 s alone, ~17 s on the shared 2-core machine
def test_cifar10_test_split(real_data_dir, tmp_path):
    out = tmp_path / "out"
    manifest = build_shards(real_data_dir / "cifar10-jpg.tar.gz", out, "val", subdir="test", shard_size=2500,
                            progress=False)
    assert [c.name for c in manifest.classes] == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    info = manifest.split("val")
    assert info.num_samples == 10000 and [s.count for s in info.shards] == [2500] * 4
    report = verify_shards(out, progress=False)
    assert report.ok and sorted(report.splits["val"].class_counts.values()) == [1000] * 10


@pytest.mark.slow
def test_cifar10_train_and_test_in_one_folder(real_data_dir, tmp_path):
    out = tmp_path / "out"
    src = real_data_dir / "cifar10-jpg.tar.gz"
    build_shards(src, out, "train", subdir="train", workers=2, progress=False)
    manifest = build_shards(src, out, "val", subdir="test", workers=2, progress=False)
    assert manifest.split("train").num_samples == 50000 and manifest.split("val").num_samples == 10000
    assert verify_shards(out, progress=False).ok
