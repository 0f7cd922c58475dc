"""``build-shards`` stays inside its input and reads labels as the user meant them: list rows and
links that resolve outside the list's (or the root's) folder are refused and listed as skipped
unless ``--allow-outside ROOT``; the label kind of a list is explicit or agreed by every row; a
split added to a folder maps its labels through the class table already there."""

from __future__ import annotations

import os

import pytest

from pipeline.schema import load_manifest
from pipeline.shards import SourceError, build_shards
from pipeline.shards.cli import build_main
from tests.pipeline.test_shards_data import jpeg_bytes, write_folder


def _labels(out, split="train") -> dict[str, str]:
    """source -> class name of every sample written."""
    import json
    import tarfile

    from pipeline.schema import split_files

    got = {}
    for tar in split_files(out, split)[0]:
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    got[meta["source"]] = meta["class"]
    return got


def test_list_rows_outside_the_lists_folder_are_refused_and_listed(tmp_path):
    """Before: ``../outside.jpg`` and an absolute path were read and packed, and ``/etc/passwd`` was
    opened (then skipped as not an image)."""
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(9))
    outside = tmp_path / "elsewhere" / "other.jpg"
    outside.parent.mkdir()
    outside.write_bytes(jpeg_bytes(8))
    data = write_folder(tmp_path / "data", {"a.jpg": jpeg_bytes(1), "b.jpg": jpeg_bytes(2)})
    (data / "list.csv").write_text(f"a.jpg,0\nb.jpg,1\n../outside.jpg,1\n{outside},0\n/etc/passwd,0\n")
    manifest = build_shards(data / "list.csv", tmp_path / "out", progress=False)
    assert sorted(_labels(tmp_path / "out")) == ["a.jpg", "b.jpg"]
    skipped = {s["source"]: s["reason"] for s in manifest.split("train").skipped}
    assert sorted(skipped) == sorted(["../outside.jpg", str(outside), "/etc/passwd"])
    assert all(r.startswith(f"outside {data.resolve()}") and "--allow-outside" in r for r in skipped.values())
    # the user's explicit way round, for files under a root they name
    manifest = build_shards(
        data / "list.csv", tmp_path / "out2", progress=False, allow_outside=[str(tmp_path)]
    )
    packed = ["a.jpg", "b.jpg", str((tmp_path / "outside.jpg").resolve()), str(outside.resolve())]
    assert sorted(_labels(tmp_path / "out2")) == sorted(packed)
    assert [s["source"] for s in manifest.split("train").skipped] == ["/etc/passwd"]


def test_folder_links_that_leave_the_root_are_listed_not_followed(tmp_path):
    """Before: a file link to an image outside the root was packed, and a linked class folder
    outside it was dropped without a word."""
    elsewhere = write_folder(tmp_path / "elsewhere", {"x.jpg": jpeg_bytes(7), "eel/y.jpg": jpeg_bytes(8)})
    root = write_folder(tmp_path / "root", {"cat/a.jpg": jpeg_bytes(1), "dog/b.jpg": jpeg_bytes(2)})
    os.symlink(elsewhere / "x.jpg", root / "cat" / "linked.jpg")
    os.symlink(elsewhere / "eel", root / "eel")
    os.symlink(root / "cat" / "a.jpg", root / "dog" / "inside.jpg")  # inside the root: followed
    with pytest.raises(SourceError, match=r"1 class\(es\) have no images: eel"):
        build_shards(root, tmp_path / "out", progress=False)
    manifest = build_shards(root, tmp_path / "out", progress=False, allow_empty_classes=True)
    assert sorted(_labels(tmp_path / "out")) == ["cat/a.jpg", "dog/b.jpg", "dog/inside.jpg"]
    skipped = {s["source"]: s["reason"] for s in manifest.split("train").skipped}
    assert sorted(skipped) == ["cat/linked.jpg", "eel"]
    assert all("outside" in r and "--allow-outside" in r for r in skipped.values())
    build_shards(root, tmp_path / "out2", progress=False, allow_outside=[str(elsewhere)])
    assert sorted(_labels(tmp_path / "out2")) == [
        "cat/a.jpg",
        "cat/linked.jpg",
        "dog/b.jpg",
        "dog/inside.jpg",
        "eel/y.jpg",
    ]


@pytest.mark.parametrize(
    ("rows", "odd"),
    [
        ("a.jpg,0\nb.jpg,1\nc.jpg,2\nd.jpg,-1\n", "line 4: '-1'"),  # before: classes -1,0,1,2 (all shifted)
        ("a.jpg,0\nb.jpg,7a\nc.jpg,1\nd.jpg,2\n", "line 2: '7a'"),  # before: classes sorted as text
    ],
)
def test_a_list_that_mixes_label_kinds_is_an_error_naming_the_first_odd_row(tmp_path, rows, odd):
    data = write_folder(tmp_path / "data", {f"{c}.jpg": jpeg_bytes(i) for i, c in enumerate("abcd")})
    (data / "list.csv").write_text(rows)
    with pytest.raises(SourceError, match=rf"list\.csv: {odd} is not a class index"):
        build_shards(data / "list.csv", tmp_path / "out", progress=False)
    # the explicit kind reads every label as a class name
    build_shards(data / "list.csv", tmp_path / "out", progress=False, labels_are="name")
    assert len(load_manifest(tmp_path / "out").classes) == 4


def test_labels_are_index_refuses_names_and_the_cli_says_so(tmp_path, capsys):
    data = write_folder(tmp_path / "data", {"a.jpg": jpeg_bytes(1), "b.jpg": jpeg_bytes(2)})
    (data / "list.csv").write_text("a.jpg,cat\nb.jpg,dog\n")
    assert (
        build_main([str(data / "list.csv"), str(tmp_path / "out"), "--labels-are", "index", "--no-progress"])
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "list.csv: line 1: 'cat' is not a class index" in err


def test_a_split_added_to_a_folder_uses_its_class_table(tmp_path):
    """Train from names (a class per name), then val from a list naming only some of them, and a
    list of indices: both map through the manifest's table (before: val's own sorted subset was
    refused, and index lists ignored the names)."""
    data = write_folder(tmp_path / "data", {f"{c}.jpg": jpeg_bytes(i) for i, c in enumerate("abcdef")})
    (data / "train.csv").write_text("a.jpg,cat\nb.jpg,dog\nc.jpg,eel\nd.jpg,fox\n")
    (data / "val.csv").write_text("e.jpg,fox\nf.jpg,dog\n")
    out = tmp_path / "out"
    build_shards(data / "train.csv", out, "train", progress=False)
    build_shards(data / "val.csv", out, "val", progress=False, allow_empty_classes=True)
    assert _labels(out, "val") == {"e.jpg": "fox", "f.jpg": "dog"}
    assert [c.name for c in load_manifest(out).classes] == ["cat", "dog", "eel", "fox"]
