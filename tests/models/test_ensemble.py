"""Ensemble: exact averaging of softmax probabilities, per-member probabilities, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models


class FixedLogits(nn.Module):
    """A member whose logits are known numbers: a linear map of a 1-element input."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.linear = nn.Linear(1, len(logits), bias=True)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(torch.tensor(logits))

    def forward(self, x):
        return self.linear(x)


def softmax_by_hand(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def test_average_of_softmax_probabilities_by_hand():
    a, b, c = [2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]
    ensemble = models.Ensemble([FixedLogits(a), FixedLogits(b), FixedLogits(c)])
    probs = ensemble(torch.zeros(2, 1))
    expected = [
        sum(col) / 3 for col in zip(softmax_by_hand(a), softmax_by_hand(b), softmax_by_hand(c), strict=True)
    ]
    assert probs.shape == (2, 3) and probs.dtype == torch.float32
    for row in probs.tolist():
        assert row == pytest.approx(expected, abs=1e-7)
        assert sum(row) == pytest.approx(1.0, abs=1e-6)
    # averaging probabilities is not averaging logits
    assert expected != pytest.approx(
        softmax_by_hand([(x + y + z) / 3 for x, y, z in zip(a, b, c, strict=True)])
    )


def test_member_probabilities_give_every_ensemble_size_from_one_pass():
    torch.manual_seed(0)
    members = [models.inception_v3(num_classes=5, width_mult=0.25) for _ in range(3)]
    ensemble = models.Ensemble(members).eval()
    assert all(not m.training for m in members) and len(ensemble) == 3
    x = torch.randn(2, 3, 75, 75)
    with torch.no_grad():
        per_member = ensemble.member_probabilities(x)
        probs = ensemble(x)
        hand = [torch.softmax(m(x), dim=1) for m in members]
    assert per_member.shape == (3, 2, 5)
    for i in range(3):
        torch.testing.assert_close(per_member[i], hand[i], rtol=0, atol=0)
    torch.testing.assert_close(probs, (hand[0] + hand[1] + hand[2]) / 3, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_member[:2].mean(0), (hand[0] + hand[1]) / 2, rtol=1e-6, atol=1e-7)


def test_mixed_architectures_and_bf16_members():
    torch.manual_seed(0)
    ensemble = models.Ensemble([models.googlenet(num_classes=4, width_mult=0.25),
                                models.inception_v3(num_classes=4, width_mult=0.25)]).eval()  # fmt: skip
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probs = ensemble(torch.randn(2, 3, 80, 80))
    assert probs.dtype == torch.float32 and probs.shape == (2, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least one member"):
        models.Ensemble([])
    with pytest.raises(TypeError, match="member 1 is a str"):
        models.Ensemble([FixedLogits([0.0, 1.0]), "model.pth"])
    ensemble = models.Ensemble([FixedLogits([0.0, 1.0]), FixedLogits([0.0, 1.0, 2.0])])
    with pytest.raises(ValueError, match="member 1 returns \\(1, 3\\) but member 0 returns \\(1, 2\\)"):
        ensemble(torch.zeros(1, 1))
