"""build_shards on synthetic inputs: contents, skipped files, determinism, resume, errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipeline.schema import load_manifest, split_files
from pipeline.shards import SourceError, build_shards
from tests.pipeline.test_shards_data import (
    CLASSES,
    all_files,
    bad_files,
    good_files,
    jpeg_bytes,
    write_folder,
    write_tar,
    write_tar_of_tars,
    write_tgz,
)

WDS2IDX = Path(sys.executable).with_name("wds2idx")


def read_back(out: Path, split: str) -> dict[str, dict]:
    """Every sample of the split through webdataset: key -> decoded components."""
    tars, _ = split_files(out, split)
    got = {}
    for sample in wds.WebDataset(tars, shardshuffle=False):
        assert sample["__key__"] not in got
        got[sample["__key__"]] = {
            "jpg": sample["jpg"], "cls": int(sample["cls"]), "lbl": int.from_bytes(sample["lbl"], "little"),
            "json": json.loads(sample["json"]),
        }
    return got


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def src(tmp_path):
    return write_folder(tmp_path / "src", all_files())


def test_imagefolder_contents_and_skips(src, tmp_path):
    out = tmp_path / "out"
    manifest = build_shards(src, out, "train", shard_size=5, progress=False)
    info = manifest.split("train")
    good, bad = good_files(), bad_files()
    assert info.num_samples == len(good)
    assert [s.count for s in info.shards] == [5, 5, 5, 2]
    assert {s["source"]: s["reason"].split(":")[0] for s in info.skipped} == {
        k: reason for k, (_, reason) in bad.items()}
    assert info.params["actions"] == {"converted": 3, "passthrough": len(good) - 3}
    assert [(c.index, c.name) for c in manifest.classes] == list(enumerate(CLASSES))
    got = read_back(out, "train")
    assert {g["json"]["source"] for g in got.values()} == set(good)
    for g in got.values():
        source = g["json"]["source"]
        assert g["cls"] == g["lbl"] == CLASSES.index(source.split("/")[0]) == g["json"]["label"]
        img = Image.open(io.BytesIO(g["jpg"]))
        assert (img.format, img.mode) == ("JPEG", "RGB")
        if source.endswith(("_gray.jpg", "_cmyk.jpg", "_png.JPEG")):
            assert g["jpg"] != good[source]  # converted to RGB JPEG
        else:
            assert g["jpg"] == good[source]  # original bytes pass through, progressive included
        assert (g["json"]["width"], g["json"]["height"]) == img.size
    # shuffled: the written order is not the sorted source order
    order = [g["json"]["source"] for g in got.values()]
    assert order != sorted(order)


def test_index_equals_dali_wds2idx(src, tmp_path):
    if not WDS2IDX.exists():
        pytest.skip("wds2idx not installed beside this python")
    out = tmp_path / "out"
    build_shards(src, out, "train", shard_size=7, progress=False)
    tars, idxs = split_files(out, "train")
    for tar, idx in zip(tars, idxs, strict=True):
        ref = tmp_path / "ref.idx"
        subprocess.run([str(WDS2IDX), tar, str(ref)], check=True, capture_output=True)
        assert ref.read_bytes() == Path(idx).read_bytes()


@pytest.mark.parametrize("kind", ["tar", "tar_of_tars", "tgz"])
def test_archives_give_same_shards_as_folder(src, tmp_path, kind):
    files = all_files()
    archive = {"tar": lambda: write_tar(tmp_path / "a.tar", files),
               "tar_of_tars": lambda: write_tar_of_tars(tmp_path / "a.tar", files),
               "tgz": lambda: write_tgz(tmp_path / "a.tgz", files)}[kind]()
    build_shards(src, tmp_path / "from_folder", "train", shard_size=6, progress=False)
    build_shards(archive, tmp_path / "from_tar", "train", shard_size=6, progress=False)
    a, b = folder_bytes(tmp_path / "from_folder"), folder_bytes(tmp_path / "from_tar")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith((".tar", ".idx")):
            assert a[name] == b[name], name


def test_deterministic_across_runs_and_workers(src, tmp_path):
    build_shards(src, tmp_path / "w1", "train", shard_size=4, seed=7, workers=1, progress=False)
    build_shards(src, tmp_path / "w2", "train", shard_size=4, seed=7, workers=2, progress=False)
    build_shards(src, tmp_path / "again", "train", shard_size=4, seed=7, workers=1, progress=False)
    one = folder_bytes(tmp_path / "w1")
    assert one == folder_bytes(tmp_path / "w2") == folder_bytes(tmp_path / "again")
    build_shards(src, tmp_path / "seed8", "train", shard_size=4, seed=8, progress=False)
    assert folder_bytes(tmp_path / "seed8")["train-000000.tar"] != one["train-000000.tar"]


def test_max_shard_bytes_and_resize(src, tmp_path):
    out = tmp_path / "out"
    manifest = build_shards(src, out, "train", max_shard_bytes=64 * 1024, max_side=32, progress=False)
    info = manifest.split("train")
    assert all(s.bytes <= 64 * 1024 for s in info.shards) and len(info.shards) > 1
    assert info.num_samples == len(good_files())
    for g in read_back(out, "train").values():
        assert max(Image.open(io.BytesIO(g["jpg"])).size) == 32  # every source is larger than 32
    assert info.params["actions"] == {"resized": len(good_files())}


def test_resume_after_interruption_keeps_finished_shards(src, tmp_path):
    reference = tmp_path / "ref"
    build_shards(src, reference, "train", shard_size=3, progress=False)
    out = tmp_path / "out"

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record.shard == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_shards(src, out, "train", shard_size=3, progress=False, on_shard_written=stop_after_two)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    first_mtime = (out / "train-000000.tar").stat().st_mtime_ns
    written = []
    build_shards(src, out, "train", shard_size=3, progress=False, on_shard_written=written.append)
    assert [r.shard for r in written] == [2, 3, 4, 5]  # shards 0 and 1 were kept
    assert (out / "train-000000.tar").stat().st_mtime_ns == first_mtime
    assert folder_bytes(out) == folder_bytes(reference)

    # damage one finished shard and delete another's index: only those two are rebuilt
    data = bytearray((out / "train-000002.tar").read_bytes())
    data[1000] ^= 0xFF
    (out / "train-000002.tar").write_bytes(bytes(data))
    (out / "train-000004.idx").unlink()
    written.clear()
    build_shards(src, out, "train", shard_size=3, progress=False, on_shard_written=written.append)
    assert [r.shard for r in written] == [2, 4]
    assert folder_bytes(out) == folder_bytes(reference)

    # other options = another plan: the split is rebuilt from scratch, stale shards removed
    manifest = build_shards(src, out, "train", shard_size=100, progress=False)
    assert [s.tar for s in manifest.split("train").shards] == ["train-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]


def test_two_splits_share_one_manifest(src, tmp_path):
    out = tmp_path / "out"
    build_shards(src, out, "train", progress=False)
    val = write_folder(tmp_path / "val", {f"{c}/v.jpg": jpeg_bytes(i) for i, c in enumerate(CLASSES)})
    build_shards(val, out, "val", progress=False)
    manifest = load_manifest(out)
    assert sorted(manifest.splits) == ["train", "val"]
    assert manifest.split("val").num_samples == 3
    assert manifest.split("train").num_samples == len(good_files())
    # a val split whose classes disagree with the folder's manifest is refused before any work
    other = write_folder(tmp_path / "other", {"cat/x.jpg": jpeg_bytes(1), "zebra/y.jpg": jpeg_bytes(2)})
    with pytest.raises(SourceError, match="disagrees with the manifest"):
        build_shards(other, out, "val", progress=False)
    assert load_manifest(out).split("val").num_samples == 3


def test_numeric_val_labels_use_manifest_classes(src, tmp_path):
    out = tmp_path / "out"
    build_shards(src, out, "train", progress=False)
    val = write_folder(tmp_path / "val", {f"v{i}.jpg": jpeg_bytes(i) for i in (1, 2, 3)})
    (val / "val.txt").write_text("v1.jpg 2\nv2.jpg 0\nv3.jpg 1\n")
    manifest = build_shards(val, out, "val", format="imagenet-val", progress=False)
    got = {g["json"]["source"]: (g["lbl"], g["json"]["class"]) for g in read_back(out, "val").values()}
    assert got == {"v1.jpg": (2, "eel"), "v2.jpg": (0, "cat"), "v3.jpg": (1, "dog")}
    assert manifest.split("val").skipped == ()


def test_foreign_files_and_bad_options_fail_before_work(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SourceError, match=r"holds files build-shards did not write \(notes.txt\)"):
        build_shards(src, out, "train", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(SourceError, match="is inside the source folder"):
        build_shards(src, src / "shards", progress=False)
    with pytest.raises(SourceError, match="--shard-size must be >= 1"):
        build_shards(src, tmp_path / "o2", shard_size=0, progress=False)
    with pytest.raises(SourceError, match="either --max-side or --shorter-side"):
        build_shards(src, tmp_path / "o2", max_side=64, shorter_side=64, progress=False)
    with pytest.raises(SourceError, match="--split"):
        build_shards(src, tmp_path / "o2", split="tr-ain", progress=False)
    assert not (tmp_path / "o2").exists()


def test_tar_links_and_names_leaving_the_archive_are_listed_as_skipped(tmp_path):
    """Before, tar members that are links, or whose names hold '..', vanished without a word (a
    '..' member was even read as an image of a class named '..')."""
    import tarfile

    def jpeg(shade: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (shade, 100, 50)).save(buf, format="JPEG")
        return buf.getvalue()

    def add(tar, name, data=b"", kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)

    source = tmp_path / "src.tar"
    with tarfile.open(source, "w") as tar:
        add(tar, "cat/a.jpg", jpeg(10))
        add(tar, "dog/b.jpg", jpeg(200))
        add(tar, "dog/c.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add(tar, "cat/d.jpg", kind=tarfile.LNKTYPE, link="cat/a.jpg")
        add(tar, "cat/../../e.jpg", jpeg(90))
    manifest = build_shards(source, tmp_path / "out", "train", progress=False)
    info = manifest.split("train")
    assert info.num_samples == 2 and [c.name for c in manifest.classes] == ["cat", "dog"]
    assert {s["source"]: s["reason"] for s in info.skipped} == {
        "cat/../../e.jpg": "tar member name leaves the archive ('..'); not read",
        "cat/d.jpg": "tar member is a hard link, not a file; not read",
        "dog/c.jpg": "tar member is a symbolic link, not a file; not read",
    }
