"""Label-smoothing cross-entropy and the weight EMA against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestration.ema import ModelEma
from orchestration.losses import label_smoothing_cross_entropy, training_loss


def test_label_smoothing_by_hand():
    # logits [0, ln 2, 0] -> p = [1/4, 1/2, 1/4]; target 1, eps 0.1, K = 3:
    # 0.9 * -ln(1/2) + 0.1 * (ln 4 + ln 2 + ln 4) / 3 = 0.9 * 0.693147 + 0.1 * 1.155245 = 0.7393571
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]])
    target = torch.tensor([1])
    expected = 0.9 * math.log(2) + 0.1 * (2 * math.log(4) + math.log(2)) / 3
    assert expected == pytest.approx(0.7393571, abs=1e-6)
    assert label_smoothing_cross_entropy(logits, target, 0.1).item() == pytest.approx(expected, abs=1e-6)
    assert label_smoothing_cross_entropy(logits, target, 0.0).item() == pytest.approx(math.log(2), abs=1e-6)


def test_label_smoothing_matches_torch_definition():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    ours = label_smoothing_cross_entropy(logits, target, 0.1)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, target, label_smoothing=0.1).item(), abs=1e-6)


def test_training_loss_adds_weighted_aux():
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]])
    aux = torch.zeros(1, 3)  # uniform: loss ln 3 whatever the smoothing
    target = torch.tensor([1])
    loss = training_loss(logits, (aux,), target, (0.4,), 0.1)
    assert loss.item() == pytest.approx(0.7393571 + 0.4 * math.log(3), abs=1e-6)
    with pytest.raises(ValueError, match="aux loss weights"):
        training_loss(logits, (aux,), target, (), 0.1)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm1d(1)


def test_ema_with_tf_warmup_by_hand():
    model = _Tiny()
    ema = ModelEma(model, decay=0.9999, warmup=True)
    expected = []
    # n=0: decay min(.9999, 1/10) = 0.1 -> 0.1*0 + 0.9*1 = 0.9
    # n=1: decay 2/11 -> 2/11*0.9 + 9/11*2 = 1.8 ; n=2: decay 3/12 = .25 -> .25*1.8 + .75*2 = 1.95
    for w, exp in ((1.0, 0.9), (2.0, 1.8), (2.0, 1.95)):
        with torch.no_grad():
            model.w.fill_(w)
            model.bn.running_mean.fill_(w)
        model.bn.num_batches_tracked.fill_(int(w) * 10)
        ema.update(model)
        expected.append(exp)
        assert ema.module.w.item() == pytest.approx(exp, abs=1e-6)
        assert ema.module.bn.running_mean.item() == pytest.approx(exp, abs=1e-6)  # buffers averaged too
        assert ema.module.bn.num_batches_tracked.item() == int(w) * 10  # integer buffers copied
    assert ema.num_updates == 3


def test_ema_without_warmup():
    model = _Tiny()
    ema = ModelEma(model, decay=0.5, warmup=False)
    for w, exp in ((1.0, 0.5), (2.0, 1.25)):
        with torch.no_grad():
            model.w.fill_(w)
        ema.update(model)
        assert ema.module.w.item() == pytest.approx(exp)
    assert not ema.module.w.requires_grad
    clone = ModelEma(_Tiny(), 0.5, False)
    clone.load_state_dict(ema.state_dict(), num_updates=2)
    assert clone.module.w.item() == pytest.approx(1.25) and clone.current_decay() == 0.5


def _loop_ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """The per-tensor Python loop ``ModelEma.update`` replaced (the reference for its numerics)."""
    source = model.state_dict()
    with torch.no_grad():
        for key, ema_value in ema_model.state_dict().items():
            value = source[key].detach()
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1 - decay)
            else:
                ema_value.copy_(value)


def test_fused_ema_matches_the_per_tensor_loop_on_inception_v3():
    import copy

    import models

    torch.manual_seed(0)
    model = models.inception_v3(num_classes=10, width_mult=0.25)
    ema = ModelEma(model, decay=0.999, warmup=True)
    reference = copy.deepcopy(ema.module)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model.train()
        out = model(torch.randn(2, 3, 75, 75), with_aux=True)
        (out.logits.square().mean() + out.aux_logits[0].square().mean()).backward()
        opt.step()
        opt.zero_grad()
        _loop_ema_update(reference, model, ema.current_decay())
        ema.update(model)
    assert model.Mixed_5b.branch1x1.bn.num_batches_tracked.item() == 3
    for key, value in reference.state_dict().items():
        assert torch.equal(ema.module.state_dict()[key], value), key  # bit for bit
    # lists follow in-place loads into the same model; another model object gets its own lists
    other = models.inception_v3(num_classes=10, width_mult=0.25)
    model.load_state_dict(other.state_dict())
    _loop_ema_update(reference, model, ema.current_decay())
    ema.update(model)
    assert torch.equal(ema.module.fc.weight, reference.fc.weight)
    _loop_ema_update(reference, other, ema.current_decay())
    ema.update(other)
    assert torch.equal(ema.module.fc.weight, reference.fc.weight)
