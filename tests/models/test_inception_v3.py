"""Inception-v3: torchvision layout, exact counts, shapes at 299/75/131, aux API, ablations, init, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models.inception_v3 import InceptionV3
from models.layers import scale_channels
from tests.models.golden_layout import golden_layout, layout_of, parameter_count

PARAMS_WITH_AUX = 27_161_264  # torchvision Inception3 with 1000 classes
PARAMS_WITHOUT_AUX = 23_834_568
STEM_KEYS = ("Conv2d_1a_3x3.", "Conv2d_2a_3x3.", "Conv2d_2b_3x3.")


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(**options) -> InceptionV3:
    """Build without allocating or initializing weights: layouts and counts only (fast on 2 cores)."""
    with torch.device("meta"):
        return models.inception_v3(**options)


@pytest.fixture(scope="module")
def full_model() -> InceptionV3:
    torch.manual_seed(0)
    return models.inception_v3().eval()


@pytest.fixture()
def small_model() -> InceptionV3:
    torch.manual_seed(0)
    return models.inception_v3(num_classes=10, width_mult=0.25)


def test_state_dict_matches_torchvision_golden_layout(full_model):
    golden = golden_layout("inception3")
    assert parameter_count(golden) == PARAMS_WITH_AUX  # the golden file itself is torchvision's
    assert layout_of(full_model) == golden  # same keys, same shapes, same order


def test_exact_parameter_counts(full_model):
    assert count(full_model) == PARAMS_WITH_AUX
    assert count(on_meta(aux_logits=False)) == PARAMS_WITHOUT_AUX
    with torch.device("meta"):
        built = models.build_model("inception_v3", num_classes=1000, aux_logits=False)
    assert count(built) == PARAMS_WITHOUT_AUX
    assert count(on_meta(num_classes=10)) == PARAMS_WITH_AUX - 990 * (2048 + 1 + 768 + 1)


def test_bn_and_conv_conventions(full_model):
    conv = full_model.Mixed_6b.branch7x7dbl_2
    assert conv.conv.bias is None and conv.bn.eps == 0.001
    assert conv.conv.kernel_size == (7, 1)


@pytest.mark.parametrize(("size", "grid"), [(299, 8), (75, 1), (131, 2)])
def test_forward_shapes_at_299_75_and_odd_size(full_model, size, grid):
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        features = full_model.forward_features(x)
        logits = full_model.forward_head(features)
        out = full_model(x, with_aux=True)
    assert features.shape == (1, 2048, grid, grid)
    assert logits.shape == (1, 1000)
    assert isinstance(out, models.ModelOutputs)
    assert out.logits.shape == (1, 1000) and len(out.aux_logits) == 1 and out.aux_logits[0].shape == (1, 1000)
    torch.testing.assert_close(out.logits, logits)  # forward == forward_head(forward_features)


def test_non_square_input_and_too_small_input(small_model):
    small_model.eval()
    assert small_model(torch.randn(1, 3, 75, 140)).shape == (1, 10)
    with pytest.raises(ValueError, match="at least 75x75, got 74x80"):
        small_model(torch.randn(1, 3, 74, 80))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        small_model(torch.randn(1, 1, 80, 80))


def test_training_gives_aux_logits_and_plain_call_stays_a_tensor(small_model):
    small_model.train()
    x = torch.randn(2, 3, 75, 75)
    assert isinstance(small_model(x), torch.Tensor)  # no mode-dependent return type
    out = small_model(x, with_aux=True)
    assert out.logits.shape == (2, 10) and tuple(a.shape for a in out.aux_logits) == ((2, 10),)
    assert small_model.aux_loss_weights == (0.4,)
    no_aux = models.inception_v3(num_classes=10, width_mult=0.25, aux_logits=False).train()
    out = no_aux(x, with_aux=True)
    assert out.aux_logits == () and no_aux.aux_loss_weights == () and no_aux.AuxLogits is None


def test_aux_head_pooling_is_the_papers_at_17x17_and_adapts_below():
    torch.manual_seed(0)
    aux = models.inception_v3(num_classes=5, width_mult=0.25).AuxLogits.eval()
    grid17 = torch.randn(2, 192, 17, 17)
    with torch.no_grad():
        pooled = F.avg_pool2d(grid17, kernel_size=5, stride=3)  # torchvision InceptionAux
        expected = aux.fc(torch.flatten(aux.conv1(aux.conv0(pooled)), 1))
        torch.testing.assert_close(aux(grid17), expected)
        assert aux(torch.randn(2, 192, 3, 3)).shape == (2, 5)  # the grid at 75 px
        assert aux(torch.randn(2, 192, 6, 6)).shape == (2, 5)  # the grid at 131 px


def test_gradients_reach_every_parameter(small_model):
    small_model.train()
    x = torch.randn(4, 3, 91, 91)
    target = torch.randint(0, 10, (4,))
    out = small_model(x, with_aux=True)
    loss = F.cross_entropy(out.logits, target) + 0.4 * F.cross_entropy(out.aux_logits[0], target)
    loss.backward()
    without_grad = [
        n for n, p in small_model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert without_grad == []


def test_strict_state_dict_round_trip(small_model, tmp_path):
    small_model.train()
    small_model(torch.randn(2, 3, 75, 75))  # move BN running stats away from their init
    torch.save(small_model.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    other = models.inception_v3(num_classes=10, width_mult=0.25)
    other.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 80, 80)
    small_model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(small_model(x), other(x))


def test_seeded_truncated_normal_init():
    torch.manual_seed(123)
    a = models.inception_v3(num_classes=10, width_mult=0.5).state_dict()
    torch.manual_seed(123)
    b = models.inception_v3(num_classes=10, width_mult=0.5).state_dict()
    torch.manual_seed(124)
    c = models.inception_v3(num_classes=10, width_mult=0.5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["Mixed_7c.branch3x3dbl_2.conv.weight"], c["Mixed_7c.branch3x3dbl_2.conv.weight"])
    weight = a["Mixed_7c.branch3x3dbl_2.conv.weight"]  # 387 k draws
    assert weight.abs().max() <= 0.2  # cut at 2 std of 0.1
    assert weight.std().item() == pytest.approx(0.1 * 0.8796, rel=0.01)  # std of N(0,1) cut at +-2
    assert weight.mean().abs().item() < 1e-3
    aux_conv = a["AuxLogits.conv1.conv.weight"]
    assert aux_conv.abs().max() <= 0.02 and aux_conv.std().item() == pytest.approx(0.008796, rel=0.02)
    assert a["AuxLogits.fc.weight"].abs().max() <= 0.002  # TF-slim aux logits std 0.001
    assert torch.equal(a["fc.bias"], torch.zeros(10))
    assert torch.equal(a["Mixed_5b.branch1x1.bn.weight"], torch.ones(32))


def test_stem_7x7_changes_only_the_stem_keys(full_model):
    default = dict(layout_of(full_model))
    seven = dict(layout_of(on_meta(stem="7x7")))
    removed = sorted(set(default) - set(seven))
    added = sorted(set(seven) - set(default))
    assert removed == sorted(k for k in default if k.startswith(STEM_KEYS)) and len(removed) == 18
    assert added == [
        "Conv2d_1a_7x7.bn.bias", "Conv2d_1a_7x7.bn.num_batches_tracked", "Conv2d_1a_7x7.bn.running_mean",
        "Conv2d_1a_7x7.bn.running_var", "Conv2d_1a_7x7.bn.weight", "Conv2d_1a_7x7.conv.weight",
    ]  # fmt: skip
    assert seven["Conv2d_1a_7x7.conv.weight"] == (64, 3, 7, 7)
    assert all(seven[k] == default[k] for k in default if k in seven)
    assert count(on_meta(stem="7x7")) == PARAMS_WITH_AUX - (928 + 9280 + 18560) + (9408 + 128)
    m = models.inception_v3(num_classes=10, width_mult=0.25, stem="7x7").eval()
    with torch.no_grad():  # same grid sizes as the factorized stem, down to 75 px
        assert m.forward_features(torch.randn(1, 3, 75, 75)).shape == (1, 512, 1, 1)
        assert m.forward_features(torch.randn(1, 3, 299, 299)).shape == (1, 512, 8, 8)
    with pytest.raises(ValueError, match="stem must be one of"):
        on_meta(stem="5x5")


def test_aux_bn_off_changes_only_the_aux_fc_layer(full_model):
    default = dict(layout_of(full_model))
    no_bn = on_meta(aux_bn=False)
    changed = dict(layout_of(no_bn))
    assert sorted(set(default) - set(changed)) == [f"AuxLogits.conv1.bn.{n}" for n in
        ("bias", "num_batches_tracked", "running_mean", "running_var", "weight")]  # fmt: skip
    assert sorted(set(changed) - set(default)) == ["AuxLogits.conv1.conv.bias"]
    assert changed["AuxLogits.conv1.conv.bias"] == (768,)
    assert no_bn.AuxLogits.conv0.bn is not None  # the 1x1 conv keeps its batch norm
    assert count(no_bn) == PARAMS_WITH_AUX - 2 * 768 + 768


def test_aux_logits_off_removes_only_the_aux_head(full_model):
    default = layout_of(full_model)
    assert layout_of(on_meta(aux_logits=False)) == [e for e in default if not e[0].startswith("AuxLogits.")]


def test_width_mult_scales_filter_banks_and_keeps_keys(full_model):
    assert [scale_channels(c, 0.25) for c in (32, 48, 64, 80, 96, 128, 192, 320, 384, 448, 768)] == [
        8, 16, 16, 24, 24, 32, 48, 80, 96, 112, 192]  # fmt: skip
    assert [scale_channels(c, 0.5) for c in (32, 48, 80, 160)] == [16, 24, 40, 80]
    assert scale_channels(192, 1.0) == 192 and scale_channels(32, 0.01) == 8
    small = on_meta(width_mult=0.25)
    assert [k for k, _ in layout_of(small)] == [k for k, _ in layout_of(full_model)]
    assert small.state_dict()["Mixed_5b.branch1x1.conv.weight"].shape == (16, 48, 1, 1)
    assert small.fc.in_features == small.num_features == 80 + 4 * 96 + 48
    for bad in (0, -1.0, float("nan"), "half"):
        with pytest.raises(ValueError, match="width_mult"):
            on_meta(width_mult=bad)


def test_transform_input_is_explicit_and_matches_torchvision_formula():
    torch.manual_seed(0)
    plain = models.inception_v3(num_classes=10, width_mult=0.25).eval()
    transformed = models.inception_v3(num_classes=10, width_mult=0.25, transform_input=True).eval()
    transformed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 75, 75)
    # torchvision Inception3._transform_input, written out
    reference = torch.cat([
        x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
        x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
        x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5,
    ], 1)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(transformed(x), plain(reference))
    assert plain.transform_input is False


def test_dropout_option():
    m = models.inception_v3(num_classes=10, width_mult=0.25, dropout=0.2)
    assert m.dropout.p == 0.2 and on_meta(num_classes=10).dropout.p == 0.5
    with pytest.raises(ValueError, match="dropout"):
        on_meta(dropout=1.5)


def test_channels_last_matches_contiguous_float32(small_model):
    for module in small_model.modules():  # calibrate BN: running stats = one batch's exact statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    x = torch.randn(4, 3, 91, 91)
    with torch.no_grad():
        small_model.train()(x)
        small_model.eval()
        reference = small_model(x, with_aux=True)
        small_model.to(memory_format=torch.channels_last)
        out = small_model(x.contiguous(memory_format=torch.channels_last), with_aux=True)
    for got, want in ((out.logits, reference.logits), (out.aux_logits[0], reference.aux_logits[0])):
        assert ((got - want).norm() / want.norm()).item() < 1e-4  # float32 rounding of other conv kernels


def test_bf16_autocast_channels_last_forward_and_backward(small_model):
    small_model.train().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 91, 91).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = small_model(x, with_aux=True)
    assert low.logits.dtype == torch.bfloat16 and low.aux_logits[0].dtype == torch.bfloat16
    assert low.logits.shape == (4, 10) and torch.isfinite(low.logits.float()).all()
    (low.logits.float().sum() + low.aux_logits[0].float().sum()).backward()
    grad = small_model.Conv2d_1a_3x3.conv.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()  # float32 master weights


@pytest.mark.parametrize(("block", "shape"), [("Mixed_5b", (4, 48, 9, 9)), ("Mixed_6b", (4, 192, 5, 5)),
    ("Mixed_7b", (4, 320, 3, 3)), ("AuxLogits", (4, 192, 5, 5))])  # fmt: skip
def test_bf16_autocast_blocks_agree_with_float32(small_model, block, shape):
    # A randomly initialized deep net amplifies bf16 rounding chaotically, so whole-network outputs are
    # not comparable; each block must agree with float32 to bf16 precision.
    module = getattr(small_model, block).eval()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(x)
    assert low.dtype == torch.bfloat16
    assert ((low.float() - reference).norm() / reference.norm()).item() < 0.02


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = models.inception_v3(num_classes=10, width_mult=0.25).eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 75, 75)
    with torch.no_grad():
        eager = model(x, with_aux=True)
        out = compiled(x, with_aux=True)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.aux_logits[0], eager.aux_logits[0], rtol=1e-4, atol=1e-4)
    assert "_orig_mod.fc.weight" in compiled.state_dict()  # models.load_weights strips this prefix
