"""Synthetic inputs for the build-shards tests (made with Pillow in tmp_path) + discovery tests.

The helpers here are imported by the other ``test_shards_*`` modules.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.shards import SourceError
from pipeline.shards.archives import open_collection
from pipeline.shards.sources import discover, make_keys

CLASSES = ("cat", "dog", "eel")


def jpeg_bytes(seed: int, size=(64, 48), mode="RGB", progressive=False, fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=85, progressive=progressive)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def good_files() -> dict[str, bytes]:
    """``relpath -> bytes`` of decodable images: 3 classes, 4 images each, every special case once."""
    files = {}
    for c, cls in enumerate(CLASSES):
        for i in range(4):
            files[f"{cls}/{cls}_{i:03d}.jpg"] = jpeg_bytes(10 * c + i)
    files["cat/cat_gray.jpg"] = jpeg_bytes(100, mode="L")
    files["dog/dog_cmyk.jpg"] = jpeg_bytes(101, mode="CMYK")
    files["eel/eel_png.JPEG"] = jpeg_bytes(102, fmt="PNG")  # PNG disguised as JPEG
    files["eel/eel_progressive.jpg"] = jpeg_bytes(103, progressive=True)
    files["dog/dog_big.jpg"] = jpeg_bytes(104, size=(400, 300))
    return files


def bad_files() -> dict[str, tuple[bytes, str]]:
    """``relpath -> (bytes, expected reason prefix)`` of files that must be skipped."""
    full = jpeg_bytes(200, size=(200, 150))
    return {
        "cat/cat_truncated.jpg": (full[: len(full) // 2], "undecodable"),
        "dog/dog_empty.jpg": (b"", "zero-byte file"),
        "eel/eel_garbage.jpg": (b"this is not an image at all" * 10, "not an image"),
    }


def all_files() -> dict[str, bytes]:
    files = good_files()
    files.update({k: v for k, (v, _) in bad_files().items()})
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, files: dict[str, bytes], prefix: str = "./") -> Path:
    with tarfile.open(path, "w") as tf:
        for rel, data in files.items():
            _add(tf, prefix + rel, data)
    return path


def write_tar_of_tars(path: Path, files: dict[str, bytes]) -> Path:
    """``ILSVRC2012_img_train.tar`` layout: one ``<class>.tar`` per class holding flat files."""
    by_class: dict[str, dict[str, bytes]] = {}
    for rel, data in files.items():
        cls, name = rel.split("/", 1)
        by_class.setdefault(cls, {})[name] = data
    with tarfile.open(path, "w") as outer:
        for cls, members in sorted(by_class.items()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name, data in members.items():
                    _add(inner, name, data)
            _add(outer, f"{cls}.tar", buf.getvalue())
    return path


def write_tgz(path: Path, files: dict[str, bytes]) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for rel, data in files.items():
            _add(tf, rel, data)
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return path


# ----------------------------------------------------------------------------- discovery tests


@pytest.mark.parametrize("kind", ["folder", "tar", "tar_of_tars", "tgz"])
def test_collections_expose_same_files_and_bytes(tmp_path, kind):
    files = all_files()
    maker = {
        "folder": lambda: write_folder(tmp_path / "src", files),
        "tar": lambda: write_tar(tmp_path / "src.tar", files),
        "tar_of_tars": lambda: write_tar_of_tars(tmp_path / "src.tar", files),
        "tgz": lambda: write_tgz(tmp_path / "src.tar.gz", files),
    }[kind]
    with open_collection(maker()) as coll:
        assert sorted(coll.files) == sorted(files)
        for rel, data in files.items():
            assert coll.read(rel) == data, rel


def test_imagefolder_classes_sorted_and_counts(tmp_path):
    files = all_files()
    disc = discover(write_folder(tmp_path / "src", files))
    assert disc.format == "imagefolder"
    assert [c.name for c in disc.classes] == list(CLASSES)
    assert [it.source for it in disc.items] == sorted(files)
    by_label = {c: sum(1 for it in disc.items if it.label == i) for i, c in enumerate(CLASSES)}
    assert by_label == {c: sum(1 for f in files if f.startswith(c + "/")) for c in CLASSES}


def test_classes_file_order_and_words(tmp_path):
    src = write_folder(tmp_path / "src", good_files())
    (tmp_path / "classes.txt").write_text("eel\ncat an animal\ndog\n")
    (tmp_path / "words.txt").write_text("dog a good boy\neel slippery, long\n")
    disc = discover(src, classes_file=tmp_path / "classes.txt", words_file=tmp_path / "words.txt")
    assert [(c.index, c.name, c.description) for c in disc.classes] == [
        (0, "eel", "slippery, long"), (1, "cat", "an animal"), (2, "dog", "a good boy")]
    assert {it.source: it.label for it in disc.items}["eel/eel_png.JPEG"] == 0


def test_keys_unique_dot_free():
    assert make_keys(["a/x.jpg", "b/y.jpg"]) == ["x", "y"]
    assert make_keys(["a/x.jpg", "b/x.jpg"]) == ["a_x", "b_x"]
    assert make_keys(["a/x.y.jpg"]) == ["x_y"]


@pytest.mark.parametrize("text", [
    "path,label\n{a},dog\n{b},cat\n",
    "{a}\tdog\n{b}\tcat\n",
    "{a} 1\n{b} 0\n",
])
def test_csv_list_forms(tmp_path, text):
    write_folder(tmp_path, {"img/a.jpg": jpeg_bytes(1), "img/b.jpg": jpeg_bytes(2)})
    lst = tmp_path / "list.csv"
    lst.write_text(text.format(a="img/a.jpg", b="img/b.jpg"))
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    disc = discover(lst, classes_file=classes)
    assert [(it.source, it.label) for it in disc.items] == [("img/a.jpg", 1), ("img/b.jpg", 0)]


def test_imagenet_val_loc_solution(tmp_path):
    flat = {"ILSVRC2012_val_00000001.JPEG": jpeg_bytes(1), "ILSVRC2012_val_00000002.JPEG": jpeg_bytes(2)}
    src = write_folder(tmp_path / "val", flat)
    (src / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n02 1 2 3 4 n02 5 6 7 8\n"
        "ILSVRC2012_val_00000001,n01 1 2 3 4\n")
    disc = discover(src, "imagenet-val")
    assert [c.name for c in disc.classes] == ["n01", "n02"]
    assert [(it.source, it.label) for it in disc.items] == [
        ("ILSVRC2012_val_00000001.JPEG", 0), ("ILSVRC2012_val_00000002.JPEG", 1)]


def test_errors_before_any_work(tmp_path):
    src = write_folder(tmp_path / "src", good_files())
    (src / "empty_class").mkdir()
    with pytest.raises(SourceError, match="no images: empty_class"):
        discover(src)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(SourceError, match="not in --classes: eel"):
        discover(src, classes_file=tmp_path / "classes.txt")
    lst = tmp_path / "list.csv"
    lst.write_text("src/cat/cat_000.jpg,cat\nsrc/cat/missing.jpg,cat\n")
    with pytest.raises(SourceError, match=r"1 row\(s\) point to missing files: line 2: src/cat/missing.jpg"):
        discover(lst)
    lst.write_text("src/cat/cat_000.jpg,lion\n")
    with pytest.raises(SourceError, match="not in the class list"):
        discover(lst, classes_file=tmp_path / "classes.txt")


def test_format_checks(tmp_path):
    src = write_folder(tmp_path / "src", good_files())
    with pytest.raises(SourceError, match="--format tar needs a .tar/.tar.gz/.tgz archive"):
        discover(src, "tar")
    with pytest.raises(SourceError, match="unknown --format 'zip'"):
        discover(src, "zip")
    archive = write_tar(tmp_path / "a.tar", good_files())
    assert discover(archive, "tar").format == "imagefolder"
    with pytest.raises(SourceError, match="has no files under --subdir nope"):
        discover(archive, subdir="nope")
    with pytest.raises(SourceError, match="flat set of files without a labels file"):
        discover(archive, subdir="cat")
