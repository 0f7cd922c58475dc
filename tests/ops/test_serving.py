"""``mlflow models serve`` of a registered ensemble, answered over real HTTP on 127.0.0.1 (slow)."""

from __future__ import annotations

import base64
import os

import numpy as np
import pandas as pd
import pytest
import requests

from ops import registry
from ops.serving import served
from tests.ops.conftest import CLASSES, jpeg_bytes, synthetic_image

NAME = "served-inception"
START_TIMEOUT_S = 240  # model load + uvicorn start on a busy 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)  # a sqlite store keeps artifacts under ./mlruns
    try:
        mv = registry.register_ensemble([str(c) for c in checkpoints[:2]], NAME, tracking_uri=uri, crops=10)
        assert registry.promote(NAME, mv.version, tracking_uri=uri).promoted
        with served(
            f"models:/{NAME}@champion", uri, log_path=root / "serve.log", start_timeout_s=START_TIMEOUT_S
        ) as url:
            yield url, registry.load(f"models:/{NAME}@champion", tracking_uri=uri)
    finally:
        os.chdir(cwd)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.mark.slow
def test_jpeg_request_gets_top5_classes(server):
    url, model = server
    images = [jpeg_bytes(synthetic_image(1, 3)), jpeg_bytes(synthetic_image(6, 1))]
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(i)] for i in images]}}
    resp = requests.post(f"{url}/invocations", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    predictions = resp.json()["predictions"]
    local = model.predict(pd.DataFrame({"image": images}))
    assert len(predictions) == 2
    for got, want in zip(predictions, local.itertuples(), strict=True):
        assert len(got["classes"]) == 5 and set(got["classes"]) <= set(CLASSES)
        assert got["classes"] == want.classes and got["indices"] == want.indices
        np.testing.assert_allclose(got["probabilities"], want.probabilities, atol=1e-6)
    records = {"dataframe_records": [{"image": b64(images[0])}], "params": {"top_k": 3}}
    resp = requests.post(f"{url}/invocations", json=records, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["predictions"][0]["classes"] == local.iloc[0]["classes"][:3]


@pytest.mark.slow
def test_bad_requests_get_clear_4xx(server):
    url, _ = server
    not_jpeg = {"dataframe_split": {"columns": ["image"], "data": [[b64(b"GIF89a but not really an image")]]}}
    resp = requests.post(f"{url}/invocations", json=not_jpeg, timeout=60)
    assert (
        resp.status_code == 400
        and "row 0 of column 'image' is not a decodable image" in resp.json()["message"]
    )
    wrong_column = {
        "dataframe_split": {"columns": ["picture"], "data": [[b64(jpeg_bytes(synthetic_image(0, 0)))]]}
    }
    resp = requests.post(f"{url}/invocations", json=wrong_column, timeout=60)
    assert resp.status_code == 400 and "image" in resp.json()["message"]
