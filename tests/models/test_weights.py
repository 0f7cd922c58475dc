"""load_weights: torchvision/timm-layout files load strictly; bad files give errors that list the keys."""

from __future__ import annotations

import pytest
import torch

import models
from models.weights import LoadReport, WeightLoadError, read_state_dict
from tests.models.golden_layout import golden_layout, random_state_dict


@pytest.fixture()
def small():
    torch.manual_seed(0)
    return models.inception_v3(num_classes=10, width_mult=0.25).eval()


def test_torchvision_layout_file_loads_strict_into_the_default_model(tmp_path):
    # A file shaped like torchvision's inception_v3_google weights, saved before BN had
    # num_batches_tracked: it must load with strict=True and land value for value.
    state = random_state_dict(golden_layout("inception3"), with_bn_counters=False)
    torch.save(state, tmp_path / "inception_v3_google.pth")
    with torch.device("meta"):
        model = models.inception_v3()
    model = model.to_empty(device="cpu")
    report = models.load_weights(model, tmp_path / "inception_v3_google.pth")
    assert report.ok and len(report.loaded) == len(state)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_googlenet_torchvision_layout_loads_with_branch3_kernel_3():
    state = random_state_dict(golden_layout("googlenet"))
    with torch.device("meta"):
        tv, paper = models.googlenet(branch3_kernel=3), models.googlenet()
    assert models.load_weights(tv.to_empty(device="cpu"), state).ok
    with pytest.raises(
        WeightLoadError, match=r"9 key\(s\) with mismatched shapes: inception3a.branch3.1.conv.weight"
    ):
        models.load_weights(paper.to_empty(device="cpu"), state)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_round_trip_through_files_with_wrapper_prefixes_and_containers(small, tmp_path, suffix):
    state = small.state_dict()
    wrapped = {"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / f"w{suffix}")
    torch.manual_seed(1)
    other = models.inception_v3(num_classes=10, width_mult=0.25).eval()
    report = models.load_weights(other, tmp_path / f"w{suffix}")
    assert report.ok and report.describe() == f"all {len(state)} keys loaded"
    x = torch.randn(1, 3, 75, 75)
    with torch.no_grad():
        assert torch.equal(small(x), other(x))


def test_missing_and_unexpected_keys_are_listed_with_counts(small):
    state = small.state_dict()
    del state["fc.weight"], state["fc.bias"]
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(WeightLoadError) as info:
        models.load_weights(small, state)
    message = str(info.value)
    assert "do not fit InceptionV3" in message
    assert "2 missing key(s) (in the model, not in the weights): fc.weight, fc.bias" in message
    assert "1 unexpected key(s) (in the weights, not in the model): head.weight" in message


def test_long_lists_are_cut_after_five_keys(small):
    state = {k: v for k, v in small.state_dict().items() if not k.startswith("Mixed_7c.")}
    with pytest.raises(WeightLoadError, match=r"45 missing key\(s\) .*: Mixed_7c\.\S+, .*\(\+40 more\)"):
        models.load_weights(small, state)


def test_aux_head_mismatch_gets_a_hint(small):
    state = small.state_dict()
    no_aux = models.inception_v3(num_classes=10, width_mult=0.25, aux_logits=False)
    with pytest.raises(
        WeightLoadError, match=r"unexpected key.*AuxLogits.*build the model with aux_logits=True"
    ):
        models.load_weights(no_aux, state)


def test_other_num_classes_strict_error_and_non_strict_fine_tune_start(small):
    state = small.state_dict()
    torch.manual_seed(2)
    target = models.inception_v3(num_classes=3, width_mult=0.25)
    expected = r"4 key\(s\) with mismatched shapes.*fc.weight: weights \[10, 512\] vs model \[3, 512\]"
    with pytest.raises(WeightLoadError, match=expected + ".*Only the classifier differs"):
        models.load_weights(target, state)
    fc_before = target.fc.weight.clone()
    report = models.load_weights(target, state, strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert sorted(k for k, _, _ in report.mismatched) == [
        "AuxLogits.fc.bias",
        "AuxLogits.fc.weight",
        "fc.bias",
        "fc.weight",
    ]
    assert torch.equal(target.Mixed_5b.branch1x1.conv.weight, state["Mixed_5b.branch1x1.conv.weight"])
    assert torch.equal(target.fc.weight, fc_before)  # left as initialized


def test_unreadable_sources(tmp_path, small):
    with pytest.raises(WeightLoadError, match="does not exist"):
        models.load_weights(small, tmp_path / "nope.pth")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(WeightLoadError, match="unsupported weight file type '.h5'"):
        models.load_weights(small, tmp_path / "w.h5")
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    with pytest.raises(WeightLoadError, match="cannot be read as a PyTorch state dict"):
        models.load_weights(small, tmp_path / "broken.pth")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightLoadError, match="holds a list, not a state dict"):
        models.load_weights(small, tmp_path / "list.pt")
    torch.save({"epoch": 1, "config": {}}, tmp_path / "meta.pt")
    with pytest.raises(WeightLoadError, match="none of the container keys"):
        models.load_weights(small, tmp_path / "meta.pt")
    with pytest.raises(WeightLoadError, match="path or a state dict"):
        models.load_weights(small, 42)


def test_read_state_dict_unwraps_checkpoint_payloads(small):
    payload = {"model": {"_orig_mod.fc.bias": torch.ones(10)}, "ema": {}, "epoch": 1}
    assert list(read_state_dict(payload)) == ["fc.bias"]
