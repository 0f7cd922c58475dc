"""``make_loader`` on both backends, CPU path: label/image alignment after crop and mirror, exact
epochs over 2 simulated ranks, set_epoch reproducibility, identical output format."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline import DataConfig, make_loader, make_multicrop_loader
from pipeline.config import NORMALIZATIONS
from tests.pipeline.shard_fixtures import level_to_label, write_coded_shards

CLASSES = 21  # val: one sample per class, so labels are keys
TRAIN, VAL = 45, 21
BACKENDS = ["dali", "torch"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_coded_shards(folder, {"train": TRAIN, "val": VAL}, num_classes=CLASSES, shard_size=8)
    return folder


def _cfg(shards, backend, **kw):
    base = dict(
        shards=str(shards), backend=backend, batch_size=4, image_size=80, val_resize=90
    )
    return DataConfig(**{**base, **kw})


def _pixels(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Back to [0, 255] NCHW float."""
    mean, std = NORMALIZATIONS[cfg.normalization]
    x = x.float()  # every layout hands over [B, 3, S, S]
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


def _epoch(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_alignment_after_crop_and_mirror(shards, backend):
    cfg = _cfg(shards, backend)
    xs, ys = _epoch(make_loader(cfg, "train", 0, 1, "cpu"))
    px, labels = _pixels(torch.cat(xs), cfg), torch.cat(ys)
    decoded = [level_to_label(float(v)) for v in px[:, 0].mean(dim=(1, 2))]
    assert decoded == labels.tolist()
    # green ramps left->right in the source: a mirrored crop has it decreasing
    green = px[:, 1].mean(dim=1)  # [N, W]
    slope = green[:, -8:].mean(dim=1) - green[:, :8].mean(dim=1)
    assert (slope.abs() > 4).all(), "every random crop spans part of the ramp"
    mirrored = int((slope < 0).sum())
    assert 0 < mirrored < len(slope), f"{mirrored} of {len(slope)} mirrored: expected about half"


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epochs_have_announced_length_on_every_rank(shards, backend):
    cfg = _cfg(shards, backend, batch_size=4)
    per_rank = []
    for rank in range(2):
        loader = make_loader(cfg, "train", rank, 2, "cpu")
        assert len(loader) == (TRAIN // 2) // 4 == 5 and loader.num_samples == 20
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            xs, ys = _epoch(loader)
            assert [y.shape[0] for y in ys] == [4] * 5
            per_rank.append(set(torch.cat(ys).tolist()))
    assert all(len(s) > 0 for s in per_rank)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [4, 5])
def test_eval_every_sample_exactly_once_over_two_ranks(shards, backend, batch_size):
    cfg = _cfg(shards, backend, batch_size=batch_size)
    seen = []
    for rank in range(2):
        loader = make_loader(cfg, "val", rank, 2, "cpu")
        xs, ys = _epoch(loader)
        assert len(ys) == len(loader) and loader.num_samples == sum(y.shape[0] for y in ys)
        assert all(y.shape[0] == batch_size for y in ys[:-1])
        px = _pixels(torch.cat(xs), cfg)
        labels = torch.cat(ys).tolist()
        assert [level_to_label(float(v)) for v in px[:, 0].mean(dim=(1, 2))] == labels
        seen += labels
    assert sorted(seen) == list(range(VAL)), "union = all keys, no duplicates"
    assert len(seen) == VAL


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_reproducible(shards, backend):
    cfg = _cfg(shards, backend)
    a = make_loader(cfg, "train", 0, 1, "cpu")
    b = make_loader(cfg, "train", 0, 1, "cpu")
    a.set_epoch(3)
    b.set_epoch(3)
    (xa, ya), (xb, yb) = (_epoch(a), _epoch(b))
    assert [y.tolist() for y in ya] == [y.tolist() for y in yb]
    torch.testing.assert_close(torch.cat(xa), torch.cat(xb), rtol=0, atol=0)
    b.set_epoch(4)
    _, yc = _epoch(b)
    assert [y.tolist() for y in yc] != [y.tolist() for y in ya]


def test_backends_same_format_and_values(shards):
    outs = {}
    for backend in BACKENDS:
        cfg = _cfg(shards, backend, batch_size=7)
        xs, ys = _epoch(make_loader(cfg, "val", 0, 1, "cpu"))
        outs[backend] = (torch.cat(xs), torch.cat(ys))
    (xd, yd), (xt, yt) = outs["dali"], outs["torch"]
    assert xd.shape == xt.shape == (VAL, 3, 80, 80) and xd.dtype == xt.dtype == torch.float32
    assert yd.dtype == yt.dtype == torch.int64 and yd.tolist() == yt.tolist() == list(range(VAL))
    assert xd.device.type == xt.device.type == "cpu"
    # same eval transform: pixel values agree up to resampler differences
    diff = (_pixels(xd, _cfg(shards, "dali")) - _pixels(xt, _cfg(shards, "torch"))).abs()
    assert float(diff.mean()) < 0.5 and float(diff.max()) <= 3.0  # measured: 0.1 and 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_dtype_and_inception_range(shards, backend):
    cfg = _cfg(shards, backend, layout="NHWC", dtype="float16", normalization="inception", batch_size=8)
    x, y = next(iter(make_loader(cfg, "train", 0, 1, "cpu")))
    # NHWC: an NCHW-shaped view of channels-last memory, what channels_last convolutions read as is
    assert x.shape == (8, 3, 80, 80) and x.dtype == torch.float16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert -1.0 <= float(x.min()) < -0.5 and 0.5 < float(x.max()) <= 1.0
    ref, _ = next(iter(make_loader(replace(cfg, layout="NCHW"), "train", 0, 1, "cpu")))
    assert ref.is_contiguous() and torch.equal(ref, x)  # same values, other memory order


def test_loader_metadata_and_errors(shards):
    cfg = _cfg(shards, "dali")
    loader = make_loader(cfg, "val", 0, 1, "cpu")
    assert loader.class_names == [f"class{c:02d}" for c in range(CLASSES)]
    with pytest.raises(Exception, match="split 'test' is not in the manifest"):
        make_loader(cfg, "test", 0, 1, "cpu")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        make_loader(cfg, "val", 2, 2, "cpu")
    too_few = r"45 usable samples: fewer than one global batch \(32 x 2 rank\(s\) = 64\)"
    with pytest.raises(Exception, match=too_few):
        make_loader(_cfg(shards, "dali", batch_size=32), "train", 0, 2, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_requested_without_cuda_is_a_clear_error(shards, backend):
    with pytest.raises(RuntimeError, match="CUDA is not available on this machine; pass device='cpu'"):
        make_loader(_cfg(shards, backend), "train", 0, 1, "cuda")


def test_torch_random_crop_box_follows_dali_distributions():
    import math
    import random

    from pipeline.augment import random_crop_box

    rng = random.Random(0)
    boxes = [random_crop_box(rng, 375, 500, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
    area = [h * w / (375 * 500) for _, _, h, w in boxes]
    log_aspect = [math.log(w / h) for _, _, h, w in boxes if h * w < 375 * 375]  # not fallback squares
    assert 0.075 <= min(area) and max(area) <= 1.0
    assert all(math.log(3 / 4) - 0.02 <= a <= math.log(4 / 3) + 0.02 for a in log_aspect)
    assert abs(sum(log_aspect) / len(log_aspect)) < 0.02  # log-uniform: symmetric around 1:1
    # no window fits 10 times: DALI's fallback, the centred square of the shorter side
    assert random_crop_box(rng, 100, 300, (0.9, 1.0), (5.0, 6.0)) == (0, 100, 100, 100)


@pytest.mark.gpu
@pytest.mark.parametrize("crops", [1, 10])
def test_gpu_mixed_decoding_matches_cpu(shards, crops):
    cfg = _cfg(shards, "dali")
    xs, ys = _epoch(make_loader(cfg, "train", 0, 1, "cuda"))
    assert all(x.is_cuda and x.shape == (4, 3, 80, 80) for x in xs) and all(y.is_cuda for y in ys)
    px = _pixels(torch.cat(xs).cpu(), cfg)
    assert [level_to_label(float(v)) for v in px[:, 0].mean(dim=(1, 2))] == torch.cat(ys).cpu().tolist()
    xc, yc = _epoch(make_loader(cfg, "train", 0, 1, "cpu"))  # same order, same windows and mirrors
    assert torch.cat(yc).tolist() == torch.cat(ys).cpu().tolist()
    assert float((px - _pixels(torch.cat(xc), cfg)).abs().mean()) < 3.0
    gpu = make_multicrop_loader(cfg, "val", crops, 0, 1, "cuda:0")
    cpu = make_multicrop_loader(cfg, "val", crops, 0, 1, "cpu")
    for (xg, yg), (xc, yc) in zip(gpu, cpu, strict=True):
        assert yg.cpu().tolist() == yc.tolist()
        assert float((xg.cpu() - xc).abs().mean()) < 0.05  # nvJPEG vs libjpeg-turbo IDCT rounding


def test_eval_pipeline_built_once_and_reset_per_pass(shards):
    """Validating raw and EMA weights every epoch reuses one DALI pipeline per loader (reset per pass,
    each pass the same samples); an abandoned pass makes the next one build afresh."""
    cfg = _cfg(shards, "dali")
    loader = make_loader(cfg, "val", 1, 2, "cpu")  # rank 1 of 2: samples [10, 21) of 21
    passes = [_epoch(loader) for _ in range(3)]
    labels = [torch.cat(ys).tolist() for _, ys in passes]
    assert labels == [list(range(10, 21))] * 3 and loader.builds == 1
    assert all(torch.equal(torch.cat(passes[0][0]), torch.cat(xs)) for xs, _ in passes[1:])
    next(iter(loader))  # an abandoned pass cannot be reset: the next one is built afresh, complete
    xs, ys = _epoch(loader)
    assert torch.cat(ys).tolist() == list(range(10, 21)) and loader.builds == 2
    train = make_loader(cfg, "train", 0, 1, "cpu")
    for epoch in range(2):
        train.set_epoch(epoch)
        _epoch(train)
    assert train.builds == 1  # nothing in the graph follows the epoch: crops come with each batch


def test_backends_cut_the_same_training_crops(shards):
    """Both backends read the same order and cut the same window, mirror included, at each position:
    their training batches agree to within interpolation and IDCT rounding."""
    out = {}
    for backend in BACKENDS:
        loader = make_loader(_cfg(shards, backend), "train", 1, 2, "cpu")
        loader.set_epoch(3)
        xs, ys = _epoch(loader)
        out[backend] = (_pixels(torch.cat(xs), _cfg(shards, backend)), torch.cat(ys))
    (xd, yd), (xt, yt) = out["dali"], out["torch"]
    assert yd.tolist() == yt.tolist() and len(yd) == (TRAIN // 8) * 4
    diff = (xd - xt).abs().mean(dim=(1, 2, 3))
    assert float(diff.max()) < 6.0, diff  # in [0, 255] units; a different window or mirror gives > 20


def test_dropped_dali_loader_is_freed_without_the_garbage_collector(shards):
    """The pipeline holds its feeder; a feeder holding its loader strongly made a reference cycle that
    kept DALI's and torch's (GPU) buffers alive until a collection ran (seen as a CUDA out-of-memory
    in a later evaluation)."""
    import gc
    import weakref

    loader = make_loader(_cfg(shards, "dali"), "train", 0, 1, "cpu")
    _epoch(loader)
    ref = weakref.ref(loader)
    gc.disable()
    try:
        del loader
        assert ref() is None
    finally:
        gc.enable()


def test_color_distortion_dali_matches_the_reference():
    """DALI's brightness_contrast + hsv(saturation) against ``distort_color`` on a colourful image:
    the same pixels to within rounding, and a brightness shift that clamps at 0 and 255."""
    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from pipeline.augment import distort_color

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    cases = [(20.0, 1.4), (-31.0, 0.6), (5.5, 1.0), (32.0, 0.5)]

    @pipeline_def(batch_size=len(cases), num_threads=1, device_id=None)
    def pipe():
        images = fn.external_source(source=lambda: [image] * len(cases), batch=True, layout="HWC")
        b = fn.external_source(source=lambda: [np.float32(c[0] / 255) for c in cases], batch=True)
        s = fn.external_source(source=lambda: [np.float32(c[1]) for c in cases], batch=True)
        return fn.hsv(fn.brightness_contrast(images, brightness_shift=b), saturation=s, dtype=types.UINT8)

    p = pipe()
    p.build()
    (out,) = p.run()
    for i, (b, s) in enumerate(cases):
        got = np.array(out[i]).astype(int)
        want = distort_color(image, b, s).astype(int)
        assert np.abs(got - want).max() <= 2, (b, s, np.abs(got - want).max())
    assert distort_color(np.full((1, 1, 3), 250, np.uint8), 32.0, 1.0).tolist() == [[[255, 255, 255]]]


def test_color_distortion_is_the_same_in_both_backends(shards):
    out = {}
    for backend in BACKENDS:
        cfg = _cfg(shards, backend, color_distortion=True)
        loader = make_loader(cfg, "train", 0, 1, "cpu")
        loader.set_epoch(2)
        xs, ys = _epoch(loader)
        out[backend] = (_pixels(torch.cat(xs), cfg), torch.cat(ys))
    plain = make_loader(_cfg(shards, "dali"), "train", 0, 1, "cpu")
    plain.set_epoch(2)
    px_plain = _pixels(torch.cat(_epoch(plain)[0]), _cfg(shards, "dali"))
    (xd, yd), (xt, yt) = out["dali"], out["torch"]
    assert yd.tolist() == yt.tolist()
    assert float((xd - xt).abs().mean(dim=(1, 2, 3)).max()) < 6.0
    shift = (xd - px_plain).abs().mean(dim=(1, 2, 3))
    assert float(shift.min()) > 1.0  # every image's colours changed


def test_color_params_follow_tf_slim_ranges():
    from pipeline.augment import color_params

    draws = [color_params(0, 1, p) for p in range(2000)]
    assert all(-32 <= b <= 32 and 0.5 <= s <= 1.5 for b, s in draws)
    assert min(b for b, _ in draws) < -30 and max(b for b, _ in draws) > 30
    assert color_params(0, 1, 7) == color_params(0, 1, 7) != color_params(0, 2, 7)
