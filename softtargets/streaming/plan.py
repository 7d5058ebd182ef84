"""The epoch plan: which store rows each batch of each rank holds, from the store's shape alone.

No data is read here. An epoch of a store of N rows is planned in four steps, each a
pure function of ``(seed, epoch)`` and the split, so every rank and worker computes the
same plan independently:

1. **Units.** The store's rows are cut into read units: ``block_rows``-aligned blocks
   inside each shard (zarr inner chunks; wds blocks; for the wds ``sample`` layout, runs
   of up to 256 rows). A unit is read whole, never row by row.
2. **Order.** With ``shuffle``, the units are permuted: globally for zarr; for wds the
   shards are permuted and then the units inside each shard, so a shard's units stay
   together (a wds shard is decoded whole and cached, and is never revisited later).
   This ordered sequence of N rows is the epoch's *row sequence*.
3. **Ranks.** Rank ``r`` of ``W`` takes positions ``[r L, (r + 1) L)`` of the row
   sequence, the same ``L`` for every rank (``DistributedSampler``'s policy):
   ``remainder="pad"``: ``L = ceil(N / W)``; the ``W L - N`` extra positions wrap around
   to the start of the row sequence (those rows are seen twice this epoch).
   ``remainder="drop"``: ``L = floor(N / W)``; the last ``N - W L`` rows of the row
   sequence are skipped this epoch (different rows each epoch when shuffled).
4. **Windows and batches.** A rank's ``L`` positions are cut into batches, and runs of
   batches into windows (the in-memory shuffle buffer) of ``window`` rows, except at the
   start: the first window holds ``1 / RAMP`` of a full one (at least one batch) and each
   next one twice the last, until full (so the first batch waits for a small window, and
   each next window is read while a smaller one is handed out). Each window's rows are
   permuted, then cut into batches. Only the rank's last batch can be short; with
   ``drop_last`` it is dropped. Every rank has the same number of batches.

Seeds: the unit order uses ``SeedSequence([seed, epoch, 0])``, window ``k`` of rank ``r``
uses ``SeedSequence([seed, epoch, 1, r, k])``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..choices import Remainder, choices, parse_choice
from ..forksafe import cached_once
from ..store import layout_class

REMAINDERS = choices(Remainder)
RAMP = 8  # an epoch's first window holds 1/RAMP of a full one (see step 4)


@dataclass(frozen=True)
class Units:
    """Read units: row ranges ``[starts[u], stops[u])``; ``group[u]`` is the shard holding unit ``u``.

    ``grouped``: keep each group's units together when shuffling (wds).
    """

    starts: np.ndarray
    stops: np.ndarray
    group: np.ndarray
    grouped: bool

    @property
    def num_rows(self) -> int:
        return int((self.stops - self.starts).sum())

    @classmethod
    def from_shards(cls, shards: Sequence[tuple[int, int]], unit_rows: int, grouped: bool) -> Units:
        """Units of ``unit_rows`` rows (the last of each shard may be shorter) over ``(start, rows)`` shards."""
        if unit_rows < 1:
            raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
        starts, stops, group = [], [], []
        for gid, (start, rows) in enumerate(shards):
            lo = np.arange(start, start + rows, unit_rows, dtype=np.int64)
            starts.append(lo)
            stops.append(np.minimum(lo + unit_rows, start + rows))
            group.append(np.full(len(lo), gid, dtype=np.int64))
        return cls(_cat(starts), _cat(stops), _cat(group), grouped)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def unit_rows_for(layout: str, block_rows: int, shard_rows: int, sample_layout: str | None) -> int:
    """Rows per read unit for a store: what its layout says (:meth:`~softtargets.store.TargetStore.unit_rows`)."""
    return layout_class(layout).unit_rows(block_rows, shard_rows, sample_layout)


@dataclass(frozen=True)
class SplitConfig:
    """How an epoch is split and shuffled (everything but the epoch number and the rank)."""

    batch_size: int
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    remainder: Remainder = "pad"
    drop_last: bool = False
    window: int = 0  # rows per shuffle window; 0 = one batch

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        parse_choice("remainder policy", self.remainder, Remainder)
        if self.window and self.window % self.batch_size:
            raise ValueError(f"window={self.window} must be a multiple of batch_size={self.batch_size}")

    @property
    def window_rows(self) -> int:
        return self.window or self.batch_size


def rows_per_rank(num_rows: int, world_size: int, remainder: Remainder) -> int:
    """``L``: rows every rank gets per epoch (see the module docstring)."""
    if remainder == "pad":
        return -(-num_rows // world_size) if num_rows else 0
    return num_rows // world_size


def batches_per_rank(num_rows: int, cfg: SplitConfig) -> int:
    """Batches every rank yields per epoch: ``ceil(L / B)``, or ``floor(L / B)`` with ``drop_last``."""
    n = rows_per_rank(num_rows, cfg.world_size, cfg.remainder)
    return n // cfg.batch_size if cfg.drop_last else -(-n // cfg.batch_size)


class EpochPlan:
    """The plan of one epoch for one rank: its batches, grouped into shuffle windows."""

    def __init__(self, units: Units, cfg: SplitConfig, epoch: int, rank: int):
        if not 0 <= rank < cfg.world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={cfg.world_size})")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.units, self.cfg, self.epoch, self.rank = units, cfg, int(epoch), int(rank)
        self.num_rows = units.num_rows
        self.rows_per_rank = rows_per_rank(self.num_rows, cfg.world_size, cfg.remainder)
        self.num_batches = batches_per_rank(self.num_rows, cfg)

    @cached_once
    def _order(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit ids in epoch order and the cumulative row counts ``[U + 1]`` along that order."""
        u = self.units
        n_units = len(u.starts)
        if not self.cfg.shuffle:
            order = np.arange(n_units, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.cfg.seed, self.epoch, 0])
            if u.grouped:
                bounds = np.flatnonzero(np.diff(u.group)) + 1
                groups = np.split(np.arange(n_units, dtype=np.int64), bounds)
                order_parts = [rng.permutation(groups[g]) for g in rng.permutation(len(groups))]
                order = np.concatenate(order_parts) if order_parts else np.zeros(0, np.int64)
            else:
                order = rng.permutation(n_units).astype(np.int64)
        lengths = (u.stops - u.starts)[order]
        cum = np.zeros(n_units + 1, dtype=np.int64)
        np.cumsum(lengths, out=cum[1:])
        return order, cum

    def segments(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Store row ranges ``[a, b)`` holding this rank's positions ``[lo, hi)``, in plan order.

        Positions past the end of the row sequence wrap to its start (``remainder="pad"``).
        Adjacent ranges are merged, so an unshuffled plan reads long contiguous runs.
        """
        order, cum = self._order
        n = self.num_rows
        out: list[tuple[int, int]] = []
        v, end_v = self.rank * self.rows_per_rank + lo, self.rank * self.rows_per_rank + hi
        while v < end_v:
            p = v % n
            take = min(end_v - v, n - p)
            q, stop = p, p + take
            u = int(np.searchsorted(cum, q, side="right")) - 1
            while q < stop:
                unit = order[u]
                upto = min(stop, int(cum[u + 1]))
                a = int(self.units.starts[unit]) + q - int(cum[u])
                b = a + upto - q
                if out and out[-1][1] == a:
                    out[-1] = (out[-1][0], b)
                else:
                    out.append((a, b))
                q, u = upto, u + 1
            v += take
        return out

    # -- windows -----------------------------------------------------------------------------------

    @cached_once
    def _ramp(self) -> list[int]:
        """First batches of the windows smaller than full, then the batch where full windows begin."""
        full = self.cfg.window_rows // self.cfg.batch_size
        starts, size = [0], max(1, full // RAMP)
        while size < full:
            starts.append(starts[-1] + size)
            size *= 2
        return starts

    def window_of(self, batch: Any) -> Any:
        """The window holding batch ``batch`` (an int, or an int array of batch numbers)."""
        ramp, full = self._ramp, self.cfg.window_rows // self.cfg.batch_size
        if isinstance(batch, (int, np.integer)):  # once per batch handed out: plain arithmetic
            b = int(batch)
            return bisect.bisect_right(ramp, b) - 1 if b < ramp[-1] else len(ramp) - 1 + (b - ramp[-1]) // full
        bs = np.asarray(batch, dtype=np.int64)
        return np.where(bs < ramp[-1], np.searchsorted(ramp, bs, side="right") - 1,
                        len(ramp) - 1 + (bs - ramp[-1]) // full)

    def window_range(self, k: int) -> tuple[int, int]:
        """Rank positions ``[lo, hi)`` of window ``k``."""
        ramp, full = self._ramp, self.cfg.window_rows // self.cfg.batch_size
        a = ramp[k] if k < len(ramp) else ramp[-1] + (k - len(ramp) + 1) * full
        b = ramp[k + 1] if k + 1 < len(ramp) else ramp[-1] + (k - len(ramp) + 2) * full
        return a * self.cfg.batch_size, min(b * self.cfg.batch_size, self.rows_per_rank)

    def window_permutation(self, k: int) -> np.ndarray | None:
        """Order of window ``k``'s rows (offsets into the window), or ``None`` when not shuffling."""
        if not self.cfg.shuffle:
            return None
        lo, hi = self.window_range(k)
        rng = np.random.default_rng([self.cfg.seed, self.epoch, 1, self.rank, k])
        return rng.permutation(hi - lo).astype(np.int64)

    def batch_offsets(self, batch: int) -> tuple[int, int]:
        """Offsets ``[a, b)`` of batch ``batch`` inside its window's (permuted) rows."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} outside [0, {self.num_batches})")
        k = self.window_of(batch)
        lo, hi = self.window_range(k)
        a = batch * self.cfg.batch_size - lo
        return a, min(a + self.cfg.batch_size, hi - lo)

    def batch_rows(self, batch: int) -> np.ndarray:
        """Store rows of batch ``batch`` (int64), in batch order. Reference for tests and small stores."""
        k = self.window_of(batch)
        lo, hi = self.window_range(k)
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.segments(lo, hi)])
        perm = self.window_permutation(k)
        a, b = self.batch_offsets(batch)
        return rows[a:b] if perm is None else rows[perm[a:b]]
