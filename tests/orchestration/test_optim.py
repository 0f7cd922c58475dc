"""RMSpropTF against hand-computed TensorFlow-style updates, and how it differs from torch.optim.RMSprop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from orchestration.config import OptimConfig
from orchestration.optim import RMSpropTF, build_optimizer, clip_gradients, parameter_groups


def _run(opt_cls, grads, **kw):
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = opt_cls([p], **kw)
    values = []
    for g in grads:
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        values.append(p.item())
    return values, opt.state[p]


def test_rmsprop_tf_three_steps_by_hand():
    # lr 0.1, decay 0.9, momentum 0.9, eps 1.0; ms starts at 1, mom at 0; p0 = 1; grads 1, 2, -1.
    # step 1: ms = .9*1 + .1*1 = 1.0;  mom = .1*1/sqrt(2.0)              = 0.07071067811865475
    #         p = 1 - 0.0707106781  = 0.9292893218813453
    # step 2: ms = .9*1 + .1*4 = 1.3;  mom = .9*0.0707106781 + .1*2/sqrt(2.3) = 0.06363961030678928
    #         + 0.13187609467915742 = 0.1955157049859467;  p = 0.7337736168953986
    # step 3: ms = .9*1.3 + .1*1 = 1.27; mom = .9*0.1955157050 + .1*(-1)/sqrt(2.27)
    #         = 0.17596413448735203 - 0.0663723311599972 = 0.10959180332735484; p = 0.6241818135680437
    values, state = _run(RMSpropTF, [1.0, 2.0, -1.0], lr=0.1, decay=0.9, momentum=0.9, eps=1.0)
    assert values == pytest.approx([0.9292893218813453, 0.7337736168953986, 0.6241818135680437], abs=1e-12)
    assert state["square_avg"].item() == pytest.approx(1.27, abs=1e-12)
    assert state["momentum_buffer"].item() == pytest.approx(0.10959180332735484, abs=1e-12)


def test_differs_from_torch_rmsprop_as_documented():
    # torch: ms starts at 0, eps outside the sqrt, lr outside the buffer.
    # step 1: ms = .1*1 = 0.1; buf = 1/(sqrt(0.1) + 1) = 0.7597469266479578;
    #         p = 1 - .1*buf = 0.9240253073352042
    torch_values, _ = _run(torch.optim.RMSprop, [1.0], lr=0.1, alpha=0.9, momentum=0.9, eps=1.0)
    assert torch_values[0] == pytest.approx(0.9240253073352042, abs=1e-12)
    tf_values, _ = _run(RMSpropTF, [1.0], lr=0.1, decay=0.9, momentum=0.9, eps=1.0)
    assert tf_values[0] != pytest.approx(torch_values[0], abs=1e-3)


def test_lr_inside_momentum_buffer():
    # Changing lr after step 1 rescales only the new gradient's contribution (TF), not the buffer.
    p = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = RMSpropTF([p], lr=0.1, decay=0.9, momentum=0.9, eps=1.0)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    opt.step()  # grad 1 again, lr 0: mom = .9 * 0.0707106781, p moves by exactly that
    assert p.item() == pytest.approx(-(0.1 / math.sqrt(2.0)) * 1.9, abs=1e-12)


def test_weight_decay_only_on_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 4e-5)
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert len(no_decay["params"]) == 4  # conv bias, bn weight, bn bias, linear bias
    opt = build_optimizer(model, OptimConfig(), lr=0.09)
    assert isinstance(opt, RMSpropTF) and opt.param_groups[0]["eps"] == 1.0


def test_weight_decay_is_l2_in_the_gradient():
    # wd 0.5, p0 = 1, grad 0 -> effective grad 0.5: ms = .9 + .1*.25 = 0.925; p = 1 - .1*.5/sqrt(1.925)
    values, _ = _run(RMSpropTF, [0.0], lr=0.1, decay=0.9, momentum=0.9, eps=1.0, weight_decay=0.5)
    assert values[0] == pytest.approx(1 - 0.05 / math.sqrt(1.925), abs=1e-12)


def test_clip_gradients_global_norm():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # global norm 5
    model = nn.Module()
    model.a, model.b = a, b
    norm = clip_gradients(model, 2.0)
    assert isinstance(norm, torch.Tensor) and norm.item() == pytest.approx(5.0)  # no host sync inside
    assert a.grad.tolist() == pytest.approx([1.2, 0.0], abs=1e-6) and b.grad.item() == pytest.approx(
        1.6, abs=1e-6
    )


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="eps=0"):
        RMSpropTF([nn.Parameter(torch.zeros(1))], eps=0)


def test_clip_gradients_off_returns_the_norm_untouched():
    a = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([30.0, 40.0])
    model = nn.Module()
    model.a = a
    norm = clip_gradients(model, 0.0)
    assert isinstance(norm, torch.Tensor) and norm.item() == pytest.approx(50.0)
    assert a.grad.tolist() == [30.0, 40.0]


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_foreach_update_matches_the_per_tensor_update_bit_for_bit(momentum):
    import models

    torch.manual_seed(0)
    nets = [models.inception_v3(num_classes=7, width_mult=0.25) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    initial = nets[0].fc.weight.detach().clone()
    opts = [
        RMSpropTF(parameter_groups(net, 4e-5), lr=0.05, momentum=momentum, foreach=fe)
        for net, fe in zip(nets, (True, False), strict=True)
    ]
    x = torch.randn(2, 3, 75, 75)
    for _ in range(3):
        for net, opt in zip(nets, opts, strict=True):
            torch.manual_seed(1)  # same dropout masks
            out = net.train()(x, with_aux=True)
            opt.zero_grad()
            (out.logits.square().mean() + out.aux_logits[0].square().mean()).backward()
            opt.step()
    fused, reference = (dict(net.named_parameters()) for net in nets)
    assert all(torch.equal(fused[k], reference[k]) for k in reference)
    assert not torch.equal(fused["fc.weight"], initial)  # the steps did move the weights
