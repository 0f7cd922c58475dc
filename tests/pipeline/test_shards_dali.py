"""The shards as DALI reads them: ``fn.readers.webdataset`` on CPU with our index files.

Every kept sample must come back with the same key, image bytes and label (``lbl`` as INT32 with
``dtypes``, no Python callback). DALI is imported only here, never by ``pipeline.shards``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.schema import split_files
from pipeline.shards import build_shards
from tests.pipeline.test_shards_build import read_back
from tests.pipeline.test_shards_data import all_files, write_folder

dali = pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402


def dali_read_all(tars: list[str], idxs: list[str], n: int) -> list[dict]:
    @pipeline_def(batch_size=n, num_threads=1, device_id=None)  # None: CPU-only (docs/architecture.md)
    def pipe():
        jpg, cls, lbl, meta = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "cls", "lbl", "json"],
            dtypes=[types.UINT8, types.UINT8, types.INT32, types.UINT8],
            missing_component_behavior="error", name="Reader",
        )
        return jpg, cls, lbl, meta

    p = pipe()
    p.build()
    assert p.epoch_size("Reader") == n
    jpg, cls, lbl, meta = p.run()
    out = []
    for i in range(n):
        out.append({
            "jpg": np.array(jpg[i]).tobytes(), "cls": int(np.array(cls[i]).tobytes()),
            "lbl": np.array(lbl[i]), "json": json.loads(np.array(meta[i]).tobytes()),
            "source_info": jpg[i].source_info(),
        })
    return out


def test_dali_reads_every_sample_with_our_index(tmp_path):
    out = tmp_path / "out"
    src = write_folder(tmp_path / "src", all_files())
    manifest = build_shards(src, out, "train", shard_size=5, progress=False)
    n = manifest.split("train").num_samples
    tars, idxs = split_files(out, "train")
    got = dali_read_all(tars, idxs, n)
    expected = read_back(out, "train")  # through webdataset, in file order
    assert [g["json"]["key"] for g in got] == list(expected)
    for g in got:
        key = g["json"]["key"]
        exp = expected[key]
        assert key in g["source_info"]
        assert g["jpg"] == exp["jpg"]
        assert g["lbl"].dtype == np.int32 and g["lbl"].shape == (1,)
        assert int(g["lbl"][0]) == g["cls"] == exp["lbl"] == exp["json"]["label"]
