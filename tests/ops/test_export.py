"""``inception-export``: a registered 2-member ensemble as one ONNX file whose onnxruntime output
equals the ensemble's probabilities on real JPEG crops, at another batch size than the one it was
traced with; logged to the version's run (slow: the exporter takes ~30 s)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ops import export, registry
from tests.ops.conftest import CLASSES, jpeg_bytes, synthetic_image
from tests.ops.test_registry import hand_probabilities

pytestmark = pytest.mark.slow


def plain_checkpoint(directory, seed: int):
    """A freshly initialised width-1/8 member. The shared fixtures' members are tuned to read coded
    patterns and are numerically touchy: PyTorch alone moves their probabilities by ~1e-2 between
    batch sizes, so they cannot show a 1e-4 agreement."""
    import dataclasses

    import torch

    import models
    from ops.checkpoint import save_checkpoint
    from pipeline.config import DataConfig
    from pipeline.multicrop import preprocess_images
    from tests.ops.conftest import IMAGE_SIZE, VAL_RESIZE

    torch.manual_seed(seed)
    net = models.build_model("inception_v3", num_classes=len(CLASSES), width_mult=0.125)
    for mod in net.modules():  # BatchNorm statistics of real crops: unit-scale features
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
    crops = preprocess_images(
        [jpeg_bytes(synthetic_image(i % len(CLASSES), i)) for i in range(16)],
        1,
        DataConfig(image_size=IMAGE_SIZE, val_resize=VAL_RESIZE),
    )
    with torch.no_grad():
        net.train()(crops)
        net.fc.weight.normal_(0, 2 / net.fc.weight.shape[1] ** 0.5)  # answers that differ per image
    weights = net.eval().state_dict()
    data = DataConfig(image_size=IMAGE_SIZE, val_resize=VAL_RESIZE, normalization="imagenet")
    spec = {"name": "inception_v3", "num_classes": len(CLASSES), "options": {"width_mult": 0.125}}
    payload = {"model_spec": spec, "model": weights, "ema": weights, "optimizer": {}, "scheduler": None}
    payload |= {
        "epoch": 1,
        "step": 1,
        "config": {"data": dataclasses.asdict(data)},
        "metrics": {},
        "extra": {},
    }
    save_checkpoint(directory, {**payload, "class_names": list(CLASSES)})
    return directory


def test_registered_ensemble_exports_checks_and_logs(tmp_path, monkeypatch, capsys):
    import onnx
    import onnxruntime as ort
    from mlflow import MlflowClient

    from pipeline.config import DataConfig
    from pipeline.multicrop import preprocess_images
    from tests.ops.conftest import IMAGE_SIZE, VAL_RESIZE

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoints = [plain_checkpoint(tmp_path / f"member{i}", i) for i in range(2)]
    mv = registry.register_ensemble([str(c) for c in checkpoints], "exported", tracking_uri=uri, crops=1)
    photos = tmp_path / "photos"
    photos.mkdir()
    images = [jpeg_bytes(synthetic_image(i % len(CLASSES), i)) for i in range(5)]
    for i, data in enumerate(images):
        (photos / f"{i}.jpg").write_bytes(data)
    out = tmp_path / "model.onnx"
    model = f"models:/exported/{mv.version}"
    rc = export.main(
        ["--model", model, "--tracking-uri", uri, "-o", str(out), "--check-images", str(photos), "--log"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "2 member(s); onnxruntime matches PyTorch within" in printed and "on 5 real image(s)" in printed
    diff, floor = (float(x) for x in re.findall(r"within ([0-9.e+-]+) .* batch: ([0-9.e+-]+)", printed)[0])
    assert diff <= 1e-3 and diff <= 3 * floor + 1e-6  # as close as PyTorch is to itself

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["class_names"]) == list(CLASSES) and meta["members"] == "2"
    assert json.loads(meta["normalization"])["name"] == "imagenet"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = preprocess_images(images[:3], 1, DataConfig(image_size=IMAGE_SIZE, val_resize=VAL_RESIZE)).numpy()
    got = session.run(None, {"images": x})[0]  # batch 3: traced with 2
    want = hand_probabilities(checkpoints, images[:3], 1).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3
    assert want.max() > 1.5 / len(CLASSES)  # not a uniform answer that any graph would match

    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version("exported", mv.version)
    assert version.tags["onnx.artifact"] == f"runs:/{version.run_id}/onnx/model.onnx"
    assert [a.path for a in client.list_artifacts(version.run_id, "onnx")] == ["onnx/model.onnx"]


def test_export_arguments_are_one_line(checkpoints, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert export.main(["--model", str(checkpoints[0]), "-o", out, "--member", "3"]) == 2
    assert "--member 3: the model has 1" in capsys.readouterr().err
    assert export.main(["--model", str(checkpoints[0]), "-o", out, "--log"]) == 2
    assert "--log needs a registered version" in capsys.readouterr().err
    assert export.main(["--model", "models:/x@champion", "-o", out, "--tracking-uri", ""]) == 2
