"""Tar bytes and tar listing: our header writer equals tarfile's, our scanner equals tarfile's."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.shards import tarscan
from pipeline.shards.writer import Sample, ustar_header, write_shard


@pytest.mark.parametrize("name,size", [("a.jpg", 0), ("n01440764_10026.jpg", 123456), ("x" * 100, 8**11 - 1)])
def test_header_equals_tarfile(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    assert ustar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")


def test_header_rejects_long_names():
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        ustar_header("y" * 101, 1)


def test_written_shard_reads_with_tarfile(tmp_path):
    samples = [Sample(f"k{i}", bytes([i]) * (100 * i + 1), i, {"label": i}) for i in range(5)]
    shard = write_shard(tmp_path / "s.tar", tmp_path / "s.idx", samples)
    assert shard.bytes % 10240 == 0 and shard.count == 5
    with tarfile.open(tmp_path / "s.tar") as tf:
        members = tf.getmembers()
        assert [m.name for m in members][:4] == ["k0.jpg", "k0.cls", "k0.lbl", "k0.json"]
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)
        assert tf.extractfile("k3.jpg").read() == bytes([3]) * 301
    assert (tmp_path / "s.idx").read_text().splitlines()[0] == "v1.2 5"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scan_equals_tarfile(fmt):
    names = ["a.jpg", "dir/", "dir/b.JPEG", "d" * 60 + "/" + "e" * 60 + ".jpg", "ünï/çødé.jpg"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("long/" + "f" * 150 + ".jpg")  # GNU 'L' record / pax path record
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = 700 * i + 3
                tf.addfile(info, io.BytesIO(b"z" * info.size))
    raw = io.BytesIO(b"PREFIX" * 100 + buf.getvalue())  # an inner tar at offset 600 of a file
    raw.fileno = lambda: (_ for _ in ()).throw(OSError)  # scan must not need fileno when size is given
    fast = tarscan.scan(raw, 600, len(buf.getvalue()))
    slow = tarscan.scan_with_tarfile(raw, 600, len(buf.getvalue()))
    assert fast == slow
    assert [n for n, *_ in fast] == [n.rstrip("/") for n in names]


def test_scan_rejects_bad_checksum_so_tarfile_decides():
    buf = bytearray(ustar_header("a.jpg", 1) + b"x" + b"\0" * 511 + b"\0" * 1024)
    buf[10] = ord("Q")
    with pytest.raises(tarscan.UnsupportedTar):
        tarscan.scan(io.BytesIO(bytes(buf)), 0, len(buf))
