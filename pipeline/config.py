"""Typed configuration of the read side (``pipeline.make_loader``); part of the training config."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.storage import StorageOptions

# ImageNet statistics in [0, 255] units (torchvision/timm "imagenet" normalisation).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Inception weights trained in TensorFlow expect x / 127.5 - 1, i.e. [-1, 1].
INCEPTION_MEAN = (127.5, 127.5, 127.5)
INCEPTION_STD = (127.5, 127.5, 127.5)

NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD)}
LAYOUTS = ("auto", "NCHW", "NHWC")


def resolve_layout(layout: str, device_type: str) -> str:
    """``data.layout`` for a device: "auto" is NHWC (channels-last memory) on CUDA, NCHW on CPU."""
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout: invalid value {layout!r}")
    if layout == "auto":
        return "NHWC" if device_type == "cuda" else "NCHW"
    return layout


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # shard folder made by build-shards (absolute after config resolution)
    train_split: str = "train"
    val_split: str = "val"
    backend: str = "dali"  # "dali" (GPU "mixed" decode where CUDA is present, CPU otherwise) | "torch"
    batch_size: int = 32  # per replica; paper: 32 per replica (§8)
    image_size: int = 299  # paper's input resolution
    val_resize: int = 342  # shorter side before the centre crop (299 / 0.875, as torchvision/timm)
    crop_area: tuple[float, float] = (0.08, 1.0)  # GoogLeNet/Inception random-sized crop (area fraction)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of that crop
    # Training colour distortion as TF-slim's inception_preprocessing (fast mode, its default): a
    # random brightness shift of up to +-32/255, then a random saturation factor in [0.5, 1.5]
    color_distortion: bool = False
    normalization: str = "imagenet"  # "imagenet" mean/std | "inception" ([-1, 1], TF-trained weights)
    # Memory order of the [B, 3, S, S] batches: "NHWC" hands over channels-last memory (DALI writes HWC;
    # the batch is an NCHW-shaped view of it, what channels_last convolutions read without a copy),
    # "NCHW" contiguous memory; "auto": NHWC on CUDA, NCHW on CPU.
    layout: str = "auto"
    dtype: str = "float32"  # "float32" | "float16" (half the bytes; the loop casts up when AMP is off)
    num_threads: int = 2  # DALI CPU threads / DataLoader workers per rank
    prefetch: int = 2  # batches prepared ahead (DALI prefetch_queue_depth)
    seed: int = 0  # the epoch's sample order and every crop/mirror are functions of (seed, epoch, position)
    # Undecodable samples found at read time: false = a named error; true = quarantine them (named once,
    # replaced in their batch by a deterministic substitute, left out of later epochs, kept in checkpoints)
    skip_corrupt: bool = False
    # Tars a reader keeps open at once (the least recently used is closed first): bounded, so that
    # ImageNet's 12,800 shards never exhaust a process's open files (each DataLoader worker has its own)
    open_shards: int = 32
    # Each tar's sha256 against the manifest, the first time a node reads it, in a background thread
    # (pipeline.checksums; sizes are always checked at start): a changed shard fails with its name
    verify_sha256: bool = True
    # >0: a fixed global batch; each rank's batch is global_batch / world_size (batch_size is then
    # ignored), so a resume with another number of workers continues the same schedule exactly
    global_batch: int = 0
    # GPU ("mixed") decoding: size nvJPEG's and the hardware decoder's buffers up front for ImageNet's
    # largest image (DALI's ResNet-50 example) so that no epoch reallocates; off for small images,
    # where those buffers only cost memory and pipeline build time.
    dali_preallocate: bool = True
    # Shards on object storage (data.shards=s3://bucket/prefix; pipeline.storage, pipeline.shard_cache):
    # explicit endpoint/region/profile (credentials only from the environment or an AWS profile)
    storage_options: StorageOptions = field(default_factory=StorageOptions)
    # the node-local cache of whole shards, shared by the node's ranks ("": a folder under the temp dir)
    cache_dir: str = ""
    # its byte budget (0: 80% of the cache folder's free space); must hold the largest shard
    cache_bytes: int = 0
    # whole shards are fetched ahead for the next cache_ahead_steps global steps (0: none ahead; then
    # only the range reads of each batch)
    cache_ahead_steps: int = 64
    # eviction: "fnu" (furthest next use, from the order) | "lru" (least recently used: what other
    # loaders' caches do; kept for benchmarks/bench_s3.py's comparison)
    cache_policy: str = "fnu"

    def __post_init__(self) -> None:
        if isinstance(self.storage_options, dict):  # DataConfig(storage_options={...}) in code
            object.__setattr__(self, "storage_options", StorageOptions(**self.storage_options))
        checks = {
            "backend": self.backend in ("dali", "torch"),
            "normalization": self.normalization in NORMALIZATIONS,
            "layout": self.layout in LAYOUTS,
            "dtype": self.dtype in ("float32", "float16"),
            "batch_size": self.batch_size >= 1,
            "image_size": self.image_size >= 75,
            "val_resize": self.val_resize >= self.image_size,
            "num_threads": self.num_threads >= 1,
            "prefetch": self.prefetch >= 1,
            "open_shards": self.open_shards >= 1,
            "global_batch": self.global_batch >= 0,
            "cache_bytes": self.cache_bytes >= 0,
            "cache_ahead_steps": self.cache_ahead_steps >= 0,
            "cache_policy": self.cache_policy in ("fnu", "lru"),
            "crop_area": 0 < self.crop_area[0] <= self.crop_area[1] <= 1,
            "crop_aspect": 0 < self.crop_aspect[0] <= self.crop_aspect[1],
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"data.{bad[0]}: invalid value {getattr(self, bad[0])!r}")
