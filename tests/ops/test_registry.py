"""ops.registry on a real sqlite MLflow store: register (from a checkpoint dir and from a run's
artifacts), aliases, load by ``models:/NAME@alias``, predict against a hand computation, the
promotion gate, and the ``inception-registry`` CLI."""

from __future__ import annotations

import io
import json
import os
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ops import registry, registry_cli
from ops.ensemble_model import EnsembleModel
from pipeline.config import DataConfig
from pipeline.multicrop import preprocess_images
from pipeline.schema import manifest_sha256
from tests.ops.conftest import (
    CLASSES,
    IMAGE_SIZE,
    VAL_RESIZE,
    doctored_copy,
    jpeg_bytes,
    members_of,
    read_split,
    synthetic_image,
)

NAME = "tiny-inception"


@pytest.fixture(scope="module")
def reg(tmp_path_factory, checkpoints, synthetic_shards):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)  # a sqlite store keeps artifacts under ./mlruns
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("train")
        with mlflow.start_run() as run:  # a training run that logged its final checkpoint
            mlflow.log_artifacts(str(checkpoints[1]), artifact_path="checkpoint")
        mv = registry.register_ensemble(
            [str(checkpoints[0]), f"runs:/{run.info.run_id}"],
            NAME,
            tracking_uri=uri,
            crops=10,
            eval_shards=str(synthetic_shards),
        )
        yield SimpleNamespace(uri=uri, mv=mv, run_id=run.info.run_id, root=root)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def model(reg):
    return registry.load(f"models:/{NAME}@candidate", tracking_uri=reg.uri)


def hand_probabilities(checkpoints, images, crops):
    """Mean over members and crops of softmax(member(crop)), straight from the checkpoints' EMA weights."""
    x = preprocess_images(images, crops, DataConfig(image_size=IMAGE_SIZE, val_resize=VAL_RESIZE))
    with torch.no_grad():
        per_member = [
            torch.softmax(m(x), dim=1).view(len(images), crops, -1).mean(1) for m in members_of(checkpoints)
        ]
    return sum(per_member) / len(per_member)


def test_register_tags_and_candidate_alias(reg, checkpoints, synthetic_shards):
    client = MlflowClient(tracking_uri=reg.uri)
    mv = client.get_model_version_by_alias(NAME, "candidate")
    assert str(mv.version) == str(reg.mv.version) == "1"
    tags = mv.tags
    assert tags["members"] == "2" and tags["crops"] == "10" and tags["num_classes"] == str(len(CLASSES))
    assert tags["member_runs"] == f"-,{reg.run_id}"
    assert tags["eval.shards_sha256"] == tags["train.shards_sha256"] == manifest_sha256(synthetic_shards)
    assert tags["eval.num_samples"] == "16" and tags["eval.crops"] == "10" and tags["eval.split"] == "val"
    # the version's figure is the 2-member 10-crop ensemble on the shards (within the near-ties of
    # DALI vs Pillow decoding, see test_evaluate)
    images, labels = read_split(synthetic_shards)
    probs = hand_probabilities(checkpoints[:2], images, 10)
    top1 = 1 - (probs.argmax(1) == torch.tensor(labels)).float().mean().item()
    assert abs(float(tags["eval.top1_error"]) - top1) <= 2 / 16
    # the version page: its evaluation table and the runs behind it; the registration run lists the
    # evaluation shards under "Datasets"
    description = mv.description
    top1_pct, top5_pct = (100 * float(tags[f"eval.{k}_error"]) for k in ("top1", "top5"))
    row = f"| 2 | 10 | {top1_pct:.2f} % | {top5_pct:.2f} % | 16 | val |"
    assert row in description.splitlines() and f"Member runs: -, `{reg.run_id}`" in description
    assert f"Registration run: `{tags['registration_run']}`" in description
    (dataset,) = client.get_run(tags["registration_run"]).inputs.dataset_inputs
    assert (
        dataset.dataset.digest == manifest_sha256(synthetic_shards)[:36]
        and dataset.tags[0].value == "evaluation"
    )
    # model files: explicit requirements without local versions, our packages as code
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", tracking_uri=reg.uri)
    reqs = open(os.path.join(local, "requirements.txt")).read().split()
    assert "torch>=2.4" in reqs and not any("+cpu" in r or "dali" in r for r in reqs)
    assert {"models", "pipeline", "ops"} <= set(os.listdir(os.path.join(local, "code")))
    assert {"member_0.pt", "member_1.pt", "ensemble_config.json"} <= set(
        os.listdir(os.path.join(local, "artifacts"))
    )
    # models from code: the pyfunc is our source file, not a CloudPickle of an EnsembleModel object
    assert "python_model.pkl" not in os.listdir(local)
    flavor = mlflow.models.Model.load(os.path.join(local, "MLmodel")).flavors["python_function"]
    assert flavor["model_code_path"].endswith("ensemble_model_code.py")


def test_load_by_alias_and_predict_equals_hand_average(model, checkpoints):
    images = [jpeg_bytes(synthetic_image(label, 5)) for label in (0, 3, 6)]
    want = hand_probabilities(checkpoints[:2], images, 10)  # [3, C]
    full = model.predict(pd.DataFrame({"image": images}), params={"top_k": 0})
    np.testing.assert_allclose(np.stack(full["probabilities"]), want.numpy(), atol=1e-5)
    top = model.predict(pd.DataFrame({"image": images}))  # default top_k = 5
    assert list(top.columns) == ["classes", "indices", "probabilities"]
    for row, p in zip(top.itertuples(), want, strict=True):
        order = p.argsort(descending=True)[:5].tolist()
        assert row.indices == order and row.classes == [CLASSES[i] for i in order]
        np.testing.assert_allclose(row.probabilities, p[order].numpy(), atol=1e-5)
    top2 = model.predict(pd.DataFrame({"image": images}), params={"top_k": 2})
    assert [len(c) for c in top2["classes"]] == [2, 2, 2]


def test_request_chooses_its_crops(model, checkpoints):
    images = [jpeg_bytes(synthetic_image(label, 2)) for label in (1, 4)]
    for crops in (1, 144):
        got = model.predict(pd.DataFrame({"image": images}), params={"top_k": 0, "crops": crops})
        want = hand_probabilities(checkpoints[:2], images, crops)
        np.testing.assert_allclose(np.stack(got["probabilities"]), want.numpy(), atol=1e-5)
    with pytest.raises(MlflowException, match="params.crops must be 1, 10 or 144"):
        model.predict(pd.DataFrame({"image": images}), params={"crops": 7})


def test_predict_takes_uint8_arrays_and_raw_weights_are_not_exported(model, checkpoints):
    ens = model.unwrap_python_model()
    assert isinstance(ens, EnsembleModel) and len(ens.members) == 2 and ens.crops == 10
    array = synthetic_image(2, 9)
    from_array = ens.predict_images([array], top_k=0)
    from_jpeg_decoded = hand_probabilities(checkpoints[:2], [array], 10)
    np.testing.assert_allclose(np.stack(from_array["probabilities"]), from_jpeg_decoded.numpy(), atol=1e-5)
    fc = ens.members[0].fc.weight
    assert torch.equal(
        fc, torch.load(checkpoints[0] / "checkpoint.pt", weights_only=True)["ema"]["fc.weight"]
    )


def test_bad_inputs_are_clear_errors(model):
    with pytest.raises(MlflowException, match="image"):
        model.predict(pd.DataFrame({"picture": [jpeg_bytes(synthetic_image(0, 0))]}))
    with pytest.raises(MlflowException, match=r"row 1 of column 'image' is not a decodable image"):
        model.predict(pd.DataFrame({"image": [jpeg_bytes(synthetic_image(0, 0)), b"not a jpeg"]}))


def _invoke(model, body: dict):
    """What `mlflow models serve` does with a JSON request body (in-process, no server)."""
    import json

    from mlflow.pyfunc import scoring_server

    return scoring_server.invocations(
        json.dumps(body), "application/json", model, model.metadata.get_input_schema()
    )


def test_serving_errors_never_echo_the_request_and_formats_agree(model):
    import base64

    payload = base64.b64encode(os.urandom(60_000)).decode()  # not an image
    for body in (
        {"inputs": {"image": [payload]}},  # before: the reply carried all 80 kB of it back
        {"instances": [{"image": payload}]},
        {"dataframe_split": {"columns": ["image"], "data": [[payload]]}},
    ):
        with pytest.raises(MlflowException) as exc:
            _invoke(model, body)
        message = json.loads(exc.value.serialize_as_json())["message"]
        assert message == "row 0 of column 'image' is not a decodable image (UnidentifiedImageError)", message
        assert exc.value.get_http_status_code() == 400
    good = base64.b64encode(jpeg_bytes(synthetic_image(2, 1))).decode()
    via_inputs = json.loads(_invoke(model, {"inputs": {"image": [good]}}).response)["predictions"]
    via_split = json.loads(
        _invoke(model, {"dataframe_split": {"columns": ["image"], "data": [[good]]}}).response
    )
    assert via_inputs == via_split["predictions"]
    # empty input: 400 in both DataFrame formats (before: records 400, split 200 with no predictions)
    for body in ({"dataframe_split": {"columns": ["image"], "data": []}}, {"dataframe_records": []}):
        with pytest.raises(MlflowException) as exc:
            _invoke(model, body)
        assert exc.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="the request holds no images"):
        _invoke(model, {"dataframe_split": {"columns": ["image"], "data": []}})
    # top_k < 0 is an error (before: it behaved as 0, every probability)
    with pytest.raises(MlflowException, match=r"top_k must be >= 0.*got -1") as exc:
        _invoke(model, {"dataframe_split": {"columns": ["image"], "data": [[good]]}, "params": {"top_k": -1}})
    assert exc.value.get_http_status_code() == 400


def test_pixel_limit_refuses_before_decoding(model):
    from PIL import Image

    ens = model.unwrap_python_model()
    assert ens.max_pixels == 40_000_000
    big = io.BytesIO()
    Image.new("RGB", (8000, 6000)).save(big, format="JPEG", quality=10)  # 48 MP, ~0.5 MB
    with pytest.raises(MlflowException, match=r"8000x6000 = 48.0 megapixels, above the limit of 40.0"):
        model.predict(pd.DataFrame({"image": [big.getvalue()]}))
    # the header alone decides: a 48 MP header in front of no image data is refused the same way
    with pytest.raises(MlflowException, match="above the limit"):
        model.predict(pd.DataFrame({"image": [big.getvalue()[:2000]]}))
    try:
        ens.max_pixels = 96 * 96 - 1
        with pytest.raises(MlflowException, match="96x96 = 0.0 megapixels"):
            model.predict(pd.DataFrame({"image": [jpeg_bytes(synthetic_image(0, 0))]}))
    finally:
        ens.max_pixels = 40_000_000


def test_user_tags_cannot_pose_as_the_evaluation(tmp_path, checkpoints, capsys):
    # seen: --tag eval.top1_error=0.0 --tag eval.shards_sha256=<hash> promoted an unevaluated model
    uri = f"sqlite:///{tmp_path}/m.db"
    for tags in ({"eval.top1_error": "0.0"}, {"eval.shards_sha256": "ab" * 32}, {"crops": "1"}):
        with pytest.raises(registry.RegistryError, match="written by the registry itself"):
            registry.register_ensemble([str(checkpoints[0])], "spoof", tracking_uri=uri, tags=tags)
    with pytest.raises(SystemExit) as exc:
        registry_cli.main(
            [
                "--tracking-uri",
                uri,
                "register",
                str(checkpoints[0]),
                "--name",
                "spoof",
                "--tag",
                "eval.top1_error=0",
            ]
        )
    assert (
        exc.value.code == 2
        and "eval.top1_error are written by the registry itself" in capsys.readouterr().err
    )
    assert MlflowClient(tracking_uri=uri).search_registered_models() == []  # nothing was registered


def test_register_refuses_mismatched_members(tmp_path, checkpoints):
    from tests.ops.conftest import make_checkpoint

    other = make_checkpoint(tmp_path / "other", seed=7, class_names=("a", "b", "c"))
    with pytest.raises(registry.RegistryError, match="class names differ"):
        registry.register_ensemble(
            [str(checkpoints[0]), str(other)], "x", tracking_uri=f"sqlite:///{tmp_path}/m.db"
        )
    with pytest.raises(registry.RegistryError, match="neither a checkpoint directory"):
        registry.resolve_source(str(tmp_path / "missing"))


def _version_with(client, name, source_mv, tags):
    """Another real version of ``name`` (same model files) carrying the given evaluation tags."""
    mv = client.create_model_version(name, source_mv.source, run_id=source_mv.run_id)
    for k, v in {"crops": source_mv.tags["crops"], **tags}.items():  # crops: as every registered version
        client.set_model_version_tag(name, mv.version, k, v)
    return str(mv.version)


def test_promotion_gate(reg):
    client = MlflowClient(tracking_uri=reg.uri)
    name = "gate"
    client.create_registered_model(name)
    base = client.get_model_version(NAME, "1")
    shards, err = base.tags["eval.shards_sha256"], float(base.tags["eval.top1_error"])
    v1 = _version_with(client, name, base, {"eval.shards_sha256": shards, "eval.top1_error": str(err)})
    d = registry.promote(name, v1, tracking_uri=reg.uri)
    assert d.promoted and "no champion yet" in d.reason and d.previous_champion is None
    better = _version_with(
        client, name, base, {"eval.shards_sha256": shards, "eval.top1_error": str(err - 0.1)}
    )
    d = registry.promote(name, better, tracking_uri=reg.uri)
    assert d.promoted and "beats champion" in d.reason and d.previous_champion == v1
    worse = _version_with(client, name, base, {"eval.shards_sha256": shards, "eval.top1_error": str(err)})
    d = registry.promote(name, worse, tracking_uri=reg.uri)
    assert not d.promoted and "does not beat" in d.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == better
    other = _version_with(client, name, base, {"eval.shards_sha256": "0" * 64, "eval.top1_error": "0.0"})
    d = registry.promote(name, other, tracking_uri=reg.uri)
    assert not d.promoted and "different shards" in d.reason
    # the same figure is only comparable with the same split and crop setting (eval.* tags that only
    # the registry's own evaluation writes; before, a 1-crop figure could dethrone a 10-crop champion)
    other_crops = _version_with(
        client, name, base, {"eval.shards_sha256": shards, "eval.top1_error": "0.0", "eval.crops": "144"}
    )
    d = registry.promote(name, other_crops, tracking_uri=reg.uri)
    assert not d.promoted and "different eval.crops (144 vs 10)" in d.reason, d.reason
    other_split = _version_with(
        client, name, base, {"eval.shards_sha256": shards, "eval.top1_error": "0.0", "eval.split": "train"}
    )
    d = registry.promote(name, other_split, tracking_uri=reg.uri)
    assert not d.promoted and "different eval.split (train vs unknown)" in d.reason, d.reason
    unevaluated = _version_with(client, name, base, {})
    d = registry.promote(name, unevaluated, tracking_uri=reg.uri)
    assert not d.promoted and "no evaluation" in d.reason
    d = registry.promote(name, worse, force=True, tracking_uri=reg.uri)
    assert d.promoted and d.reason.startswith("forced")
    assert str(client.get_model_version_by_alias(name, "champion").version) == worse


def test_cli_promote_and_describe(reg, capsys):
    assert registry_cli.main(["--tracking-uri", reg.uri, "promote", "--name", NAME, "--version", "1"]) == 0
    assert "promoted: no champion yet" in capsys.readouterr().out
    assert registry_cli.main(["--tracking-uri", reg.uri, "promote", "--name", NAME, "--version", "1"]) == 3
    assert "already is the champion" in capsys.readouterr().out
    assert registry_cli.main(["--tracking-uri", reg.uri, "describe", "--name", NAME]) == 0
    out = capsys.readouterr().out
    assert "v1 [" in out and "candidate" in out and "champion" in out and "members=2 crops=10" in out
    tags = MlflowClient(tracking_uri=reg.uri).get_model_version(NAME, "1").tags
    # an error says so, in percent (before: "top-1 0.625000", read as an accuracy)
    assert f"top-1 error {100 * float(tags['eval.top1_error']):.2f}% " in out and "on 16 images of " in out
    assert registry_cli.main(["--tracking-uri", reg.uri, "promote", "--name", NAME, "--version", "99"]) == 1
    assert "has no version 99" in capsys.readouterr().err
    champion = registry.load_ensemble(f"models:/{NAME}@champion", tracking_uri=reg.uri)
    assert champion.class_names == list(CLASSES) and len(champion.members) == 2


@pytest.mark.slow
def test_evaluate_cli_on_registered_model_reproduces_version_figure(reg, synthetic_shards, capsys):
    from ops.evaluate_cli import main as evaluate_main

    cwd = os.getcwd()
    os.chdir(reg.root)
    try:
        rc = evaluate_main(
            [
                "--model",
                f"models:/{NAME}@candidate",
                "--shards",
                str(synthetic_shards),
                "--crops",
                "10",
                "--members",
                "2",
                "--tracking-uri",
                reg.uri,
                "--no-progress",
            ]
        )
    finally:
        os.chdir(cwd)
    assert rc == 0
    client = MlflowClient(tracking_uri=reg.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("inception-evaluate").experiment_id])
    tags = client.get_model_version(NAME, "1").tags
    # same members, crops, shards and loader as at registration: the same figure
    assert run.data.metrics["top1_error_m2_c10"] == pytest.approx(float(tags["eval.top1_error"]), abs=1e-6)
    assert run.data.metrics["top5_error_m2_c10"] == pytest.approx(float(tags["eval.top5_error"]), abs=1e-6)


def test_doctored_evaluation_shards_cannot_fool_the_gate(reg, checkpoints, synthetic_shards, tmp_path):
    """Before: labels rewritten inside the val tar, manifest untouched, were evaluated and recorded
    with the genuine manifest's hash, and ``promote`` moved champion on the doctored figure."""
    client = MlflowClient(tracking_uri=reg.uri)
    sources = [str(checkpoints[0]), str(checkpoints[1])]
    versions = len(client.search_model_versions(f"name='{NAME}'"))
    doctored = doctored_copy(synthetic_shards, tmp_path / "doctored", manifest_too=False)
    with pytest.raises(registry.RegistryError, match=r"val-000000\.tar: sha256 differs from the manifest"):
        registry.register_ensemble(sources, NAME, tracking_uri=reg.uri, crops=10, eval_shards=str(doctored))
    assert len(client.search_model_versions(f"name='{NAME}'")) == versions  # nothing registered
    # the manifest edited to match: verified, but recorded under its own hash, never the genuine one
    name = "doctored-gate"
    client.create_registered_model(name)
    genuine = client.get_model_version(NAME, "1")
    champion = _version_with(
        client, name, genuine, {k: v for k, v in genuine.tags.items() if k.startswith("eval.")}
    )
    assert registry.promote(name, champion, tracking_uri=reg.uri).promoted
    edited = doctored_copy(synthetic_shards, tmp_path / "edited", manifest_too=True)
    mv = registry.register_ensemble(sources, name, tracking_uri=reg.uri, crops=10, eval_shards=str(edited))
    assert mv.tags["eval.shards_sha256"] == manifest_sha256(edited) != manifest_sha256(synthetic_shards)
    decision = registry.promote(name, mv.version, tracking_uri=reg.uri)
    assert not decision.promoted and "different shards" in decision.reason
