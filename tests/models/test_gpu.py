"""The networks on a CUDA GPU: bf16 autocast + channels_last training step, CPU/GPU agreement, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models

pytestmark = pytest.mark.gpu


def calibrated_small_model(seed: int = 0):
    """A width-0.25 Inception-v3 whose BN running stats hold one batch's statistics (eval is well scaled)."""
    torch.manual_seed(seed)
    model = models.inception_v3(num_classes=10, width_mult=0.25)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 107, 107))
    return model.eval()


def test_training_step_bf16_channels_last_at_299():
    model = models.inception_v3().cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 299, 299, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, with_aux=True)
        loss = F.cross_entropy(out.logits, y) + 0.4 * F.cross_entropy(out.aux_logits[0], y)
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape == (8, 1000)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_cpu_and_cuda_float32_agree():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = calibrated_small_model()
    x = torch.randn(4, 3, 107, 107)
    with torch.no_grad():
        cpu = model(x, with_aux=True)
        gpu = model.cuda()(x.cuda(), with_aux=True)
    for a, b in ((cpu.logits, gpu.logits), (cpu.aux_logits[0], gpu.aux_logits[0])):
        assert ((b.cpu() - a).norm() / a.norm()).item() < 1e-4


def test_ensemble_on_cuda():
    members = [calibrated_small_model(seed).cuda() for seed in (0, 1)]
    ensemble = models.Ensemble(members).eval()
    x = torch.randn(3, 3, 75, 75, device="cuda")
    with torch.no_grad():
        probs = ensemble(x)
        hand = (torch.softmax(members[0](x), 1) + torch.softmax(members[1](x), 1)) / 2
    torch.testing.assert_close(probs, hand)


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    model = calibrated_small_model().cuda().train()
    model.dropout.p = 0.0  # same outputs from both runs need no random masks
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 107, 107, device="cuda")
    eager = model(x, with_aux=True)
    out = compiled(x, with_aux=True)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-3, atol=1e-3)
    (out.logits.sum() + out.aux_logits[0].sum()).backward()
    assert model.Conv2d_1a_3x3.conv.weight.grad is not None
