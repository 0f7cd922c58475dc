"""models.summary: multiply-adds and parameters vs the papers/timm, cross-checked by hand; the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models.googlenet import INCEPTION_BANKS
from models.summary import main, summarize

TIMM_INCEPTION_V3_GMACS = 5.73  # timm model card inception_v3.tv_in1k: 5.7 GMACs at 299 (paper: ~5 G)
PAPER_GOOGLENET_GMACS = 1.5  # GoogLeNet paper section 5: "1.5 billion multiply-adds"


def macs_by_hand(model: nn.Module, x: torch.Tensor) -> int:
    """Conv: output elements x (C_in / groups) x kh x kw; Linear: output elements x in_features."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kh * kw
        else:
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return total


@pytest.fixture(scope="module")
def inception_summary():
    torch.manual_seed(0)
    model = models.inception_v3()
    return model, summarize(model, 299)


def test_inception_v3_at_299(inception_summary):
    model, s = inception_summary
    assert s.params == 27_161_264 and s.params_inference == 23_834_568
    assert s.macs == pytest.approx(TIMM_INCEPTION_V3_GMACS * 1e9, rel=0.02)
    assert s.macs == 5_713_216_096  # pinned: the figure printed by `python -m models.summary inception_v3`
    assert s.macs == macs_by_hand(model, torch.zeros(1, 3, 299, 299))
    assert s.macs_with_aux - s.macs == next(r.macs for r in s.rows if r.name == "AuxLogits")
    rows = {r.name: r for r in s.rows}
    assert sum(r.macs for r in s.rows) == s.macs_with_aux and sum(r.params for r in s.rows) == s.params
    assert rows["Mixed_6e"].output_shape == (768, 17, 17) and rows["Mixed_7c"].output_shape == (2048, 8, 8)
    assert rows["fc"].macs == 2048 * 1000 and rows["Conv2d_1a_3x3"].macs == 149 * 149 * 32 * 27


def test_googlenet_at_224():
    torch.manual_seed(0)
    tv = summarize(models.googlenet(branch3_kernel=3), 224)
    assert tv.params == 13_004_888 and tv.params_inference == 6_624_904
    assert tv.macs == pytest.approx(PAPER_GOOGLENET_GMACS * 1e9, rel=0.02)
    paper = summarize(models.googlenet(), 224)
    # the paper's 5x5 kernels add (25 - 9) x ch5x5red x ch5x5 MACs per output pixel of each module
    grids = {"inception3": 28 * 28, "inception4": 14 * 14, "inception5": 7 * 7}
    extra = sum(16 * b[3] * b[4] * grids[name[:10]] for name, b in INCEPTION_BANKS.items())
    assert paper.macs - tv.macs == extra
    assert paper.macs == 1_582_671_872


def test_width_mult_at_75_matches_hand_count():
    torch.manual_seed(0)
    model = models.inception_v3(num_classes=10, width_mult=0.25)
    s = summarize(model, 75)
    assert s.macs == macs_by_hand(model, torch.zeros(1, 3, 75, 75))
    assert s.params == sum(p.numel() for p in model.parameters())


def test_cli_prints_aligned_table(capsys):
    assert main(["inception_v3", "--image-size", "75", "--width-mult", "0.25", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("inception_v3 at 75x75, 10 classes")
    body = [line for line in lines if line.startswith(("Conv2d", "Mixed", "fc ", "total"))]
    assert len({len(line) for line in body}) == 1  # right-aligned numbers: equal line lengths
    assert any(line.startswith("AuxLogits (training only)") for line in lines)
    assert "total (inference)" in out and "multiply-adds" in out


def test_cli_no_aux_and_options(capsys):
    main(["googlenet", "--image-size", "96", "--width-mult", "0.25", "--no-aux", "-o", "branch3_kernel=3"])
    out = capsys.readouterr().out
    assert "aux1" not in out and "branch3_kernel=3" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inception_v3", "--image-size", "60"], "--image-size must be at least 75, got 60"),
        (["inception_v3", "-o", "stem=9x9"], "stem must be one of"),
        (["inception_v3", "-o", "colour=1"], "bad option for model 'inception_v3'"),
        (["inception_v3", "-o", "nonsense"], "option must look like KEY=VALUE"),
        (["resnet50"], "invalid choice: 'resnet50'"),
        (["inception_v3", "--width-mult", "0"], "width_mult must be a positive number"),
    ],
)
def test_cli_bad_input_is_one_error_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
