"""Crop geometry of ``pipeline.multicrop`` (exact boxes, counts, mirrors) and ``preprocess_images``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import NORMALIZATIONS, DataConfig
from pipeline.multicrop import (
    Box,
    CropWindow,
    apply_plan,
    crop_plan,
    googlenet_scales,
    preprocess_images,
    resized_shape,
    unmirrored,
    window_box,
)
from tests.pipeline.shard_fixtures import coded_image, encode_jpeg, label_level


def test_googlenet_scales_adapted_to_299():
    assert googlenet_scales(224) == (256, 288, 320, 352)
    assert googlenet_scales(299) == (342, 384, 427, 470)  # 256*299/224 = 341.7 ...


@pytest.mark.parametrize("crops", [1, 10, 144])
def test_plan_counts_and_mirror_pairs(crops):
    plan = crop_plan(crops, 299, 342)
    assert len(plan) == crops
    if crops == 1:
        assert plan == (CropWindow(342, None, (0.5, 0.5), 299),)
        return
    assert len(unmirrored(plan)) == crops // 2
    for a, b in zip(plan[0::2], plan[1::2], strict=True):
        assert not a.mirror and b.mirror
        assert (a.shorter, a.square_pos, a.pos, a.crop) == (b.shorter, b.square_pos, b.pos, b.crop)


def test_144_plan_structure():
    plan = unmirrored(crop_plan(144, 299, 342))
    assert sorted({w.shorter for w in plan}) == [342, 384, 427, 470]
    assert {w.square_pos for w in plan} == {0.0, 0.5, 1.0}
    per_square = [w for w in plan if w.shorter == 384 and w.square_pos == 1.0]
    assert [(w.pos, w.crop) for w in per_square] == [
        ((0.0, 0.0), 299),
        ((1.0, 0.0), 299),
        ((0.0, 1.0), 299),
        ((1.0, 1.0), 299),
        ((0.5, 0.5), 299),
        ((0.5, 0.5), None),  # the whole square resized to 299
    ]


def test_resized_shape_rounds_like_dali():
    assert resized_shape(375, 500, 342) == (342, 456)  # 500*342/375 = 456.0
    assert resized_shape(500, 375, 342) == (456, 342)
    assert resized_shape(100, 150, 91) == (91, 137)  # 136.5 -> 137: half away from zero, as DALI
    assert resized_shape(4, 6, 3) == (3, 5)  # 4.5 -> 5 (Python's round() would give 4)


def test_ten_crop_boxes_exact():
    plan = unmirrored(crop_plan(10, 299, 342))
    boxes = [window_box(w, 375, 500) for w in plan]
    assert all(shape == (342, 456) for shape, _ in boxes)
    assert [b for _, b in boxes] == [
        Box(0, 0, 299, 299),
        Box(0, 157, 299, 299),
        Box(43, 0, 299, 299),
        Box(43, 157, 299, 299),
        Box(22, 79, 299, 299),  # centre: round(21.5)=22, round(78.5)=79
    ]


def test_144_square_boxes_landscape_and_portrait():
    right_square_corner = CropWindow(470, 1.0, (1.0, 1.0), 299)
    assert window_box(right_square_corner, 375, 500) == ((470, 627), Box(171, 157 + 171, 299, 299))
    whole_bottom_square = CropWindow(342, 1.0, (0.5, 0.5), None)
    assert window_box(whole_bottom_square, 500, 375) == ((456, 342), Box(114, 0, 342, 342))
    with pytest.raises(ValueError, match="does not fit"):
        window_box(CropWindow(100, None, (0.5, 0.5), 299), 375, 500)


def test_apply_plan_mirrors_and_positions():
    img = Image.fromarray(coded_image(3, 120, 160))
    crops = apply_plan(img, crop_plan(10, 80, 90), 80)
    assert crops.shape == (10, 80, 80, 3)
    for k in range(0, 10, 2):
        np.testing.assert_array_equal(crops[k + 1], crops[k][:, ::-1])
        green = crops[k][..., 1].astype(float).mean(axis=0)
        assert green[-1] > green[0] + 50  # unmirrored: ramp increases left to right
    assert abs(crops[..., 0].astype(float).mean() - label_level(3)) < 2
    # top-left crop sees the image's left/top edge, bottom-right its right/bottom edge
    assert crops[0][0, 0, 1] < 5 and crops[0][0, 0, 2] < 5
    assert crops[6][-1, -1, 1] > 250 and crops[6][-1, -1, 2] > 250


def test_preprocess_images_bytes_and_arrays_agree():
    cfg = DataConfig(image_size=80, val_resize=90)
    arr = coded_image(5, 100, 130)
    # an array and its lossless PNG bytes go through the same geometry and normalisation
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = preprocess_images([arr, buf.getvalue(), encode_jpeg(arr)], crops=10, cfg=cfg)
    assert out.shape == (30, 3, 80, 80) and out.dtype == torch.float32
    torch.testing.assert_close(out[:10], out[10:20])
    mean, std = NORMALIZATIONS["imagenet"]
    red = out[:, 0] * std[0] + mean[0]
    assert torch.allclose(red.mean(dim=(1, 2)), torch.full((30,), float(label_level(5))), atol=2.0)
    torch.testing.assert_close(out[1], out[0].flip(-1))


def test_preprocess_images_layout_dtype_and_inception_range():
    cfg = DataConfig(image_size=80, val_resize=90, layout="NHWC", dtype="float16", normalization="inception")
    out = preprocess_images([coded_image(0, 90, 90)], crops=1, cfg=cfg)
    assert out.shape == (1, 3, 80, 80) and out.dtype == torch.float16
    assert out.is_contiguous(memory_format=torch.channels_last)  # NHWC memory, NCHW shape
    assert -1.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_preprocess_images_names_the_bad_input():
    cfg = DataConfig(image_size=80, val_resize=90)
    good = encode_jpeg(coded_image(1, 90, 90))
    with pytest.raises(ValueError, match=r"images\[1\] is not a decodable image"):
        preprocess_images([good, b"not an image"], crops=1, cfg=cfg)
    with pytest.raises(ValueError, match=r"images\[0\] must be an HxWx3 uint8 array"):
        preprocess_images([np.zeros((4, 4), np.uint8)], crops=1, cfg=cfg)
    with pytest.raises(ValueError, match="crops must be one of"):
        preprocess_images([good], crops=5, cfg=cfg)
