"""DALI pipeline definitions of the read side: one ``@pipeline_def`` per mode (train, eval,
multi-crop), each fed by ``fn.external_source`` with the JPEG bytes that ``pipeline.dali_loader``
reads by offset from the tars in the order of ``pipeline.order`` (and, in training, each
sample's crop window and mirror flag, which are functions of its position in that order).

Library module, no CLI (``pipeline.dali_loader`` builds and iterates these; the benchmark
``python -m benchmarks.bench_loader`` times them). Imports DALI at import time.

Device placement: ``decoder_device="mixed"`` decodes with nvJPEG (and the hardware JPEG decoder
where the GPU has one, ``hw_decoder_load``) and runs the rest on the GPU; ``"cpu"`` runs every
operator on the CPU, for pipelines built with ``device_id=None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from pipeline.multicrop import CropWindow

# DALI's ResNet-50 example (DeepLearningExamples ConvNets): pre-size nvJPEG buffers for ImageNet's
# largest images so the first epochs do not reallocate. hw_decoder_load: share of the JPEGs sent
# to the A100/H100 hardware decoder (0.65 is DALI's documented default for decoders.image*).
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512
# Same example: the hardware decoder's buffers sized for ImageNet's largest image (5980 x 6430), so
# that it never reallocates mid-epoch.
PREALLOCATE_WIDTH_HINT = 5980
PREALLOCATE_HEIGHT_HINT = 6430
HW_DECODER_LOAD = 0.65


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a pipeline function needs; built by ``pipeline.dali_loader`` from a DataConfig."""

    decoder_device: str  # "mixed" | "cpu"
    image_size: int
    val_resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str  # "NCHW" | "NHWC" (resolved: never "auto")
    half: bool  # float16 output instead of float32
    windows: tuple[CropWindow, ...] = ()  # multi-crop windows to cut (mirrors are added by the loader)
    color: bool = False  # training colour distortion (brightness shift, saturation) from the feeder
    preallocate: bool = True  # "mixed": pre-size decoder buffers (DataConfig.dali_preallocate)


def decoder_args(spec: PipelineSpec) -> dict:
    """Keyword arguments of every DALI image decoder of ``spec``: the hardware-decoder share and the
    pre-sized nvJPEG buffers on "mixed", nothing on the CPU."""
    extra = {}
    if spec.decoder_device == "mixed":
        extra["hw_decoder_load"] = HW_DECODER_LOAD
        if spec.preallocate:
            extra.update(
                device_memory_padding=DEVICE_MEMORY_PADDING,
                host_memory_padding=HOST_MEMORY_PADDING,
                preallocate_width_hint=PREALLOCATE_WIDTH_HINT,
                preallocate_height_hint=PREALLOCATE_HEIGHT_HINT,
            )
    return extra


def train_images(jpegs, anchor, shape, mirror, spec: PipelineSpec, brightness=None, saturation=None):
    """The training transform with its random parameters given per sample (``pipeline.augment.crop_params``):
    decode only the crop window (ROI decode, as ``image_random_crop`` does), resize it to S x S,
    mirror, normalise."""
    images = fn.decoders.image_slice(
        jpegs,
        anchor,
        shape,
        device=spec.decoder_device,
        output_type=types.RGB,
        axis_names="WH",
        normalized_anchor=False,
        normalized_shape=False,
        **decoder_args(spec),
    )
    s = spec.image_size
    images = fn.resize(images, size=(s, s))
    if brightness is not None:  # TF-slim's fast-mode distort_color: brightness, then saturation
        images = fn.brightness_contrast(images, brightness_shift=brightness)
        images = fn.hsv(images, saturation=saturation)
    return normalize(images, spec, mirror=mirror)


def _decode(jpegs, spec: PipelineSpec):
    return fn.decoders.image(jpegs, device=spec.decoder_device, output_type=types.RGB, **decoder_args(spec))


def normalize(images, spec: PipelineSpec, mirror=None, sequence: bool = False):
    """Mirror (per sample, when given), subtract the mean, divide by the std, write ``spec.layout``
    (``sequence``: a stack of crops, with a leading ``F`` axis) in float32 or float16."""
    layout = "CHW" if spec.layout == "NCHW" else "HWC"
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if spec.half else types.FLOAT,
        output_layout=("F" + layout) if sequence else layout,
        mean=list(spec.mean),
        std=list(spec.std),
        mirror=mirror if mirror is not None else 0,
    )


def _cut(resized, window: CropWindow, image_size: int):
    region = resized
    if window.square_pos is not None:
        s = window.shorter  # the square along the longer side; the other position has no slack
        region = fn.crop(region, crop=(s, s), crop_pos_x=window.square_pos, crop_pos_y=window.square_pos)
    if window.crop is None:
        return fn.resize(region, size=(image_size, image_size))
    return fn.crop(
        region, crop=(window.crop, window.crop), crop_pos_x=window.pos[0], crop_pos_y=window.pos[1]
    )


def eval_images(jpegs, spec: PipelineSpec, mode: str):
    """eval: resize the shorter side to ``val_resize``, centre crop S, normalise. multicrop: cut
    ``spec.windows`` (resize per scale, crop per window) and stack them as a sequence [K, ...]."""
    s = spec.image_size
    images = _decode(jpegs, spec)
    if mode == "eval":
        images = fn.resize(images, resize_shorter=spec.val_resize)
        return normalize(fn.crop(images, crop=(s, s)), spec)
    by_scale = {}
    crops = []
    for window in spec.windows:
        if window.shorter not in by_scale:
            by_scale[window.shorter] = fn.resize(images, resize_shorter=window.shorter)
        crops.append(_cut(by_scale[window.shorter], window, s))
    stacked = (
        fn.stack(*crops, axis=0, axis_name="F")
        if len(crops) > 1
        else fn.expand_dims(crops[0], axes=[0], new_axis_names="F")
    )
    return normalize(stacked, spec, sequence=True)


@pipeline_def
def train_pipeline(spec: PipelineSpec, source):
    """``source()``: per batch, (JPEG bytes, crop anchors (x, y), crop shapes (w, h), mirror flags)
    and, with ``spec.color``, (brightness shifts as fractions of 255, saturation factors)."""
    outputs = fn.external_source(
        source=source,
        num_outputs=6 if spec.color else 4,
        batch=True,
        no_copy=True,  # the arrays wrap the bytes read for the batch, kept alive by the feeder
        dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32] + [types.FLOAT] * (2 if spec.color else 0),
    )
    return train_images(*outputs[:4], spec, *outputs[4:])


@pipeline_def
def eval_pipeline(spec: PipelineSpec, source):
    """``source()``: per batch, the JPEG bytes."""
    jpegs = fn.external_source(source=source, batch=True, no_copy=True, dtype=types.UINT8)
    return eval_images(jpegs, spec, "eval")


@pipeline_def
def multicrop_pipeline(spec: PipelineSpec, source):
    jpegs = fn.external_source(source=source, batch=True, no_copy=True, dtype=types.UINT8)
    return eval_images(jpegs, spec, "multicrop")


@pipeline_def
def decode_check_pipeline(source):
    """One JPEG per run, decoded on the CPU: finds the sample a failed batch choked on."""
    jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
