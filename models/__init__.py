"""The networks: Inception-v3 (default), GoogLeNet/Inception-v1, an ensemble wrapper, weight loading.

Pure PyTorch (no Ray, MLflow or DALI). Typical use::

    import models
    net = models.build_model("inception_v3", num_classes=1000, width_mult=0.25)
    logits = net(images)                          # [N, C] in every mode
    out = net(images, with_aux=True)              # models.ModelOutputs(logits, aux_logits)
    loss = ce(out.logits, y) + sum(w * ce(a, y) for w, a in zip(net.aux_loss_weights, out.aux_logits))

``python -m models.summary inception_v3 --image-size 299`` prints parameters and multiply-adds.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.ensemble import Ensemble
from models.googlenet import GoogLeNet, googlenet
from models.inception_v3 import InceptionV3, inception_v3
from models.layers import MIN_INPUT_SIZE, ModelOutputs
from models.weights import WeightLoadError, load_weights

# name -> constructor(num_classes=..., aux_logits=..., **options); the names stored in checkpoints.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "inception_v3": inception_v3,
    "googlenet": googlenet,
}


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build a registered network by name, e.g. ``build_model("inception_v3", 1000, width_mult=0.5)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODELS)}")
    try:
        return MODELS[name](num_classes=num_classes, **options)
    except TypeError as exc:
        raise TypeError(f"bad option for model {name!r}: {exc}") from exc


__all__ = [
    "MIN_INPUT_SIZE",
    "MODELS",
    "Ensemble",
    "GoogLeNet",
    "InceptionV3",
    "ModelOutputs",
    "WeightLoadError",
    "build_model",
    "googlenet",
    "inception_v3",
    "load_weights",
]
