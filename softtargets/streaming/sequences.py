"""``SequenceStream``: batches of whole sequences (padded, with masks) or packed fixed-length windows of a
sequence store, targets aligned to inputs.

The unit of an epoch is an *item*: a sequence (``mode="sequences"``) or a window of ``length`` consecutive rows
of the store (``mode="windows"``: sequences packed end to end, the last window shorter). Items are planned
exactly as :mod:`softtargets.streaming.plan` plans rows: runs of consecutive items covering about
``block_rows`` rows are the read units, permuted per ``(seed, epoch)``; ranks take equal runs of that order
(``remainder`` pad or drop); each rank's run is cut into shuffle windows of ``buffer_size`` items (read with
one call per contiguous range, then permuted) and batches of ``batch_size`` items; DataLoader workers take
contiguous runs of the remaining batch numbers, cut where a window starts.
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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..choices import Remainder, VerifyMode, parse_choice
from ..store import TargetStore
from ..store.sequences import SequenceStore, open_sequences
from .dataset import ITEM_BYTES, resolve_rank
from .plan import EpochPlan, SplitConfig, Units, batches_per_rank
from .progress import BatchSet

SequenceMode = Literal["sequences", "windows"]
STATE_FORMAT = "softtargets.sequence_stream/1"
DEFAULT_BUFFER_BYTES = 64 << 20

__all__ = ["SequenceLoader", "SequenceMode", "SequenceStream", "stream_sequences"]


class SequenceStream(IterableDataset):
    """Batches of a sequence store for one rank, split across DataLoader workers. See :func:`stream_sequences`."""

    def __init__(
        self, store: SequenceStore, *, batch_size: int, mode: SequenceMode = "sequences", length: int | None = None,
        shuffle: bool = True, seed: int = 0, rank: int | None = None, world_size: int | None = None,
        remainder: Remainder = "pad", drop_last: bool = False, pad_id: int = 0, buffer_size: int | None = None,
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
        batch_size = int(batch_size)
        n = self.num_items
        mean_rows = max(1.0, store.num_tokens / max(n, 1))
        if buffer_size is None:
            m = store.manifest
            row_bytes = max(1, int(np.prod(m.logits_shape[1:])) * ITEM_BYTES.get(m.dtype, 2))
            buffer_size = max(1, int(DEFAULT_BUFFER_BYTES / row_bytes / mean_rows) // batch_size) * batch_size
        elif int(buffer_size) < batch_size:
            raise ValueError(f"buffer_size={buffer_size} must be >= batch_size={batch_size}")
        self.config = SplitConfig(batch_size=batch_size, world_size=self.world_size, seed=int(seed),
                                  shuffle=bool(shuffle), remainder=remainder, drop_last=bool(drop_last),
                                  window=int(buffer_size) // batch_size * batch_size)
        unit_items = max(1, int(store.manifest.block_rows / mean_rows))
        self.units = Units.from_shards([(0, n)], unit_items, grouped=False)
        self._window: tuple[int, int, _Window] | None = None
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
                "shuffle": c.shuffle, "remainder": c.remainder, "drop_last": c.drop_last,
                "buffer_size": c.window_rows, "num_units": len(self.units.starts)}

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
        for j in self._share(plan, self._consumed.complement(plan.num_batches), wid, nw).tolist():
            batch = self.batch(plan, j)
            if mark and info is None:
                self.mark(batch)
            yield batch
        self._window = None
        if info is not None:
            self.epoch, self._consumed = self.epoch + 1, BatchSet()

    @staticmethod
    def _share(plan: EpochPlan, remaining: np.ndarray, wid: int, nw: int) -> np.ndarray:
        """This worker's contiguous run of the remaining batch numbers, cut where a window starts (no window is
        read by two workers where that can be avoided)."""
        n = len(remaining)
        cuts = [i * n // nw for i in range(nw + 1)]
        if n:
            windows = plan.window_of(remaining)
            starts = np.r_[0, np.flatnonzero(np.diff(windows)) + 1, n]
            cuts = [int(starts[np.abs(starts - c).argmin()]) for c in cuts]
        return remaining[cuts[wid]:cuts[wid + 1]]

    def _read_window(self, plan: EpochPlan, k: int) -> _Window:
        """Window ``k``'s items in plan order, their rows read with one call per contiguous run of items."""
        if self._window is not None and self._window[:2] == (plan.epoch, k):
            return self._window[2]
        items, logits, labels, ids, starts = [], [], [], [], []
        at = 0
        for a, b in plan.segments(*plan.window_range(k)):
            ra, rb = self.item_rows(a)[0], self.item_rows(b - 1)[1]
            part, lab = self.store.read(ra, rb)  # numpy: gathered per batch, then made a tensor
            logits.append(part)
            labels.append(lab)
            ids.append(self.store.tokens(ra, rb))
            run = np.arange(a, b, dtype=np.int64)
            items.append(run)
            starts.append(at + self._item_starts(run) - ra)
            at += rb - ra
        window = _Window(
            items=np.concatenate(items), starts=np.concatenate(starts),
            logits=logits[0] if len(logits) == 1 else np.concatenate(logits),
            labels=torch.from_numpy(np.concatenate(labels)),
            ids=torch.from_numpy(np.concatenate(ids).astype(np.int64)),
            rows=np.concatenate([np.arange(*self._rows_of_run(a, b), dtype=np.int64)
                                 for a, b in plan.segments(*plan.window_range(k))]),
            perm=plan.window_permutation(k),
        )
        self._window = (plan.epoch, k, window)
        return window

    def _item_starts(self, items: np.ndarray) -> np.ndarray:
        if self.mode == "sequences":
            return self.store.offsets[items]
        assert self.length is not None
        return items * self.length

    def _rows_of_run(self, a: int, b: int) -> tuple[int, int]:
        return self.item_rows(a)[0], self.item_rows(b - 1)[1]

    def batch(self, plan: EpochPlan, j: int) -> dict[str, Any]:
        """Batch ``j`` of ``plan`` (see the module docstring)."""
        k = plan.window_of(j)
        w = self._read_window(plan, k)
        a, b = plan.batch_offsets(j)
        picks = np.arange(a, b) if w.perm is None else w.perm[a:b]
        items = w.items[picks]
        starts = w.starts[picks]
        spans = [self.item_rows(int(i)) for i in items]
        lengths = np.array([hi - lo for lo, hi in spans], dtype=np.int64)
        width = self.length if self.mode == "windows" else int(lengths.max())
        assert width is not None
        col = np.arange(width, dtype=np.int64)
        valid = col[None, :] < lengths[:, None]
        flat = np.where(valid, starts[:, None] + col[None, :], 0).reshape(-1)
        index = torch.from_numpy(flat)
        mask = torch.from_numpy(valid)
        shape = (len(items), width)
        gathered = w.logits[flat].reshape(*shape, *w.logits.shape[1:])  # a new array (the window may be a file map)
        gathered[~valid] = 0
        logits = self.store.decode(gathered)
        ids = w.ids[index].reshape(shape).masked_fill(~mask, self.pad_id)
        label = w.labels[index].reshape(shape).masked_fill(~mask, -1)
        rows = torch.from_numpy(w.rows)[index].reshape(shape)  # global store rows
        offsets = self.store.offsets
        seq = np.searchsorted(offsets, rows.numpy(), side="right") - 1
        pos = torch.from_numpy(rows.numpy() - offsets[seq]).masked_fill(~mask, 0)
        keys = self.store.keys()
        return {"input_ids": ids, "attention_mask": mask, "teacher_logits": logits, "label": label,
                "position_ids": pos, "key": [keys[int(seq[r, 0])] for r in range(len(items))],
                "index": torch.from_numpy(items.astype(np.int64)), "epoch": plan.epoch, "batch_idx": j}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for DataLoader workers without the window in memory."""
        return {**self.__dict__, "_window": None}

    def loader(self, num_workers: int = 0, **kwargs: Any) -> SequenceLoader:
        """A ``DataLoader`` over this stream that records each batch it hands out (exact :meth:`state_dict`)."""
        return SequenceLoader(self, num_workers=num_workers, **kwargs)


@dataclass
class _Window:
    """A shuffle window read: its items in plan order, where each starts in the row buffers, the rows (stored
    logits or records, labels, input ids, store row numbers), and the window's permutation of its items."""

    items: np.ndarray
    starts: np.ndarray
    logits: np.ndarray
    labels: torch.Tensor
    ids: torch.Tensor
    rows: np.ndarray
    perm: np.ndarray | None


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
    buffer_size: int | None = None, verify: VerifyMode = "lazy",
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
        buffer_size: items per shuffle window (a multiple of ``batch_size``; default: about 64 MiB of rows).
        verify: when a URL's files are checked (as :func:`~softtargets.open_targets`).

    Returns:
        The stream; iterate it, or its :meth:`~SequenceStream.loader` for DataLoader workers.

    Raises:
        StoreError: the store is not a sequence store.
    """
    seqs = store if isinstance(store, SequenceStore) else open_sequences(store, verify=verify)
    return SequenceStream(seqs, batch_size=batch_size, mode=mode, length=length, shuffle=shuffle, seed=seed,
                          rank=rank, world_size=world_size, remainder=remainder, drop_last=drop_last, pad_id=pad_id,
                          buffer_size=buffer_size)
