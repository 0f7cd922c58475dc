"""DALI pipeline definitions of the read side: one ``@pipeline_def`` per split (train, eval,
multi-crop) sharing one reader and one image-processing function.

Library module, no CLI (``pipeline.dali_loader`` builds and iterates these; the benchmark
``python -m ops.benchmarks.bench_loader`` times them). Imports DALI at import time.

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

READER_NAME = "Reader"  # tied to DALIGenericIterator(reader_name=...)
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
NUM_CROP_ATTEMPTS = 10  # DALI's default for image_random_crop; the torch backend uses the same count


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a pipeline function needs; built by ``pipeline.dali_loader`` from a DataConfig."""

    tars: tuple[str, ...]
    indices: tuple[str, ...]
    shard_id: int
    num_shards: int
    decoder_device: str  # "mixed" | "cpu"
    image_size: int
    val_resize: int
    crop_area: tuple[float, float]
    crop_aspect: tuple[float, float]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str  # "NCHW" | "NHWC" (resolved: never "auto")
    half: bool  # float16 output instead of float32
    shuffle_buffer: int
    windows: tuple[CropWindow, ...] = ()  # multi-crop windows to cut (mirrors are added by the loader)
    preallocate: bool = True  # "mixed": pre-size decoder buffers (DataConfig.dali_preallocate)


def read_samples(spec: PipelineSpec, train: bool):
    """``(jpeg bytes, int32 label)``; eval pads its shard's tail so the iterator can trim exactly.

    Eval sticks to its shard (``stick_to_shard``): the loader keeps an eval pipeline for the whole run
    and resets it per pass, and DALI's default would move a kept reader to the next shard each epoch.
    A train pipeline is built per epoch at the epoch's shard, so the setting does not matter there."""
    jpegs, labels = fn.readers.webdataset(
        paths=list(spec.tars),
        index_paths=list(spec.indices),
        ext=["jpg", "lbl"],
        dtypes=[types.UINT8, types.INT32],
        shard_id=spec.shard_id,
        num_shards=spec.num_shards,
        random_shuffle=train,
        initial_fill=spec.shuffle_buffer,
        pad_last_batch=not train,
        stick_to_shard=not train,
        missing_component_behavior="error",
        name=READER_NAME,
    )
    return jpegs, labels


def _decode(jpegs, spec: PipelineSpec, train: bool):
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
    if train:
        return fn.decoders.image_random_crop(
            jpegs,
            device=spec.decoder_device,
            output_type=types.RGB,
            random_area=list(spec.crop_area),
            random_aspect_ratio=list(spec.crop_aspect),
            num_attempts=NUM_CROP_ATTEMPTS,
            **extra,
        )
    return fn.decoders.image(jpegs, device=spec.decoder_device, output_type=types.RGB, **extra)


def _normalize(images, spec: PipelineSpec, mirror=None, sequence: bool = False):
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


def process_images(jpegs, spec: PipelineSpec, mode: str):
    """The one image-processing function: ``mode`` is "train", "eval" or "multicrop".

    train: fused decode + random-sized crop (area/aspect from the config), resize to S x S,
    random mirror, normalise. eval: resize the shorter side to ``val_resize``, centre crop S,
    normalise. multicrop: cut ``spec.windows`` (resize per scale, crop per window) and stack
    them as a sequence [K, ...] per image."""
    s = spec.image_size
    images = _decode(jpegs, spec, train=mode == "train")
    if mode == "train":
        images = fn.resize(images, size=(s, s))
        return _normalize(images, spec, mirror=fn.random.coin_flip(probability=0.5))
    if mode == "eval":
        images = fn.resize(images, resize_shorter=spec.val_resize)
        return _normalize(fn.crop(images, crop=(s, s)), spec)
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
    return _normalize(stacked, spec, sequence=True)


@pipeline_def
def train_pipeline(spec: PipelineSpec):
    jpegs, labels = read_samples(spec, train=True)
    return process_images(jpegs, spec, "train"), labels


@pipeline_def
def eval_pipeline(spec: PipelineSpec):
    jpegs, labels = read_samples(spec, train=False)
    return process_images(jpegs, spec, "eval"), labels


@pipeline_def
def multicrop_pipeline(spec: PipelineSpec):
    jpegs, labels = read_samples(spec, train=False)
    return process_images(jpegs, spec, "multicrop"), labels


@pipeline_def
def decode_check_pipeline(spec: PipelineSpec):
    """Unshuffled decode-only pass over a shard, used to find the sample a failed batch choked on."""
    jpegs, labels = read_samples(spec, train=False)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels


@pipeline_def
def raw_train_pipeline(spec: PipelineSpec):
    """DALI's bare ``image_random_crop`` + resize, no normalisation or wrapper: the benchmark's ceiling."""
    jpegs, labels = read_samples(spec, train=True)
    images = _decode(jpegs, spec, train=True)
    return fn.resize(images, size=(spec.image_size, spec.image_size)), labels
