"""The one definition of the order in which every backend reads a split's samples.

Library module, no CLI. ``pipeline.dali_loader`` and ``pipeline.torch_loader`` both read through
this module; ``pipeline.loader`` only chooses the backend. The samples themselves (table, reader,
quarantine) are ``pipeline.samples``; the random parameters of each position are ``pipeline.augment``.

- ``SampleOrder``: for epoch ``e`` one permutation of all samples, a pure function of
  ``(data.seed, e)`` and the table, independent of the world size; quarantined samples are left out.
  Global step ``t`` consumes positions ``[t*G, (t+1)*G)`` with ``G = batch_size * world_size`` and
  rank ``r`` takes the ``batch_size`` slice ``r`` of it. Training drops the tail that does not fill
  a global batch. Evaluation reads manifest order, rank ``r`` the range ``[n*r//W, n*(r+1)//W)`` of
  the whole split (quarantined samples are left out where read, so no range moves), so every usable
  sample is seen exactly once across ranks. A position in an epoch is the number of
  samples the whole job has consumed, so it survives a change of world size (elastic resume).
- A sample that fails to decode is quarantined (``pipeline.samples.Quarantine``) and replaced in its
  batch by ``SampleOrder.substitute`` (deterministic), so every rank yields the same number of
  batches; later epochs leave it out.
- ``OrderedLoader``: the state both backends' loaders keep (table, quarantine, order, epoch,
  position); crop windows and mirrors come from ``pipeline.augment`` by position.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.augment import color_params, crop_params
from pipeline.checksums import ShardHashCheck, default_marker_dir
from pipeline.samples import (
    CorruptSampleError,
    Quarantine,
    SampleReader,
    SampleTable,
    corrupt_sample_error,
    prepare_table,
)
from pipeline.schema import ShardFormatError

ORDER_STREAM = 0x0D3E  # seed-sequence word that separates the order from other random streams


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of ``range(n)`` for an epoch: a pure function of ``(seed, epoch, n)``."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([ORDER_STREAM, seed, epoch])))
    return rng.permutation(n)


@dataclass(frozen=True)
class Batch:
    """One rank's batch: sample indices and their global positions in the epoch's order."""

    ids: np.ndarray
    positions: np.ndarray
    step: int  # batch number in the epoch (global step within the epoch)


class SampleOrder:
    """Which samples each rank reads, in which order, for each epoch (see module docstring)."""

    def __init__(
        self,
        table: SampleTable,
        quarantine: Quarantine,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
    ) -> None:
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.table, self.quarantine = table, quarantine
        self.seed, self.batch_size, self.rank, self.world_size, self.train = (
            seed,
            batch_size,
            rank,
            world_size,
            train,
        )
        self._cache: tuple[int, int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """Every sample of the epoch, in order (all ranks together).

        Training leaves out the samples found damaged in an earlier epoch: the ranks share their
        records at every epoch end, so all of them leave out the same ones. Samples found during the
        epoch are substituted (the epoch's positions never move), and so are those found before
        training (a tar cut short on this node only: the other nodes' copies may be whole, and every
        rank must count the same epoch). Evaluation lists the whole split in manifest order; its
        quarantined samples are left out where they are read (``batches``)."""
        if not self.train:
            return np.arange(len(self.table), dtype=np.int64)
        excluded = self.quarantine.ids(before_epoch=epoch)
        key = (epoch, len(excluded))
        if self._cache is not None and self._cache[:2] == key:
            return self._cache[2]
        ids = epoch_permutation(self.seed, epoch, len(self.table))
        if len(excluded):
            ids = ids[~np.isin(ids, excluded)]
        self._cache = (*key, ids)
        return ids

    def steps(self, epoch: int, start: int = 0) -> int:
        """Train: global steps of the epoch from position ``start`` (full global batches only).
        Eval: this rank's batches."""
        if self.train:
            return max(len(self.epoch_ids(epoch)) - start, 0) // self.global_batch
        return math.ceil(len(self._eval_ids()) / self.batch_size)

    def num_samples(self, epoch: int) -> int:
        """Samples this rank yields in a whole epoch."""
        if self.train:
            return self.steps(epoch) * self.batch_size
        return len(self._eval_ids())

    def eval_range(self, n: int) -> tuple[int, int]:
        w, r = self.world_size, self.rank
        return n * r // w, n * (r + 1) // w

    def _eval_ids(self) -> np.ndarray:
        """This rank's evaluation samples: its range of the whole split, so that ranges never move
        whatever any rank has quarantined, less the quarantined samples it knows of. Every usable
        sample is read exactly once across ranks in every pass."""
        lo, hi = self.eval_range(len(self.table))
        ids = np.arange(lo, hi, dtype=np.int64)
        known = self.quarantine.ids()
        return ids[~np.isin(ids, known)] if len(known) else ids

    def batches(self, epoch: int, start: int = 0) -> list[Batch]:
        """This rank's batches of an epoch from global position ``start`` (samples the whole job has
        consumed in that epoch; any number after an elastic resume). An evaluation position is the
        sample's place in manifest order."""
        b = self.batch_size
        if not self.train:
            ids = self._eval_ids()
            return [Batch(ids[a : a + b], ids[a : a + b], t) for t, a in enumerate(range(0, len(ids), b))]
        ids = self.epoch_ids(epoch)
        g = self.global_batch
        out = []
        for t in range(self.steps(epoch, start)):
            lo = start + t * g + self.rank * b
            out.append(Batch(ids[lo : lo + b], np.arange(lo, lo + b), t))
        return out

    def substitute(self, epoch: int, position: int) -> int:
        """The sample that takes the place of a quarantined one at ``position`` in an epoch: the first
        sample not quarantined from half an epoch further on in the epoch's order (cyclic): far from
        the batch, and the same on every rank and after a resume."""
        ids = self.epoch_ids(epoch)
        n = len(ids)
        for j in range(n):
            cand = int(ids[(position + n // 2 + j) % n])
            if cand not in self.quarantine:
                return cand
        raise CorruptSampleError("every sample of this split is quarantined; rebuild the shards")


def check_split_size(order: SampleOrder, split: str, shards: str) -> None:
    """A split too small for one global batch (train) or for one sample per rank (eval): one line."""
    if order.train and order.steps(0) == 0:
        raise ShardFormatError(
            f"split {split!r} of {shards} has {len(order.epoch_ids(0))} usable samples: fewer than one "
            f"global batch ({order.batch_size} x {order.world_size} rank(s) = {order.global_batch}); "
            "lower data.batch_size or add data"
        )
    if not order.train and len(order.table) < order.world_size:
        raise ShardFormatError(
            f"split {split!r} of {shards} has {len(order.table)} samples: fewer than "
            f"{order.world_size} rank(s); lower data.batch_size or add data"
        )


def open_remote(table: SampleTable, cfg, step_positions: int):
    """The reads of a table on object storage through the node's shard cache (``data.cache_*``),
    fetching ahead ``data.cache_ahead_steps`` steps of ``step_positions`` samples; a budget that
    cannot hold the largest shard is one line, before any read."""
    from pipeline.shard_cache import RemoteShards, default_budget, default_cache_dir

    cache_dir = cfg.cache_dir or default_cache_dir()
    budget = cfg.cache_bytes or default_budget(cache_dir)
    largest = max(table.sizes, default=0)
    if cfg.cache_bytes and largest > budget:
        raise ShardFormatError(
            f"data.cache_bytes={budget} cannot hold the largest shard of {table.location} ({largest} bytes); "
            "raise it (several shards' worth, ideally the whole split)"
        )
    ahead = cfg.cache_ahead_steps * step_positions
    return RemoteShards(
        table, cache_dir, budget, ahead, cfg.cache_policy, max_open=cfg.open_shards, prefetch=ahead > 0
    )


# --- what both backends share -----------------------------------------------------------------------
class OrderedLoader:
    """The state every backend's loader keeps: the split's table, its quarantine, the order, the epoch
    and the position to start from. Backends implement ``__iter__`` over ``self.plan()``.

    After each yielded batch, ``position`` is the number of samples the whole job has consumed in the
    epoch (what a mid-epoch checkpoint records) and ``last_batch`` holds the sample indices actually
    yielded (after substitution) with their positions."""

    def __init__(self, cfg, split: str, rank: int, world_size: int, mode: str, crops: int = 1) -> None:
        self.cfg, self.split, self.mode = cfg, split, mode
        self.crops = crops if mode == "multicrop" else 1
        storage.configure(cfg.storage_options)
        self.table = SampleTable.load(cfg.shards, split, cfg.cache_dir)
        self.quarantine = Quarantine(self.table)
        prepare_table(self.table, self.quarantine, cfg.skip_corrupt)
        self.order = SampleOrder(
            self.table, self.quarantine, cfg.seed, cfg.batch_size, rank, world_size, train=mode == "train"
        )
        check_split_size(self.order, split, cfg.shards)
        # training positions are the whole job's (the node's ranks share one cache); evaluation's, this rank's
        step = self.order.global_batch if mode == "train" else cfg.batch_size
        self.remote = open_remote(self.table, cfg, step) if self.table.remote else None
        self.reader = SampleReader(self.table, cfg.open_shards, self.remote)
        self.hash_check = (  # a cached shard's sha256 is checked as it is downloaded
            ShardHashCheck(self.table.tars, self.table.sha256, default_marker_dir(), self.table.sizes)
            if cfg.verify_sha256 and self.table.sha256 and not self.table.remote
            else None
        )
        self._last_step: int | None = None
        self.class_names = list(self.table.class_names)
        self.batch_size = cfg.batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0
        self.position = 0
        self.last_batch: Batch | None = None

    @property
    def num_samples(self) -> int:
        return self.order.num_samples(self.epoch)

    def close(self) -> None:
        """Close the tars this loader has open (reading again reopens them)."""
        self.reader.close()

    def __len__(self) -> int:
        """Batches of a whole epoch (training: global steps; the same on every rank)."""
        return self.order.steps(self.epoch)

    def remaining(self) -> int:
        """Batches the next pass yields (from ``start``)."""
        return self.order.steps(self.epoch, self.start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next pass reads ``epoch`` from global position ``start`` (samples already consumed by
        the whole job in that epoch; 0 = from the beginning)."""
        if start < 0:
            raise ValueError(f"start position must be >= 0, got {start}")
        self.epoch, self.start = int(epoch), int(start)
        self.position = self.start

    def plan(self) -> list[Batch]:
        batches = self.order.batches(self.epoch, self.start if self.mode == "train" else 0)
        if self.remote is not None:
            self.remote.raise_if_failed()
            self.remote.plan(self.table.tar_of[self.upcoming_ids()])
        if self.hash_check is not None:
            self.hash_check.raise_if_failed()  # what the previous pass's last batch did not see
            self._last_step = batches[-1].step if batches else None
            if batches:  # the tars this pass reads, in the order it first needs them
                tars = self.table.tar_of[np.concatenate([b.ids for b in batches])]
                _, first = np.unique(tars, return_index=True)
                self.hash_check.start(tars[np.sort(first)])
        return batches

    def advanced(self, batch: Batch, ids) -> None:
        """Record a yielded batch (``ids``: the samples actually in it)."""
        self.last_batch = Batch(np.asarray(ids, dtype=np.int64), batch.positions, batch.step)
        if self.mode == "train":
            self.position = self.start + (batch.step + 1) * self.order.global_batch
        if self.remote is not None:
            step = self.order.global_batch if self.mode == "train" else self.batch_size
            self.remote.advance((batch.step + 1) * step)
        if self.hash_check is not None:
            if batch.step == self._last_step:  # a pass does not end before its tars are checked
                self.hash_check.wait()
            self.hash_check.raise_if_failed()

    def upcoming_ids(self) -> np.ndarray:
        """The samples the node reads from here, in order: the rest of the training epoch and the next
        epoch (all ranks: their batches interleave), or this rank's evaluation pass. What the shard
        cache fills ahead from and evicts by."""
        if self.mode != "train":
            return np.concatenate([b.ids for b in self.order.batches(self.epoch)] or [np.empty(0, np.int64)])
        ids = self.order.epoch_ids(self.epoch)
        g = self.order.global_batch
        usable = (len(ids) - self.start) // g * g
        return np.concatenate([ids[self.start : self.start + usable], self.order.epoch_ids(self.epoch + 1)])

    def bad_sample(self, i: int, reason: object) -> None:
        """A sample failed to decode: the named error, or quarantine it (named once)."""
        shard, key = self.table.name(i)
        if not self.cfg.skip_corrupt:
            raise corrupt_sample_error(key, self.table.tars[int(self.table.tar_of[i])], reason) from None
        if self.quarantine.add(i, str(reason), self.epoch if self.mode == "train" else -1):
            warnings.warn(f"quarantined corrupt sample {key!r} of shard {shard} ({reason})", stacklevel=2)

    def resolve(self, i: int, position: int) -> int | None:
        """The sample read at ``position``: ``i``, or its substitute if ``i`` is quarantined
        (training); None when an evaluation pass must leave it out."""
        i = int(i)
        if i not in self.quarantine:
            return i
        return self.order.substitute(self.epoch, position) if self.mode == "train" else None

    def color(self, position: int) -> tuple[float, float]:
        return color_params(self.cfg.seed, self.epoch, position)

    def crop(self, position: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
        return crop_params(
            self.cfg.seed, self.epoch, position, height, width, self.cfg.crop_area, self.cfg.crop_aspect
        )
