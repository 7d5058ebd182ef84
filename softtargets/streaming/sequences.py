"""``SequenceStream``: batches of whole sequences (padded, with masks) or packed fixed-length windows of a
sequence store, targets aligned to inputs.

The unit of an epoch is an *item*: a sequence (``mode="sequences"``) or a window of ``length`` consecutive rows
of the store (``mode="windows"``: sequences packed end to end, the last window shorter). Items are split
exactly like rows in :mod:`softtargets.streaming.plan` (each item a read unit): one global permutation per
``(seed, epoch)``, ranks take equal runs of it (``remainder`` pad or drop), each rank's run is cut into
batches of ``batch_size`` items, and DataLoader workers take contiguous runs of the remaining batch numbers.
Every rank and worker computes the same plan from the store's shape alone, so an epoch hands out each item
exactly once (``remainder="pad"`` repeats up to ``world_size - 1`` of them), and :meth:`state_dict` /
:meth:`load_state_dict` resume mid-epoch with any number of workers.

A batch is a dict:

- ``input_ids`` int64 ``[B, L]`` (``pad_id`` where padded); ``attention_mask`` bool ``[B, L]``;
- ``teacher_logits`` ``[B, L, C]`` (or ``[B, L, K, C]``) in the stored dtype, zero where padded;
- ``label`` int64 ``[B, L]``: the next token of each position, ``-1`` where padded or unknown;
- ``position_ids`` int64 ``[B, L]``: the position inside its sequence (windows restart it at every
  sequence start, so attention can be kept inside a sequence);
- ``key`` list[str] ``[B]`` (sequence keys; a window's first sequence), ``index`` int64 ``[B]`` (item
  numbers), ``epoch`` int, ``batch_idx`` int.

Row ``t``'s target is the teacher's distribution of the token after position ``t``, so a causal student's
logits at position ``t`` meet ``teacher_logits[:, t]`` directly (no shift).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..choices import Remainder, VerifyMode, parse_choice
from ..store import TargetStore
from ..store.sequences import SequenceStore, open_sequences
from .dataset import resolve_rank
from .plan import EpochPlan, SplitConfig, Units, batches_per_rank
from .progress import BatchSet

SequenceMode = Literal["sequences", "windows"]
STATE_FORMAT = "softtargets.sequence_stream/1"

__all__ = ["SequenceLoader", "SequenceMode", "SequenceStream", "stream_sequences"]


class SequenceStream(IterableDataset):
    """Batches of a sequence store for one rank, split across DataLoader workers. See :func:`stream_sequences`."""

    def __init__(
        self, store: SequenceStore, *, batch_size: int, mode: SequenceMode = "sequences", length: int | None = None,
        shuffle: bool = True, seed: int = 0, rank: int | None = None, world_size: int | None = None,
        remainder: Remainder = "pad", drop_last: bool = False, pad_id: int = 0,
    ):
        super().__init__()
        parse_choice("sequence mode", mode, SequenceMode)
        if mode == "windows" and (length is None or int(length) < 1):
            raise ValueError("mode='windows' needs length=L (rows per window), >= 1")
        if mode == "sequences" and length is not None:
            raise ValueError("length is the window length of mode='windows'; whole sequences have their own")
        self.store, self.mode = store, mode
        self.length = None if length is None else int(length)
        self.pad_id = int(pad_id)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.config = SplitConfig(batch_size=int(batch_size), world_size=self.world_size, seed=int(seed),
                                  shuffle=bool(shuffle), remainder=remainder, drop_last=bool(drop_last))
        n = self.num_items
        self.units = Units(np.arange(n, dtype=np.int64), np.arange(1, n + 1, dtype=np.int64),
                           np.zeros(n, np.int64), grouped=False)
        self.epoch = 0
        self._consumed = BatchSet()

    @property
    def num_items(self) -> int:
        """Items per epoch: sequences, or windows of ``length`` rows."""
        if self.mode == "sequences":
            return len(self.store)
        assert self.length is not None
        return -(-self.store.num_tokens // self.length)

    def item_rows(self, item: int) -> tuple[int, int]:
        """Store rows ``[a, b)`` of item ``item``."""
        if self.mode == "sequences":
            return int(self.store.offsets[item]), int(self.store.offsets[item + 1])
        assert self.length is not None
        a = item * self.length
        return a, min(a + self.length, self.store.num_tokens)

    # -- the plan and progress (as TargetStream) ----------------------------------------------------

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return EpochPlan(self.units, self.config, self.epoch if epoch is None else epoch, self.rank)

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_rank(self.num_items, self.config)

    def __len__(self) -> int:
        return self.batches_per_epoch - len(self._consumed)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to stream; a different epoch starts afresh, the current one keeps its progress."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self._consumed = epoch, BatchSet()

    def mark(self, batch: dict[str, Any]) -> None:
        """Record ``batch`` as consumed (done for you with ``num_workers=0`` and by :meth:`loader`)."""
        e, j = int(batch["epoch"]), int(batch["batch_idx"])
        if e < self.epoch:
            return
        if e > self.epoch:
            self.epoch, self._consumed = e, BatchSet()
        self._consumed.add(j)
        if len(self._consumed) >= self.batches_per_epoch:
            self.epoch, self._consumed = self.epoch + 1, BatchSet()

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"num_rows": self.store.num_tokens, "num_items": self.num_items, "mode": self.mode,
                "length": self.length, "batch_size": c.batch_size, "world_size": c.world_size, "seed": c.seed,
                "shuffle": c.shuffle, "remainder": c.remainder, "drop_last": c.drop_last}

    def state_dict(self) -> dict[str, Any]:
        """Progress: ``{"format", "epoch", "consumed": [[lo, hi), ...] batch ranges, "config", "rank"}``."""
        return {"format": STATE_FORMAT, "epoch": self.epoch, "consumed": self._consumed.ranges(),
                "config": self._fingerprint(), "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; ``ValueError`` naming the fields that differ from this stream."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a sequence stream state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        mine, theirs = self._fingerprint(), state["config"]
        diff = [f"{k}: saved {theirs.get(k)!r}, now {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        if diff:
            raise ValueError("cannot resume: the stream differs from the saved one (" + "; ".join(diff) + ")")
        consumed = BatchSet(state["consumed"])
        if consumed.ranges() and consumed.ranges()[-1][1] > self.batches_per_epoch:
            raise ValueError("cannot resume: the saved state lists batches beyond the epoch's end")
        self.epoch, self._consumed = int(state["epoch"]), consumed

    # -- iteration ------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iter(mark=True)

    def _iter(self, mark: bool) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        plan = self.plan()
        remaining = self._consumed.complement(plan.num_batches)
        n = len(remaining)
        share = remaining[wid * n // nw:(wid + 1) * n // nw]
        for j in share.tolist():
            batch = self.batch(plan, j)
            if mark and info is None:
                self.mark(batch)
            yield batch
        if info is not None:
            self.epoch, self._consumed = self.epoch + 1, BatchSet()

    def batch(self, plan: EpochPlan, j: int) -> dict[str, Any]:
        """Batch ``j`` of ``plan`` (see the module docstring)."""
        items = plan.batch_rows(j)
        spans = [self.item_rows(int(i)) for i in items]
        width = self.length if self.mode == "windows" else max(b - a for a, b in spans)
        assert width is not None
        b_size = len(items)
        logits: torch.Tensor | None = None  # shaped and typed like the store's rows (dense or compact records)
        ids = torch.full((b_size, width), self.pad_id, dtype=torch.int64)
        label = torch.full((b_size, width), -1, dtype=torch.int64)
        mask = torch.zeros((b_size, width), dtype=torch.bool)
        pos = torch.zeros((b_size, width), dtype=torch.int64)
        keys = self.store.keys()
        out_keys = []
        offsets = self.store.offsets
        for r, (a, b) in enumerate(spans):
            rows = self.store.rows(a, b)
            n = b - a
            if logits is None:
                logits = rows["logits"].new_zeros((b_size, width, *rows["logits"].shape[1:]))
            logits[r, :n] = rows["logits"]
            ids[r, :n] = rows["input_ids"]
            label[r, :n] = rows["label"]
            mask[r, :n] = True
            first = int(np.searchsorted(offsets, a, side="right")) - 1
            starts = offsets[first:int(np.searchsorted(offsets, b, side="left"))]
            row = np.arange(a, b, dtype=np.int64)
            seq_start = starts[np.searchsorted(starts, row, side="right") - 1]
            pos[r, :n] = torch.from_numpy(row - seq_start)
            out_keys.append(keys[first])
        return {"input_ids": ids, "attention_mask": mask, "teacher_logits": logits, "label": label,
                "position_ids": pos, "key": out_keys, "index": torch.from_numpy(items.astype(np.int64)),
                "epoch": plan.epoch, "batch_idx": j}

    def loader(self, num_workers: int = 0, **kwargs: Any) -> SequenceLoader:
        """A ``DataLoader`` over this stream that records each batch it hands out (exact :meth:`state_dict`)."""
        return SequenceLoader(self, num_workers=num_workers, **kwargs)


class _Unmarked(IterableDataset):
    def __init__(self, stream: SequenceStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.stream._iter(mark=False)


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


class SequenceLoader(DataLoader):
    """``DataLoader(stream, batch_size=None)`` that calls ``stream.mark(batch)`` before handing each batch out."""

    def __init__(self, dataset: SequenceStream, **kwargs: Any):
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("a SequenceStream yields whole batches: set its batch_size, not the DataLoader's")
        if kwargs.get("persistent_workers"):
            raise ValueError("a SequenceLoader re-plans each pass; use persistent_workers=False")
        self.stream = dataset
        kwargs.setdefault("collate_fn", _as_is)
        super().__init__(_Unmarked(dataset), batch_size=None, **kwargs)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        for batch in super().__iter__():
            self.stream.mark(batch)
            yield batch


def stream_sequences(
    store: str | os.PathLike[str] | TargetStore | SequenceStore, *, batch_size: int, mode: SequenceMode = "sequences",
    length: int | None = None, shuffle: bool = True, seed: int = 0, rank: int | None = None,
    world_size: int | None = None, remainder: Remainder = "pad", drop_last: bool = False, pad_id: int = 0,
    verify: VerifyMode = "lazy",
) -> SequenceStream:
    """A :class:`SequenceStream` over a sequence store.

    Args:
        store: a URL, an open :class:`~softtargets.store.TargetStore` or a
            :class:`~softtargets.store.sequences.SequenceStore`.
        batch_size: items (sequences or windows) per batch.
        mode: ``sequences`` (whole sequences padded to the longest in the batch) or ``windows`` (packed
            windows of ``length`` rows).
        length: rows per window (``mode="windows"`` only).
        shuffle: permute the items each epoch (deterministically, from ``seed`` and the epoch).
        seed: the shuffle's seed.
        rank: this rank; with ``world_size``, or neither (then ``torch.distributed`` decides).
        world_size: the number of ranks.
        remainder: ``pad`` (every rank gets ``ceil(S / W)`` items, a few repeated) or ``drop``.
        drop_last: drop a rank's last, short batch.
        pad_id: the input id of padded positions.
        verify: when a URL's files are checked (as :func:`~softtargets.open_targets`).

    Returns:
        The stream; iterate it, or its :meth:`~SequenceStream.loader` for DataLoader workers.

    Raises:
        StoreError: the store is not a sequence store.
    """
    seqs = store if isinstance(store, SequenceStore) else open_sequences(store, verify=verify)
    return SequenceStream(seqs, batch_size=batch_size, mode=mode, length=length, shuffle=shuffle, seed=seed,
                          rank=rank, world_size=world_size, remainder=remainder, drop_last=drop_last, pad_id=pad_id)
