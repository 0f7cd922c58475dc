"""The random parameters of the training transform, as pure functions of ``(data.seed, epoch,
position)``: the crop window, the mirror and the colour distortion of the sample at a position of an
epoch's order are the same on any rank, in any world size, before and after a resume, and in both
backends (DALI gets them through ``external_source``; the Pillow backend applies them itself).

Library module, no CLI. ``distort_color`` is the reference of the colour distortion on one image.
"""

from __future__ import annotations

import math
import random

import numpy as np

NUM_CROP_ATTEMPTS = 10  # DALI's image_random_crop default, kept by both backends


def position_rng(seed: int, epoch: int, position: int) -> random.Random:
    """The random stream of one position of one epoch (crop window, mirror)."""
    return random.Random((int(seed) << 96) ^ (int(epoch) << 48) ^ int(position))


def random_crop_box(
    rng: random.Random, height: int, width: int, area: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-sized crop (GoogLeNet/Inception "RandomResizedCrop"), with the
    distributions of DALI's ``RandomCropGenerator``: area uniform in ``area`` of the image, aspect
    log-uniform in ``aspect``, position uniform, 10 attempts, then the centred square."""
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(NUM_CROP_ATTEMPTS):
        target = rng.uniform(*area) * height * width
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_params(
    seed: int, epoch: int, position: int, height: int, width: int, area, aspect
) -> tuple[int, int, int, int, bool]:
    """``(top, left, h, w, mirror)`` of the training transform at a position of an epoch."""
    rng = position_rng(seed, epoch, position)
    top, left, h, w = random_crop_box(rng, height, width, tuple(area), tuple(aspect))
    return top, left, h, w, rng.random() < 0.5


BRIGHTNESS_DELTA = 32.0  # TF-slim distort_color: random_brightness(max_delta=32. / 255.), in [0, 255] units
SATURATION_RANGE = (0.5, 1.5)  # TF-slim distort_color: random_saturation(lower=0.5, upper=1.5)


def color_params(seed: int, epoch: int, position: int) -> tuple[float, float]:
    """``(brightness shift in [0, 255] units, saturation factor)`` at a position of an epoch: a stream
    of its own, so switching the distortion on leaves every crop and mirror as it was."""
    rng = random.Random((1 << 160) | (int(seed) << 96) ^ (int(epoch) << 48) ^ int(position))
    return rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), rng.uniform(*SATURATION_RANGE)


def distort_color(image: np.ndarray, brightness: float, saturation: float) -> np.ndarray:
    """The reference of the colour distortion on a uint8 HWC image, as DALI computes it: brightness
    shift clamped to [0, 255], then saturation as a blend with the ITU-R 601 luma (DALI's ``hsv``
    works in YIQ, where scaling saturation is exactly that blend; Pillow's ``ImageEnhance.Color``
    too)."""
    x = np.clip(image.astype(np.float32) + brightness, 0, 255).round()
    luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = luma[..., None] + saturation * (x - luma[..., None])
    return np.clip(x, 0, 255).round().astype(np.uint8)
