"""Paper fidelity options: per-tensor vs global clipping and the weight decay's place against hand
values, BatchNorm momentum, the model options reachable from the config, the Table 3 ladder
recipes, and configs/imagenet.yaml training a few steps."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from orchestration.config import ConfigError, OptimConfig, load_config
from orchestration.optim import add_weight_decay, build_optimizer, clip_gradients, loss_weight_decay
from orchestration.state import set_bn_momentum

REPO = Path(__file__).resolve().parents[2]


def _two_tensors(g1, g2) -> nn.Module:
    m = nn.ParameterList([nn.Parameter(torch.zeros(len(g1))), nn.Parameter(torch.zeros(len(g2)))])
    m[0].grad, m[1].grad = torch.tensor(g1), torch.tensor(g2)
    return m


def test_per_tensor_and_global_clipping_by_hand():
    # gradients with norms 5 and 1, threshold 2: per tensor only the first is scaled (by 2/5);
    # globally both are scaled by 2/sqrt(26). Either way the norm before clipping is returned.
    per = _two_tensors([3.0, 4.0], [0.6, 0.8])
    norm = clip_gradients(per, 2.0, "per_tensor")
    assert norm.item() == pytest.approx(math.sqrt(26))
    torch.testing.assert_close(per[0].grad, torch.tensor([1.2, 1.6]))
    torch.testing.assert_close(per[1].grad, torch.tensor([0.6, 0.8]))  # below the threshold: untouched
    glob = _two_tensors([3.0, 4.0], [0.6, 0.8])
    assert clip_gradients(glob, 2.0, "global").item() == pytest.approx(math.sqrt(26))
    scale = 2.0 / math.sqrt(26)
    torch.testing.assert_close(glob[0].grad, torch.tensor([3.0, 4.0]) * scale)
    torch.testing.assert_close(glob[1].grad, torch.tensor([0.6, 0.8]) * scale)
    off = _two_tensors([3.0, 4.0], [0.6, 0.8])
    assert clip_gradients(off, 0.0, "per_tensor").item() == pytest.approx(math.sqrt(26))
    torch.testing.assert_close(off[0].grad, torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="per_tensor"):
        clip_gradients(off, 1.0, "layerwise")


def test_weight_decay_inside_or_after_the_clipped_gradient():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[10.0, 0.0]]))
    layer.weight.grad = torch.tensor([[0.0, 1.0]])
    in_loss = OptimConfig(
        name="sgd", weight_decay=0.1, weight_decay_placement="in_loss", clip_mode="per_tensor"
    )
    # TF-slim: the L2 gradient 0.1 * w = [1, 0] joins the loss gradient, then the sum [1, 1] is clipped
    add_weight_decay([layer.weight], loss_weight_decay(in_loss))
    clip_gradients(layer, 1.0, "per_tensor")
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))
    assert [g["weight_decay"] for g in build_optimizer(layer, in_loss, 0.1).param_groups] == [0.0, 0.0]
    # after_clip: the clip sees [0, 1] alone (norm 1, untouched); the optimizer adds the decay after it
    after = OptimConfig(name="sgd", weight_decay=0.1, weight_decay_placement="after_clip")
    assert loss_weight_decay(after) == 0.0
    assert [g["weight_decay"] for g in build_optimizer(layer, after, 0.1).param_groups] == [0.1, 0.0]


def test_bn_momentum_sets_every_batch_norm_and_its_running_average():
    net = models.build_model("inception_v3", 10, width_mult=0.125)
    assert set_bn_momentum(net, 0.0003) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) > 90
    bn = nn.BatchNorm2d(1)
    set_bn_momentum(bn, 0.0003)
    x = torch.full((4, 1, 2, 2), 5.0)
    bn.train()(x)
    # PyTorch convention: running = (1 - m) * running + m * batch_mean (TF-slim decay 0.9997)
    assert bn.running_mean.item() == pytest.approx(0.0003 * 5.0)


def test_model_options_reach_the_model_from_the_config():
    cfg = load_config(
        None, ["model.stem=7x7", "model.aux_bn=false", "model.dropout=0.2", "model.width_mult=0.25"]
    )
    options = cfg.model.build_options()
    assert options == {"aux_logits": True, "width_mult": 0.25, "dropout": 0.2, "stem": "7x7", "aux_bn": False}
    net = models.build_model(cfg.model.name, 10, **options)
    assert net.stem == "7x7" and net.dropout.p == 0.2
    g = load_config(None, ["model.name=googlenet", "model.branch3_kernel=3"]).model.build_options()
    assert g["branch3_kernel"] == 3 and g["pooling"] == "paper" and "stem" not in g
    for bad, message in (
        (["model.stem=5x5"], "model.stem: invalid value"),
        (["model.name=googlenet", "model.aux_bn=false"], "Inception-v3 ablations"),
        (["model.branch3_kernel=3"], "GoogLeNet options"),
        (["model.pooling=torchvision"], "GoogLeNet options"),
        (["optim.clip_mode=layerwise"], "optim.clip_mode: invalid value"),
        (["model.bn_momentum=0"], "model.bn_momentum: invalid value"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, bad)


LADDER = {  # Table 3 rung -> (optimizer, label smoothing, stem, aux_bn, parameters at 1000 classes)
    "1-inception-v2": ("sgd", 0.0, "7x7", False, 27_141_264),
    "2-rmsprop": ("rmsprop_tf", 0.0, "7x7", False, 27_141_264),
    "3-label-smoothing": ("rmsprop_tf", 0.1, "7x7", False, 27_141_264),
    "4-factorized-7x7": ("rmsprop_tf", 0.1, "factorized", False, 27_160_496),
    "5-bn-auxiliary": ("rmsprop_tf", 0.1, "factorized", True, 27_161_264),
}


def test_ablation_ladder_recipes_build_the_models_they_name():
    assert sorted(p.stem for p in (REPO / "configs" / "ablations").glob("*.yaml")) == sorted(LADDER)
    for name, (opt, smoothing, stem, aux_bn, params) in LADDER.items():
        cfg = load_config(REPO / "configs" / "ablations" / f"{name}.yaml", [], root=str(REPO))
        assert (cfg.optim.name, cfg.optim.label_smoothing, cfg.model.stem, cfg.model.aux_bn) == (
            opt,
            smoothing,
            stem,
            aux_bn,
        ), name
        net = models.build_model(cfg.model.name, 1000, **cfg.model.build_options())
        assert sum(p.numel() for p in net.parameters()) == params, name
    top = load_config(REPO / "configs" / "ablations" / "5-bn-auxiliary.yaml", [], root=str(REPO))
    paper = load_config(REPO / "configs" / "imagenet.yaml", [], root=str(REPO))
    assert (top.model, top.optim, top.data, top.schedule) == (
        paper.model,
        paper.optim,
        paper.data,
        paper.schedule,
    )


def test_imagenet_recipe_defaults_are_the_reference_implementations():
    cfg = load_config(REPO / "configs" / "imagenet.yaml", [], root=str(REPO))
    assert (cfg.optim.clip_mode, cfg.optim.weight_decay_placement, cfg.optim.clip_grad_norm) == (
        "per_tensor",
        "in_loss",
        2.0,
    )
    assert (cfg.model.bn_momentum, cfg.model.dropout, tuple(cfg.data.crop_area)) == (0.0003, 0.2, (0.05, 1.0))
    assert cfg.data.color_distortion  # TF-slim distort_color, fast mode


@pytest.mark.slow
def test_imagenet_recipe_trains_a_few_steps(tmp_path):
    """configs/imagenet.yaml's model, optimizer, clipping and weight decay, 3 steps at 299 px on CPU."""
    from orchestration.loop import train_one_epoch
    from orchestration.schedule import LrSchedule, scaled_lr, warmup_epochs
    from orchestration.worker import loop_settings
    from pipeline import make_loader
    from tests.pipeline.shard_fixtures import write_coded_shards

    write_coded_shards(tmp_path, {"train": 8}, num_classes=4, shard_size=8, sizes=((320, 320),))
    cfg = load_config(
        REPO / "configs" / "imagenet.yaml",
        [f"data.shards={tmp_path}", "data.batch_size=2", "data.num_threads=1", "model.num_classes=4"],
        root=str(REPO),
    )
    torch.manual_seed(0)
    net = models.build_model(cfg.model.name, 4, **cfg.model.build_options())
    set_bn_momentum(net, cfg.model.bn_momentum)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = loop_settings(cfg, net, torch.device("cpu"), 0, 1)
    assert (s.clip_mode, s.loss_weight_decay) == ("per_tensor", 4e-5)
    lr = scaled_lr(cfg.optim, cfg.global_batch())
    optimizer = build_optimizer(net, cfg.optim, lr)
    loader = make_loader(cfg.data, "train", 0, 1, "cpu")
    schedule = LrSchedule(
        optimizer, lr, len(loader), cfg.schedule, warmup_epochs(cfg.schedule, cfg.global_batch())
    )
    metrics, step = train_one_epoch(net, loader, optimizer, schedule, None, net, s, 0)
    assert step == 4 and math.isfinite(metrics["train_loss"])
    moved = [
        k for k, v in net.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])
    ]
    assert "fc.weight" in moved and any("running_mean" in k for k in moved)


def test_googlenet_pools_as_the_paper_or_as_torchvision():
    """Paper: auxiliary 5x5/3 average pooling (4x4 from the 14x14 grid at 224 px), maxpool4 3x3/2;
    torchvision: adaptive 4x4 and 2x2/2. Same parameters, so torchvision weights load into both."""
    torch.manual_seed(0)
    paper = models.build_model("googlenet", 10, width_mult=0.25).eval()
    tv = models.build_model("googlenet", 10, width_mult=0.25, pooling="torchvision").eval()
    tv.load_state_dict(paper.state_dict())
    assert paper.maxpool4.kernel_size == 3 and tv.maxpool4.kernel_size == 2
    x = torch.randn(2, paper.inception4a.out_channels, 14, 14)
    pooled = torch.nn.functional.avg_pool2d(x, 5, stride=3)  # by hand: windows at 0, 3, 6, 9
    torch.testing.assert_close(pooled[..., 1, 2], x[..., 3:8, 6:11].mean(dim=(-2, -1)))
    want = paper.aux1.fc2(torch.relu(paper.aux1.fc1(torch.flatten(paper.aux1.conv(pooled), 1))))
    torch.testing.assert_close(paper.aux1(x), want)
    adaptive = torch.nn.functional.adaptive_avg_pool2d(x, (4, 4))
    assert not torch.allclose(adaptive, pooled)  # the two layouts differ at 224 px
    want_tv = tv.aux1.fc2(torch.relu(tv.aux1.fc1(torch.flatten(tv.aux1.conv(adaptive), 1))))
    torch.testing.assert_close(tv.aux1(x), want_tv)
    grid = torch.randn(1, 4, 14, 14)
    assert paper.maxpool4(grid).shape == tv.maxpool4(grid).shape == (1, 4, 7, 7)  # both keep the 7x7 grid
    torch.testing.assert_close(paper.maxpool4(grid)[..., 1, 1], grid[..., 2:5, 2:5].amax(dim=(-2, -1)))
    img = torch.randn(1, 3, 224, 224)
    assert paper(img).shape == tv(img).shape == (1, 10)


@pytest.mark.slow
@pytest.mark.realdata
def test_ablation_ladder_benchmark_runs_its_rungs(real_data_dir, tmp_path):
    """``python -m benchmarks.ablation_ladder`` end to end on a CIFAR-10 subset, two rungs, two
    steps each: one table row per rung, with the paper's figures beside."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.ablation_ladder", "--data-dir", str(real_data_dir),
            "--out", str(tmp_path), "--epochs", "1", "--rungs", "1,5", "--per-class-train", "20",
            "--per-class-test", "10", "--json", str(tmp_path / "ladder.json"),
            "debug.max_steps_per_epoch=2", "checkpoint.max_failures=0",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "ladder.json").read_text())
    assert [(r["rung"], r["name"], r["images"], r["epochs"]) for r in rows] == [
        (1, "1-inception-v2", 100, 1),
        (5, "5-bn-auxiliary", 100, 1),
    ]
    assert "| 1. Inception-v2 |" in out.stdout and "| 21.2 / 5.6 |" in out.stdout


def test_decay_and_per_tensor_clipping_leave_plain_gradients():
    """``g += wd * w`` ran with autograd on: every gradient became part of a graph (``w`` requires
    grad), the per-tensor norms extended it, and a training process grew by ~13 MB a step until the
    machine ran out of memory. The gradients must stay plain tensors."""
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net(torch.randn(5, 4)).square().sum().backward()
    add_weight_decay([net[0].weight, net[1].weight], 4e-5)
    clip_gradients(net, 0.1, "per_tensor")
    for p in net.parameters():
        assert p.grad.grad_fn is None and not p.grad.requires_grad


def test_paper_recipe_swaps_only_the_optimiser_and_the_schedule_shape():
    """``recipe_compare``'s ``paper`` recipe is ``configs/imagenet.yaml``'s optimiser and schedule
    shape on the dataset config; the data, network, EMA and run length stay the dataset's."""
    from benchmarks.recipe_compare import CONFIGS, RECIPES, paper_overrides

    paper = load_config(REPO / "configs" / "imagenet.yaml")
    for name in CONFIGS.values():
        short = load_config(REPO / "configs" / name)
        swapped = load_config(REPO / "configs" / name, paper_overrides())
        assert swapped.optim == paper.optim
        assert (swapped.schedule.decay_rate, swapped.schedule.decay_epochs) == (0.94, 2.0)
        assert swapped.schedule.warmup_epochs is None
        assert swapped.schedule.epochs == short.schedule.epochs
        assert (swapped.data, swapped.model, swapped.ema) == (short.data, short.model, short.ema)
    short = load_config(REPO / "configs" / "tiny-imagenet.yaml").optim
    assert (short.lr, short.eps, short.clip_grad_norm) == (0.0002, 0.001, 0.0)
    clipped = load_config(REPO / "configs" / "tiny-imagenet.yaml", RECIPES["short+clip"]()).optim
    assert clipped == replace(short, clip_grad_norm=2.0, clip_mode="per_tensor")


@pytest.mark.realdata
def test_tiny_imagenet_shards_from_the_shared_archive(real_data_dir, tmp_path):
    """100 classes from ``tiny-imagenet-100/{train,val}/<wnid>/``, subset sizes exact, reused once
    built, refused at other sizes."""
    from pipeline import load_manifest
    from pipeline.shards.real_data import build_real_shards

    out = build_real_shards("tiny-imagenet", real_data_dir, tmp_path / "s", 2, 1, progress=False)
    manifest = load_manifest(out)
    assert {s: manifest.splits[s].num_samples for s in ("train", "val")} == {"train": 200, "val": 100}
    assert len(manifest.class_names) == 100 and manifest.class_names[0] == "n01443537"
    assert build_real_shards("tiny-imagenet", real_data_dir, out, 2, 1, progress=False) == out
    with pytest.raises(ValueError, match="holds"):
        build_real_shards("tiny-imagenet", real_data_dir, out, 3, 1, progress=False)


@pytest.mark.slow
@pytest.mark.realdata
def test_recipe_compare_benchmark_runs_both_recipes(real_data_dir, tmp_path):
    """``python -m benchmarks.recipe_compare`` end to end on a Tiny-ImageNet subset, two steps per
    recipe: one row per recipe with that recipe's optimiser settings."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.recipe_compare", "--data-dir", str(real_data_dir),
            "--dataset", "tiny-imagenet", "--out", str(tmp_path), "--epochs", "1",
            "--per-class-train", "2", "--per-class-test", "1", "--json", str(tmp_path / "rows.json"),
            "debug.max_steps_per_epoch=2", "checkpoint.max_failures=0",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["recipe"], r["images"], r["epochs"], r["lr"], r["eps"], r["clip"]) for r in rows] == [
        ("short", 100, 1, 0.0002, 0.001, "0.0 per_tensor"),
        ("paper", 100, 1, 0.045, 1.0, "2.0 per_tensor"),
    ]
    assert "| short |" in out.stdout and "| paper |" in out.stdout
