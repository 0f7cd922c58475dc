"""GoogLeNet: torchvision layout (branch3_kernel=3), the paper's 5x5 default, counts, shapes, aux heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models.googlenet import INCEPTION_BANKS, GoogLeNet
from tests.models.golden_layout import golden_layout, layout_of, parameter_count

# torchvision GoogLeNet with 1000 classes (3x3 "5x5" branch): 6,624,904 / 13,004,888 with aux heads
TV_PARAMS, TV_PARAMS_WITH_AUX = 6_624_904, 13_004_888
# paper 5x5: each module's 5x5 conv has (25 - 9) * ch5x5red * ch5x5 more weights than torchvision's 3x3
EXTRA_5X5 = sum(16 * banks[3] * banks[4] for banks in INCEPTION_BANKS.values())


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(**options) -> GoogLeNet:
    with torch.device("meta"):
        return models.googlenet(**options)


def test_torchvision_layout_with_branch3_kernel_3():
    golden = golden_layout("googlenet")
    assert parameter_count(golden) == TV_PARAMS_WITH_AUX
    assert layout_of(on_meta(branch3_kernel=3)) == golden


def test_paper_5x5_default_differs_only_in_branch3_kernels():
    golden = golden_layout("googlenet")
    paper = layout_of(on_meta())
    assert [k for k, _ in paper] == [k for k, _ in golden]
    changed = [(k, g, p) for (k, g), (_, p) in zip(golden, paper, strict=True) if g != p]
    assert [k for k, _, _ in changed] == [f"{name}.branch3.1.conv.weight" for name in INCEPTION_BANKS]
    assert all(g[2:] == (3, 3) and p[2:] == (5, 5) and g[:2] == p[:2] for _, g, p in changed)


def test_exact_parameter_counts():
    assert EXTRA_5X5 == 380_928
    assert count(on_meta(branch3_kernel=3)) == TV_PARAMS_WITH_AUX
    assert count(on_meta(branch3_kernel=3, aux_logits=False)) == TV_PARAMS
    assert count(on_meta()) == TV_PARAMS_WITH_AUX + EXTRA_5X5 == 13_385_816  # as in the module docstring
    assert count(on_meta(aux_logits=False)) == TV_PARAMS + EXTRA_5X5 == 7_005_832
    with pytest.raises(ValueError, match="branch3_kernel"):
        on_meta(branch3_kernel=7)


@pytest.fixture(scope="module")
def net() -> GoogLeNet:
    torch.manual_seed(0)
    return models.build_model("googlenet", num_classes=1000).eval()


@pytest.mark.parametrize(("size", "grid"), [(224, 7), (75, 2), (131, 4)])
def test_forward_shapes(net, size, grid):
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        features = net.forward_features(x)
        out = net(x, with_aux=True)
    assert features.shape == (1, 1024, grid, grid)
    assert out.logits.shape == (1, 1000) and [a.shape for a in out.aux_logits] == [(1, 1000), (1, 1000)]
    torch.testing.assert_close(out.logits, net.forward_head(features))


def test_aux_heads_train_only_unless_asked():
    torch.manual_seed(0)
    m = models.googlenet(num_classes=7, width_mult=0.25)
    assert m.aux_loss_weights == (0.3, 0.3)  # paper section 5
    calls = []
    m.aux1.register_forward_hook(lambda *_: calls.append("aux1"))
    m.aux2.register_forward_hook(lambda *_: calls.append("aux2"))
    x = torch.randn(2, 3, 75, 75)
    m.eval()
    with torch.no_grad():
        logits = m(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 7) and calls == []  # dropped at inference
    m.train()
    out = m(x, with_aux=True)
    assert calls == ["aux1", "aux2"] and [a.shape for a in out.aux_logits] == [(2, 7), (2, 7)]
    no_aux = models.googlenet(num_classes=7, width_mult=0.25, aux_logits=False)
    assert no_aux(x, with_aux=True).aux_logits == () and no_aux.aux_loss_weights == ()
    assert not any(k.startswith(("aux1.", "aux2.")) for k in no_aux.state_dict())


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = models.googlenet(num_classes=7, width_mult=0.25).train()
    x, y = torch.randn(4, 3, 96, 96), torch.randint(0, 7, (4,))
    out = m(x, with_aux=True)
    loss = F.cross_entropy(out.logits, y)
    loss = loss + sum(
        w * F.cross_entropy(a, y) for w, a in zip(m.aux_loss_weights, out.aux_logits, strict=True)
    )
    loss.backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_init_and_options():
    torch.manual_seed(5)
    a = models.googlenet(num_classes=7, width_mult=0.5)
    torch.manual_seed(5)
    b = models.googlenet(num_classes=7, width_mult=0.5)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    weight = a.inception4e.branch2[1].conv.weight
    assert weight.abs().max() <= 0.02 and weight.std().item() == pytest.approx(0.01 * 0.8796, rel=0.02)
    assert (
        a.dropout.p == 0.4 and models.googlenet(num_classes=7, width_mult=0.25, dropout=0.2).dropout.p == 0.2
    )
    assert a.conv1.conv.weight.shape == (32, 3, 7, 7) and a.fc.in_features == a.num_features == 512
    with pytest.raises(ValueError, match="at least 75x75"):
        a(torch.randn(1, 3, 64, 64))
