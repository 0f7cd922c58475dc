"""``inception-serve`` of a registered ensemble, answered over real HTTP on 127.0.0.1 (slow).

One server for the module, opened with a bearer token and a 1 MB request limit, so that the
token check and the size limit are exercised on the real server too."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from ops import registry, serving
from ops.serving import served
from tests.ops.conftest import CLASSES, jpeg_bytes, synthetic_image

NAME = "served-inception"
START_TIMEOUT_S = 240  # model load + uvicorn start on a busy 2-core machine
TOKEN = "t0ken-for-the-serving-tests-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MARKER = "QZXJ"  # the junk is this, repeated: any echoed run of 7+ characters contains it
MAX_REPLY_BYTES = 700


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    cwd = os.getcwd()
    os.chdir(root)  # a sqlite store keeps artifacts under ./mlruns
    try:
        mv = registry.register_ensemble([str(c) for c in checkpoints[:2]], NAME, tracking_uri=uri, crops=10)
        assert registry.promote(NAME, mv.version, tracking_uri=uri).promoted
        with served(
            f"models:/{NAME}@champion",
            uri,
            log_path=root / "serve.log",
            start_timeout_s=START_TIMEOUT_S,
            extra_args=["--token-file", str(token_file), "--max-request-mb", "1"],
        ) as url:
            yield url, registry.load(f"models:/{NAME}@champion", tracking_uri=uri)
    finally:
        os.chdir(cwd)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post(url: str, path: str, **kwargs) -> requests.Response:
    return requests.post(f"{url}{path}", headers={**AUTH, **kwargs.pop("headers", {})}, timeout=120, **kwargs)


@pytest.mark.slow
def test_jpeg_request_gets_top5_classes(server):
    url, model = server
    images = [jpeg_bytes(synthetic_image(1, 3)), jpeg_bytes(synthetic_image(6, 1))]
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(i)] for i in images]}}
    resp = post(url, "/invocations", json=body)
    assert resp.status_code == 200, resp.text
    predictions = resp.json()["predictions"]
    local = model.predict(pd.DataFrame({"image": images}))
    assert len(predictions) == 2
    for got, want in zip(predictions, local.itertuples(), strict=True):
        assert len(got["classes"]) == 5 and set(got["classes"]) <= set(CLASSES)
        assert got["classes"] == want.classes and got["indices"] == want.indices
        np.testing.assert_allclose(got["probabilities"], want.probabilities, atol=1e-6)
    records = {"dataframe_records": [{"image": b64(images[0])}], "params": {"top_k": 3}}
    resp = post(url, "/invocations", json=records)
    assert resp.status_code == 200, resp.text
    assert resp.json()["predictions"][0]["classes"] == local.iloc[0]["classes"][:3]
    # the raw-bytes route (what `curl --data-binary @cat.jpg` sends) answers the same
    resp = post(url, "/predict?top_k=3", data=images[0], headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["predictions"][0]["classes"] == local.iloc[0]["classes"][:3]
    # top_k 0: every class, named, in class order
    resp = post(url, "/predict?top_k=0", data=images[1])
    (every,) = resp.json()["predictions"]
    assert every["classes"] == list(CLASSES) and every["indices"] == list(range(len(CLASSES)))
    assert abs(sum(every["probabilities"]) - 1) < 1e-4


@pytest.mark.slow
def test_bad_requests_get_clear_4xx(server):
    url, _ = server
    not_jpeg = {"dataframe_split": {"columns": ["image"], "data": [[b64(b"GIF89a but not really an image")]]}}
    resp = post(url, "/invocations", json=not_jpeg)
    assert (
        resp.status_code == 400
        and "row 0 of column 'image' is not a decodable image" in resp.json()["message"]
    )
    wrong_column = {
        "dataframe_split": {"columns": ["picture"], "data": [[b64(jpeg_bytes(synthetic_image(0, 0)))]]}
    }
    resp = post(url, "/invocations", json=wrong_column)
    assert resp.status_code == 400 and "'image'" in resp.json()["message"]
    resp = post(url, "/invocations", json={"dataframe_split": {"columns": ["image"], "data": []}})
    assert resp.status_code == 400 and resp.json()["message"] == "the request holds no images"
    resp = post(url, "/invocations", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["message"]


def junk(n: int = 100_000) -> str:
    return MARKER * (n // len(MARKER))


def junk_requests() -> dict[str, tuple[str, dict]]:
    """Each a request MLflow's scoring server answered with (part of) the request in its reply."""
    image = b64(jpeg_bytes(synthetic_image(2, 2)))
    as_json = {"headers": {"Content-Type": "application/json"}}
    return {
        "inputs is junk text": ("/invocations", {"json": {"inputs": junk()}}),
        "instances is junk text": ("/invocations", {"json": {"instances": junk()}}),
        "inputs image is junk": ("/invocations", {"json": {"inputs": {"image": [junk()]}}}),
        "params.top_k is junk": (
            "/invocations",
            {"json": {"dataframe_records": [{"image": image}], "params": {"top_k": junk()}}},
        ),
        "params.crops is junk": (
            "/invocations",
            {"json": {"dataframe_records": [{"image": image}], "params": {"crops": junk()}}},
        ),
        "malformed JSON": ("/invocations", {"data": '{"inputs": "' + junk(), **as_json}),
        "wrong column name": (
            "/invocations",
            {"json": {"dataframe_split": {"columns": [junk(200)], "data": [[junk()]]}}},
        ),
        "records with a junk key": ("/invocations", {"json": {"dataframe_records": [{junk(300): junk()}]}}),
        "CSV of junk": (
            "/invocations",
            {"data": "image\n" + junk(), "headers": {"Content-Type": "text/csv"}},
        ),
        "unknown content type": (
            "/invocations",
            {"data": junk(), "headers": {"Content-Type": "application/" + junk(60)}},
        ),
        "raw junk to /predict": ("/predict", {"data": junk()}),
        "junk query to /predict": ("/predict?top_k=" + junk(400), {"data": b"x"}),
        "unknown path": ("/" + junk(400), {"data": junk()}),
        "body over the limit": ("/invocations", {"json": {"inputs": junk(1_200_000)}}),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", list(junk_requests()))
def test_error_replies_never_carry_the_request(server, case):
    url, _ = server
    path, kwargs = junk_requests()[case]
    resp = post(url, path, **kwargs)
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    assert len(resp.content) <= MAX_REPLY_BYTES, (len(resp.content), resp.text[:300])
    assert MARKER not in resp.text
    reply = resp.json()
    assert set(reply) == {"error_code", "message"} and reply["message"]
    if case == "body over the limit":
        assert resp.status_code == 413 and "--max-request-mb" in reply["message"]


@pytest.mark.slow
def test_a_token_is_asked_for_everything_but_the_health_check(server):
    url, _ = server
    body = {"dataframe_records": [{"image": b64(jpeg_bytes(synthetic_image(1, 1)))}]}
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-the-same-size"}, {"Authorization": TOKEN}):
        resp = requests.post(f"{url}/invocations", json=body, headers=headers, timeout=60)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(resp.content)["error_code"] == "UNAUTHORIZED"
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200
    assert post(url, "/invocations", json=body).status_code == 200


def test_the_network_is_opened_only_with_a_token(tmp_path, capsys):
    assert serving.main(["--model", "models:/x@champion", "--host", "0.0.0.0"]) == 2
    assert "--token-file" in capsys.readouterr().err
    short = tmp_path / "token"
    short.write_text("abc\n")
    with pytest.raises(SystemExit, match="shorter than 16 characters"):
        serving.main(["--model", "models:/x@champion", "--host", "0.0.0.0", "--token-file", str(short)])
    assert serving.main(["--model", "models:/x@champion", "--max-request-mb", "0"]) == 2
    assert all(serving.is_loopback(h) for h in ("127.0.0.1", "::1", "localhost"))
    assert not serving.is_loopback("0.0.0.0") and not serving.is_loopback("10.1.2.3")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_the_readme_curl_line_runs_as_written(server, tmp_path):
    """The README's one-photo request, word for word but for the server's port and the token."""
    url, model = server
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("curl ") and "/predict" in ln]
    argv = [a.replace("http://127.0.0.1:5001", url) for a in shlex.split(line)]
    image = jpeg_bytes(synthetic_image(3, 4))
    (tmp_path / "cat.jpg").write_bytes(image)
    out = subprocess.run(
        [*argv, "-H", f"Authorization: Bearer {TOKEN}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (got,) = json.loads(out.stdout)["predictions"]
    top_k = int(re.search(r"top_k=(\d+)", line).group(1))
    want = model.predict(pd.DataFrame({"image": [image]}), params={"top_k": top_k}).iloc[0]
    assert got["classes"] == want["classes"] and len(got["classes"]) == top_k
