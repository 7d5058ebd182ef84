"""Elastic resume: the rest of an epoch, planned again for another world size, worker count or batch size.

A saved stream state names the epoch, the split it ran with (``config``) and the batches consumed.
From the states of a run (one per rank, or one for all ranks when they ran in lockstep), the
*rest* of the epoch is every row that run's plan would still have yielded and no rank consumed:

1. each old rank's batches are replayed from the old plan (no data is read) in its batch order;
2. the rows of the batches no rank consumed are kept in that order, old rank after old rank;
   a row consumed by any rank is dropped everywhere, and a row met twice (the old
   ``remainder="pad"`` wrap) is kept once. Rows the old plan never yielded this epoch (its
   ``remainder="drop"`` or ``drop_last`` cuts) are not part of the rest;
3. that sequence of ``M`` rows is split over the new ranks as a fresh epoch's row sequence
   is (:mod:`.plan` step 3 with ``N = M``): ``remainder="pad"`` gives every rank ``ceil(M / W)``
   rows, repeating up to ``W - 1`` rows from the sequence's start; ``"drop"`` gives ``floor(M / W)``
   and leaves up to ``W - 1`` rows out of this epoch; ``drop_last`` drops each rank's short last batch.
   Windows and batches follow (:mod:`.plan` step 4); the rows of a window keep the order of the
   sequence (already shuffled by the old plan), and are read sorted by row.

A resumed run's own state records the states it resumed from (``"resumed_from"``), so a rest can be
resumed again with yet another split. Replaying costs ``O(rows of the store)`` integer work at load.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .plan import EpochPlan, SplitConfig, Units, rows_per_rank
from .progress import BatchSet


def config_of(fingerprint: dict[str, Any]) -> SplitConfig:
    """The split a saved state's ``config`` describes."""
    return SplitConfig(
        batch_size=int(fingerprint["batch_size"]), world_size=int(fingerprint["world_size"]),
        seed=int(fingerprint["seed"]), shuffle=bool(fingerprint["shuffle"]), remainder=fingerprint["remainder"],
        drop_last=bool(fingerprint["drop_last"]), window=int(fingerprint["buffer_size"]),
    )


def rank_sequence(plan: EpochPlan) -> np.ndarray:
    """Store rows of ``plan``'s batches, batch after batch, each batch in its order (int64 ``[num_batches * B]``
    at most: the last batch may be short)."""
    if not plan.num_batches:
        return np.zeros(0, np.int64)
    end = min(plan.rows_per_rank, plan.num_batches * plan.cfg.batch_size)
    out = []
    for k in range(int(plan.window_of(plan.num_batches - 1)) + 1):
        lo, hi = plan.window_range(k)
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in plan.segments(lo, hi)])
        perm = plan.window_permutation(k)
        out.append((rows if perm is None else rows[perm])[:max(0, end - lo)])
    return np.concatenate(out)


def rest_of_epoch(units: Units, states: list[dict[str, Any]]) -> np.ndarray:
    """The rows the run that saved ``states`` had left of its epoch, in order, each once (see the module docstring).

    ``states``: one state per old rank (any order, every rank once), or a single state standing for every
    rank (ranks in lockstep consume the same batch numbers)."""
    cfg = config_of(states[0]["config"])
    epoch = int(states[0]["epoch"])
    if any(s["config"] != states[0]["config"] or int(s["epoch"]) != epoch for s in states):
        raise ValueError("cannot resume: the saved states are of different runs or epochs")
    if len(states) == 1:
        by_rank = {r: states[0] for r in range(cfg.world_size)}
    else:
        by_rank = {int(s.get("rank", -1)): s for s in states}
        if sorted(by_rank) != list(range(cfg.world_size)):
            raise ValueError(f"cannot resume: give one state per rank of the saved run (world size "
                             f"{cfg.world_size}), or one state for all; got ranks {sorted(by_rank)}")
    kept, consumed = [], []
    for r in range(cfg.world_size):
        state = by_rank[r]
        source = state.get("resumed_from")
        plan = EpochPlan(units, cfg, epoch, r) if not source else RestPlan(units, cfg, epoch, r,
                                                                            rest_of_epoch(units, source))
        seq = rank_sequence(plan)
        done = np.zeros(len(seq), dtype=bool)
        for lo, hi in BatchSet(state["consumed"]).ranges():
            done[lo * cfg.batch_size:hi * cfg.batch_size] = True
        kept.append(seq[~done])
        consumed.append(seq[done])
    rows = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    gone = np.concatenate(consumed) if consumed else np.zeros(0, np.int64)
    rows = rows[~np.isin(rows, gone)]
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)]


class RestPlan(EpochPlan):
    """The plan of the rest of an epoch (``rows``, in order) for one rank of a new split: the same windows and
    batches as an :class:`EpochPlan` of ``len(rows)`` rows, over ``rows`` instead of the store's row sequence."""

    def __init__(self, units: Units, cfg: SplitConfig, epoch: int, rank: int, rows: np.ndarray):
        super().__init__(units, cfg, epoch, rank)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.num_rows = len(self.rows)
        self.rows_per_rank = rows_per_rank(self.num_rows, cfg.world_size, cfg.remainder)
        self.num_batches = _batches(self.rows_per_rank, cfg)

    def _wanted(self, lo: int, hi: int) -> np.ndarray:
        """Rows at this rank's positions ``[lo, hi)`` (wrapping past the end of ``rows``: ``remainder="pad"``)."""
        v = self.rank * self.rows_per_rank + np.arange(lo, hi, dtype=np.int64)
        return self.rows[v % self.num_rows] if self.num_rows else np.zeros(0, np.int64)

    def _sorted(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of positions ``[lo, hi)`` sorted (how they are read) and the stable sort order."""
        wanted = self._wanted(lo, hi)
        order = np.argsort(wanted, kind="stable")
        return wanted[order], order

    def segments(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Store row ranges holding positions ``[lo, hi)``, ascending (runs of consecutive rows merged)."""
        rows, _ = self._sorted(lo, hi)
        if not len(rows):
            return []
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.r_[rows[:1], rows[cuts]]
        ends = np.r_[rows[cuts - 1], rows[-1:]] + 1
        return list(zip(starts.tolist(), ends.tolist(), strict=True))

    def window_permutation(self, k: int) -> np.ndarray | None:
        """Position ``i`` of window ``k`` takes read row ``perm[i]``: the rows' order in the rest, not a new shuffle."""
        _, order = self._sorted(*self.window_range(k))
        perm = np.empty_like(order)
        perm[order] = np.arange(len(order), dtype=np.int64)
        return perm


def _batches(rows: int, cfg: SplitConfig) -> int:
    return rows // cfg.batch_size if cfg.drop_last else -(-rows // cfg.batch_size)
