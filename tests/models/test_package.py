"""The models package surface: registry, build_model errors, and that it imports no other stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models

REPO = Path(__file__).resolve().parents[2]


def test_registry_and_build_model():
    assert sorted(models.MODELS) == ["googlenet", "inception_v3"]
    with torch.device("meta"):
        net = models.build_model("inception_v3", num_classes=10, width_mult=0.5, stem="7x7", aux_bn=False)
        g = models.build_model("googlenet", 10, aux_logits=False)
    assert isinstance(net, models.InceptionV3) and net.fc.out_features == 10 and net.stem == "7x7"
    assert isinstance(g, models.GoogLeNet) and g.aux_loss_weights == ()
    with pytest.raises(
        ValueError, match=r"unknown model 'resnet50': choose one of \['googlenet', 'inception_v3'\]"
    ):
        models.build_model("resnet50", 10)
    with pytest.raises(TypeError, match="bad option for model 'googlenet'.*'stem'"):
        models.build_model("googlenet", 10, stem="7x7")
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        models.build_model("inception_v3", 0)


def test_importing_models_pulls_in_no_other_stage_or_heavy_dependency():
    code = (
        "import sys, models, models.summary, models.weights\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('ray', 'mlflow', 'nvidia', 'webdataset', 'pipeline', 'orchestration', 'ops', 'torchvision')]\n"
        "print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
