"""Multi-crop evaluation geometry, shared by the DALI pipelines, the torch loader and
``preprocess_images`` (in-memory images for registry predict / serving).

Library module, no CLI. One plan (``crop_plan``) lists the crop windows of an image; each backend
applies it the same way:

- ``K = 1``: resize the shorter side to ``val_resize``, centre crop ``image_size`` (the eval transform).
- ``K = 10``: resize the shorter side to ``val_resize``; 4 corners + centre at ``image_size``;
  each followed by its mirror (the AlexNet/ResNet "10-crop").
- ``K = 144``: GoogLeNet (Szegedy et al. 2014, §6): 4 scales of the shorter side x 3 squares
  (left/centre/right, or top/centre/bottom for portrait images) x 6 crops (4 corners + centre at
  ``image_size``, and the whole square resized to ``image_size``) x 2 mirrors. GoogLeNet used
  shorter sides 256/288/320/352 for 224 inputs; we scale them by ``image_size / 224``
  (299 -> 342/384/427/470).

Windows are given as relative positions so DALI's ``fn.crop(crop_pos_x, crop_pos_y)`` can apply
them per sample; ``window_box`` turns them into pixel boxes with DALI's own arithmetic (anchor =
round-half-away(pos * (in - crop)); resized long side = round(long * shorter / short)), which the
torch/Pillow path uses, so both backends cut the same pixels. Resizes are antialiased bilinear in
both (Pillow's BILINEAR filter widens with the scale factor, like DALI's default linear+antialias).
A mirror flips the crop left-right; crops of image ``i`` are rows ``i*K:(i+1)*K``, in plan order.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import NORMALIZATIONS, DataConfig, resolve_layout

SUPPORTED_CROPS = (1, 10, 144)  # paper §8 / Tables 4-5: single crop, 10 crops, 144 crops
GOOGLENET_SCALES = (256, 288, 320, 352)  # GoogLeNet §6 shorter sides, for 224x224 inputs
GOOGLENET_INPUT = 224
CORNERS_AND_CENTRE = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
SQUARE_POSITIONS = (0.0, 0.5, 1.0)  # left/centre/right (top/centre/bottom when portrait)


@dataclass(frozen=True)
class CropWindow:
    """One crop: resize the shorter side to ``shorter``; optionally take the ``shorter`` x ``shorter``
    square at relative position ``square_pos`` along the longer side; then cut ``crop`` x ``crop`` at
    relative ``pos`` = (x, y) in it, or resize the whole square when ``crop`` is None; flip if ``mirror``."""

    shorter: int
    square_pos: float | None
    pos: tuple[float, float]
    crop: int | None
    mirror: bool = False


def googlenet_scales(image_size: int) -> tuple[int, ...]:
    return tuple(round(s * image_size / GOOGLENET_INPUT) for s in GOOGLENET_SCALES)


def crop_plan(crops: int, image_size: int, val_resize: int) -> tuple[CropWindow, ...]:
    """The ``crops`` windows of one image, in output order (each unmirrored window then its mirror)."""
    if crops == 1:
        return (CropWindow(val_resize, None, (0.5, 0.5), image_size),)
    if crops == 10:
        base = [CropWindow(val_resize, None, p, image_size) for p in CORNERS_AND_CENTRE]
    elif crops == 144:
        base = []
        for scale in googlenet_scales(image_size):
            for sq in SQUARE_POSITIONS:
                base += [CropWindow(scale, sq, p, image_size) for p in CORNERS_AND_CENTRE]
                base.append(CropWindow(scale, sq, (0.5, 0.5), None))
    else:
        raise ValueError(f"crops must be one of {SUPPORTED_CROPS}, got {crops}")
    plan = []
    for w in base:
        plan += [w, CropWindow(w.shorter, w.square_pos, w.pos, w.crop, mirror=True)]
    return tuple(plan)


def unmirrored(plan: tuple[CropWindow, ...]) -> tuple[CropWindow, ...]:
    """Windows a backend must cut; the mirrored ones are flips of their predecessor in the plan."""
    return tuple(w for w in plan if not w.mirror)


def round_half_away(x: float) -> int:
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``shorter`` (DALI ``resize_shorter`` rounding)."""
    if height <= width:
        return shorter, round_half_away(width * shorter / height)
    return round_half_away(height * shorter / width), shorter


@dataclass(frozen=True)
class Box:
    top: int
    left: int
    height: int
    width: int


def window_box(window: CropWindow, height: int, width: int) -> tuple[tuple[int, int], Box]:
    """``(resized (h, w), box)`` of ``window`` in the image resized from ``height`` x ``width``."""
    rh, rw = resized_shape(height, width, window.shorter)
    top, left, bh, bw = 0, 0, rh, rw
    if window.square_pos is not None:
        s = window.shorter
        top = round_half_away(window.square_pos * (rh - s))
        left = round_half_away(window.square_pos * (rw - s))
        bh = bw = s
    if window.crop is not None:
        c = window.crop
        if c > bh or c > bw:
            raise ValueError(f"crop {c} does not fit in a {bh}x{bw} region (shorter side {window.shorter})")
        top += round_half_away(window.pos[1] * (bh - c))
        left += round_half_away(window.pos[0] * (bw - c))
        bh = bw = c
    return (rh, rw), Box(top, left, bh, bw)


def apply_plan(image, plan: tuple[CropWindow, ...], image_size: int) -> np.ndarray:
    """Cut the plan's crops from one RGB Pillow image: uint8 [K, S, S, 3] (Pillow, CPU)."""
    from PIL import Image

    out = np.empty((len(plan), image_size, image_size, 3), np.uint8)
    resized: dict[int, Image.Image] = {}
    for k, window in enumerate(plan):
        if window.mirror:
            out[k] = out[k - 1, :, ::-1]
            continue
        (rh, rw), box = window_box(window, image.height, image.width)
        if window.shorter not in resized:
            resized[window.shorter] = image.resize((rw, rh), Image.BILINEAR)
        region = resized[window.shorter].crop((box.left, box.top, box.left + box.width, box.top + box.height))
        if region.size != (image_size, image_size):
            region = region.resize((image_size, image_size), Image.BILINEAR)
        out[k] = np.asarray(region)
    return out


def normalize(
    images: torch.Tensor, cfg: DataConfig, device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> model input [B, 3, H, W]: float (cfg.dtype), (x - mean) / std, on ``device``.

    The result is always NCHW-shaped; with layout NHWC (or "auto" on CUDA) it is a permuted view of
    the channels-last memory (``is_contiguous(memory_format=torch.channels_last)``), with NCHW a
    contiguous tensor."""
    mean, std = NORMALIZATIONS[cfg.normalization]
    x = images.to(device=device, non_blocking=True).float()
    x = (x - torch.tensor(mean, device=x.device)) / torch.tensor(std, device=x.device)
    x = x.to(getattr(torch, cfg.dtype)).permute(0, 3, 1, 2)
    return x.contiguous() if resolve_layout(cfg.layout, x.device.type) == "NCHW" else x


def _to_pil(item, index: int, max_pixels: int | None = None):
    from PIL import Image, ImageOps

    if isinstance(item, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(item)))  # reads the header only
        except Exception as exc:
            raise ValueError(f"images[{index}] is not a decodable image ({type(exc).__name__})") from None
        if max_pixels and img.width * img.height > max_pixels:
            megapixels = img.width * img.height / 1e6
            raise ValueError(
                f"images[{index}] is {img.width}x{img.height} = {megapixels:.1f} megapixels, "
                f"above the limit of {max_pixels / 1e6:.1f}; send a smaller image"
            )
        try:
            img.load()
            # EXIF orientation applied, as build-shards does before any loader sees an image: a phone
            # photo is upright in training, evaluation and serving alike
            img = ImageOps.exif_transpose(img)
        except Exception as exc:
            raise ValueError(f"images[{index}] is not a decodable image ({type(exc).__name__})") from None
        return img.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise ValueError(f"images[{index}] must be an HxWx3 uint8 array, got {item.dtype} {item.shape}")
        return Image.fromarray(item)
    raise ValueError(
        f"images[{index}] must be JPEG/PNG bytes or an HxWx3 uint8 array, got {type(item).__name__}"
    )


def preprocess_images(
    images: list, crops: int, cfg: DataConfig, max_pixels: int | None = None
) -> torch.Tensor:
    """In-memory images (encoded bytes or uint8 HWC arrays) -> ``[N*K, 3, S, S]`` model input (CPU,
    cfg normalization/layout/dtype), with the loaders' crop geometry; crops of image ``i`` at rows
    ``i*K:(i+1)*K``. Raises ValueError naming the index of an input that is not a decodable image."""
    plan = crop_plan(crops, cfg.image_size, cfg.val_resize)
    if not images:
        raise ValueError("preprocess_images: no images given")
    arrays = [apply_plan(_to_pil(item, i, max_pixels), plan, cfg.image_size) for i, item in enumerate(images)]
    batch = torch.from_numpy(np.concatenate(arrays))  # [N*K, S, S, 3] uint8
    return normalize(batch, cfg, "cpu")
