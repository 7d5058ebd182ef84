"""``TargetStream``: an ``IterableDataset`` of batches of stored teacher logits.

Batches are dicts: ``key`` list[str] [B], ``index`` int64 [B] (store rows), ``teacher_logits``
[B, C] or [B, K, C] in the stored dtype (float16 stays float16; the loss upcasts), ``label``
int64 [B] (-1 = unlabelled), ``epoch`` int and ``batch_idx`` int (the batch's number in this
rank's epoch plan, for resumption), plus inputs when the store packs them (wds ``sample``
layout: ``.npy`` members decoded and stacked, e.g. ``input`` [B, ...]) or a map-style dataset is
joined (``input``). Use it with ``DataLoader(stream, batch_size=None, num_workers=n)``, or
:meth:`TargetStream.loader`.

Windows and slabs: the shuffle window (``buffer_size`` rows, default 64 MiB of logits) is read as
views of the store's memory-mapped files, and arranged in batch order a *slab* at a time
(``slab_rows``: whole batches, ~16 MiB), so memory holds a few slabs, not whole windows, while the
shuffle still mixes a whole window: :attr:`TargetStream.memory_bound_bytes` states the bound. With
``read_ahead`` (the default) each worker (or the main process) arranges the next slab in a thread
while its current one is handed out (the main process also arranges the next epoch's first slab
during an epoch's last). In the main process, batches that carry inputs (a joined dataset, packed
inputs, arrays) are made on a helper thread too, two ahead of the training loop: ``next()`` takes a
finished batch off a queue. A batch of targets alone (slices of the slab and its keys, ~20 us) is made
as it is asked for: a hand-off between threads would cost as much. From a remote store, the next
window's bytes are fetched while a window is read and handed out, on a thread of their own (one round
of concurrent requests per window).

Progress and resumption: see :meth:`TargetStream.state_dict`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..background import ahead, in_background, in_order, prefetched
from ..choices import JoinBy, Remainder
from ..store import TargetStore, layout_class
from ..store.encoding import TORCH_DTYPES
from .arrays import ArrayJoin
from .elastic import RestPlan, rest_of_epoch
from .inputs import DatasetJoin, Decoder, collate_packed
from .plan import EpochPlan, SplitConfig, Units, batches_per_rank, unit_rows_for
from .progress import BatchSet
from .window import Arranged, Buffers, Window, window_pieces

STATE_FORMAT = "softtargets.stream/2"  # 2: windows ramp up at the start of an epoch
DEFAULT_BUFFER_BYTES = 64 << 20
SLAB_BYTES = 16 << 20  # a window is arranged in slabs of about this many bytes (whole batches, at least one)
SLABS_ALIVE = 5  # see TargetStream.memory_bound_bytes
FETCH_AHEAD = 2  # windows whose bytes a remote store fetches while one is read (one round of requests)
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else from an initialised ``torch.distributed``, else ``(0, 1)``."""
    if rank is None and world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
    if not 0 <= int(rank) < int(world_size):
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    return int(rank), int(world_size)


class TargetStream(IterableDataset):
    """Batches of a target store for one rank, split across DataLoader workers. See :func:`stream`."""

    # Fingerprint fields every saved rank must share with this run, and what a change means; the other fields
    # (world size, batch size, buffer, seed, remainder) may change: the resume is then elastic.
    FIXED_ON_RESUME: ClassVar[tuple[tuple[tuple[str, ...], str], ...]] = (
        (("num_samples", "num_units"), "the store differs from the saved one"),
    )

    def __init__(
        self,
        store: TargetStore,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        remainder: Remainder = "pad",
        drop_last: bool = False,
        buffer_size: int | None = None,
        inputs: bool = True,
        decode: Decoder | None = None,
        dataset: Any = None,
        by: JoinBy = "index",
        dataset_keys: Sequence[str] | Callable[[int], str] | None = None,
        read_ahead: bool = True,
        check_join: bool = True,
        arrays: Sequence[str] = (),
    ):
        super().__init__()
        m = store.manifest
        self.store = store  # pickles as "open again" in each worker
        self.manifest = m
        self.rank, self.world_size = resolve_rank(rank, world_size)
        batch_size = int(batch_size)
        if buffer_size is None:
            row_bytes = m.storage_dtype.itemsize * int(np.prod(m.logits_shape[1:]))
            buffer_size = max(1, DEFAULT_BUFFER_BYTES // max(row_bytes, 1) // max(batch_size, 1)) * batch_size
        elif int(buffer_size) < batch_size:
            raise ValueError(f"buffer_size={buffer_size} must be >= batch_size={batch_size}")
        window = int(buffer_size) // batch_size * batch_size
        self.row_bytes = ITEM_BYTES[m.dtype] * int(np.prod(m.logits_shape[1:]))
        self.slab_rows = max(1, SLAB_BYTES // max(self.row_bytes, 1) // batch_size) * batch_size
        self.config = SplitConfig(
            batch_size=batch_size, world_size=self.world_size, seed=int(seed), shuffle=bool(shuffle),
            remainder=remainder, drop_last=bool(drop_last), window=window,
        )
        layout = layout_class(m.layout)
        unit_rows = unit_rows_for(m.layout, m.block_rows, m.shard_rows, m.sample_layout)
        self.units = Units.from_shards([(s.start, s.rows) for s in m.shards], unit_rows, grouped=layout.grouped_units)
        self.packed = bool(inputs and m.inputs and layout.packs_inputs)
        self.decode = decode
        self._logits_dtype = torch.uint8 if m.compact is not None else TORCH_DTYPES[m.dtype]
        if dataset is not None and self.packed:
            raise ValueError("the store packs its own inputs; pass inputs=False to join a dataset instead")
        self.join = None if dataset is None else DatasetJoin(
            dataset, by, len(store), dataset_keys, check=check_join, where=str(store.url))
        self.arrays = ArrayJoin(store, arrays) if arrays else None  # hints, specialists: store/sidecars.py
        self.read_ahead = bool(read_ahead)
        self.epoch = 0
        self._consumed = BatchSet()
        # Resumed with another split: (epoch, the rows left of it, the states they were worked out from).
        self._rest: tuple[int, np.ndarray, list[dict[str, Any]]] | None = None
        self._buffers: Buffers | None = None
        # The next epoch's first window, read ahead during an epoch's last: (epoch, its batch numbers, window).
        self._early: tuple[int, np.ndarray, Future[Arranged]] | None = None

    # -- the plan ---------------------------------------------------------------------------------

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan for ``epoch`` (default: the current one); a :class:`.RestPlan` for an epoch resumed
        with another split."""
        epoch = self.epoch if epoch is None else epoch
        if self._rest is not None and self._rest[0] == epoch:
            return RestPlan(self.units, self.config, epoch, self.rank, self._rest[1])
        return EpochPlan(self.units, self.config, epoch, self.rank)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a whole epoch (the same on every rank): of the current epoch's rest
        where it was resumed with another split."""
        if self._rest is not None and self._rest[0] == self.epoch:
            return batches_per_rank(len(self._rest[1]), self.config)
        return batches_per_rank(self.manifest.num_samples, self.config)

    def __len__(self) -> int:
        """Batches left in the current epoch on this rank (all workers together)."""
        return self.batches_per_epoch - len(self._consumed)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to stream (like ``DistributedSampler.set_epoch``).

        A different epoch starts afresh; the current epoch keeps its progress (so a resumed run
        may call ``set_epoch`` with the epoch it resumes). An epoch whose batches were all
        consumed has already moved on to the next.
        """
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = epoch
            self._consumed = BatchSet()
            self._rest = None

    # -- progress ---------------------------------------------------------------------------------

    def mark(self, batch: dict[str, Any]) -> None:
        """Record ``batch`` as consumed. Done for you in the main process (``num_workers=0``) and by
        :meth:`loader`; call it yourself after each batch of a plain multi-worker ``DataLoader``."""
        e, j = int(batch["epoch"]), int(batch["batch_idx"])
        if e < self.epoch:
            return
        if e > self.epoch:
            self.epoch, self._consumed, self._rest = e, BatchSet(), None
        self._consumed.add(j)
        if len(self._consumed) >= self.batches_per_epoch:
            self.epoch, self._consumed, self._rest = self.epoch + 1, BatchSet(), None

    def state_dict(self) -> dict[str, Any]:
        """Progress: ``{"format", "epoch", "consumed": [[lo, hi), ...] batch ranges, "config", "rank"}`` (and
        ``"resumed_from"``: the states an elastic resume of this epoch started from).

        Resuming with the same split (store, batch size, world size, seed, shuffle, remainder, drop_last,
        buffer size) yields exactly the batches not yet consumed in that epoch, with any number of
        DataLoader workers. In lockstep DDP every rank consumes the same batch numbers, so any rank's
        state serves all ranks. With another split, see :meth:`load_state_dict`.
        """
        state = {
            "format": STATE_FORMAT, "epoch": self.epoch, "consumed": self._consumed.ranges(),
            "config": self._fingerprint(), "rank": self.rank,
        }
        if self._rest is not None and self._rest[0] == self.epoch:
            state["resumed_from"] = self._rest[2]
        return state

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Resume from :meth:`state_dict`: one state (every rank of the saved run in lockstep), or the states of
        all its ranks (e.g. gathered with ``torch.distributed.all_gather_object``).

        The same split: the epoch goes on with exactly the batches not consumed. Another world size, batch
        size, buffer size, seed or remainder policy (elastic resume, :mod:`.elastic`): the epoch goes on with
        exactly the rows no rank of the saved run consumed, each once, split over this run's ranks (its
        ``remainder="pad"`` repeats up to ``world_size - 1`` of them, ``"drop"`` leaves up to that many out);
        the next epoch is planned with this run's split. The store must be the same (``ValueError`` otherwise).
        """
        states = [state] if isinstance(state, dict) else list(state)
        if not states:
            raise ValueError("cannot resume: no state given")
        for s in states:
            if s.get("format") != STATE_FORMAT:
                raise ValueError(f"not a stream state (format {s.get('format')!r}, expected {STATE_FORMAT!r})")
        mine = self._fingerprint()
        for fields, why in self.FIXED_ON_RESUME:
            for s in states:
                diff = [f"{k}: saved {s['config'].get(k)!r}, now {mine[k]!r}" for k in fields
                        if s["config"].get(k) != mine[k]]
                if diff:
                    raise ValueError(f"cannot resume: {why} (" + "; ".join(diff) + ")")
        epoch = int(states[0]["epoch"])
        same = all(s["config"] == mine and s["consumed"] == states[0]["consumed"] for s in states)
        if same:
            source = states[0].get("resumed_from")
            self._rest = None if not source else (epoch, rest_of_epoch(self.units, source), source)
            self.epoch = epoch
            consumed = BatchSet(states[0]["consumed"])
            if consumed.ranges() and consumed.ranges()[-1][1] > self.batches_per_epoch:
                raise ValueError("cannot resume: the saved state lists batches beyond the epoch's end")
            self._consumed = consumed
            return
        self._rest = (epoch, rest_of_epoch(self.units, states), [dict(s) for s in states])
        self.epoch, self._consumed = epoch, BatchSet()
        if not self.batches_per_epoch:  # nothing was left of that epoch
            self.epoch, self._rest = epoch + 1, None

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {
            "num_samples": self.manifest.num_samples, "num_units": len(self.units.starts),
            "batch_size": c.batch_size, "world_size": c.world_size, "seed": c.seed, "shuffle": c.shuffle,
            "remainder": c.remainder, "drop_last": c.drop_last, "buffer_size": c.window_rows,
        }

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iter(bundle=False, mark=True)

    @property
    def memory_bound_bytes(self) -> int:
        """Bytes of memory the stream holds at most, per process that arranges batches (the main process with
        no workers, else each worker, in shared memory): ``SLABS_ALIVE`` slabs of ``min(slab_rows, buffer_size)``
        rows of ``row_bytes`` -- the one handed out, the next (read ahead), the next epoch's first, one a caller
        still holds a batch of, and one piece's rows in flight while arranging -- plus index, label and key
        references (24 B a row) of three windows of ``buffer_size`` rows. Not counted: the store's own caches
        (a zarr store keeps whole shards' keys and labels, up to its ``meta_cache_bytes``; a remote store the bytes
        it fetched, up to its ``remote_cache_bytes``), packed inputs or a
        joined dataset's items, and batches a caller keeps beyond one earlier slab's."""
        slab = min(self.slab_rows, self.config.window_rows)
        return SLABS_ALIVE * slab * self.row_bytes + 3 * self.config.window_rows * 24

    @property
    def has_extras(self) -> bool:
        """Whether batches carry inputs computed per batch (packed inputs or a joined dataset)."""
        return self.packed or self.join is not None or self.arrays is not None

    def _shares(self, plan: EpochPlan, remaining: np.ndarray, wid: int, nw: int) -> np.ndarray:
        """This worker's part of the remaining batch numbers: a contiguous run of them.

        Target-only streams cut at window boundaries (no window is read by two workers);
        streams with per-batch inputs cut evenly by batch count (the inputs are the work).
        """
        n = len(remaining)
        cuts = [i * n // nw for i in range(nw + 1)]
        if not self.has_extras and n:
            windows = plan.window_of(remaining)
            starts = np.r_[0, np.flatnonzero(np.diff(windows)) + 1, n]
            cuts = [int(starts[np.abs(starts - c).argmin()]) for c in cuts]
        return remaining[cuts[wid]:cuts[wid + 1]]

    def _iter(self, bundle: bool, mark: bool) -> Iterator[dict[str, Any]]:
        """Batches of this worker's share; with ``bundle`` (in workers, target-only streams), one item per
        run of consecutive batches of a window: a single shared-memory tensor to send instead of one per batch."""
        info = get_worker_info()
        main = info is None  # the main process keeps window buffers, and the next epoch's first window
        batches = self._produce(info, bundle and not main and not self.has_extras)
        if main and self.read_ahead and self.has_extras:
            batches = prefetched(batches, depth=2, name="softtargets-batches")
        for batch in batches:
            if mark and main:
                self.mark(batch)  # here, as the batch is handed out (not when it was made)
            yield batch
        if not main:
            # A worker's copy that outlives this pass (persistent_workers) moves on to the next epoch.
            self.epoch, self._consumed, self._rest = self.epoch + 1, BatchSet(), None

    def _produce(self, info: Any, bundle: bool) -> Iterator[dict[str, Any]]:
        """The batches (or bundles) of this worker's share, window by window."""
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        plan = self.plan()
        main = info is None
        buffers = self._main_buffers() if main else None  # workers send shared-memory windows
        share = self._shares(plan, self._consumed.complement(plan.num_batches), wid, nw)
        items = [(plan, group) for group in self._groups(plan, share)]
        early, self._early = self._early, None
        if early is not None and not (items and early[0] == plan.epoch and np.array_equal(early[1], items[0][1])):
            early = None
        following = self.plan(plan.epoch + 1)
        after = (following, self._groups(following, np.arange(following.num_batches))[0]) if following.num_batches \
            else None
        run = ahead if self.read_ahead else in_order

        windows = [(p, int(p.window_of(int(group[0])))) for p, group in items]
        arrange_next = self._arranger(buffers, [w for i, w in enumerate(windows) if i == 0 or w != windows[i - 1]])

        def arrange(item: tuple[EpochPlan, np.ndarray]) -> Arranged:
            if early is not None and item is items[0]:
                return early[2].result()
            return arrange_next(item)

        for i, ((_, group), arranged) in enumerate(run(items, arrange)):
            if self.read_ahead and main and after is not None and i == len(items) - 1:
                # This epoch's last slab is being handed out: read the next epoch's first meanwhile.
                self._early = (following.epoch, after[1], in_background(self._arranger(buffers), after))
            if bundle:
                for span in np.split(group, np.flatnonzero(np.diff(group) != 1) + 1):
                    yield self._bundle(plan, arranged, span)
                continue
            if not self.has_extras:
                yield from (self._batch(plan, arranged, j) for j in group.tolist())
                continue
            cheap = self.join is not None and self.join.cheap
            for _, batch in (in_order if cheap else run)(  # inputs too
                    group.tolist(), functools.partial(self._batch, plan, arranged)):
                yield batch

    def _arranger(self, buffers: Buffers | None, windows: Sequence[tuple[EpochPlan, int]] = ()
                  ) -> Callable[[tuple[EpochPlan, np.ndarray]], Arranged]:
        """A function of ``(plan, batch numbers of one slab)`` giving that slab arranged; it keeps the window it
        read last, so the slabs of a window read it once (one such function per thread). ``windows``: the
        ``(plan, window)`` s to be read, in order; from a remote store, the bytes of the ``FETCH_AHEAD`` after the
        window being read are fetched meanwhile, on a thread of their own (the store holds them until read)."""
        last: dict[tuple[int, int], tuple[Window, np.ndarray | None]] = {}
        following = {(p.epoch, k): self._fetch_ahead(windows[i + 1:i + 1 + FETCH_AHEAD])
                     for i, (p, k) in enumerate(windows)}

        def arrange(item: tuple[EpochPlan, np.ndarray]) -> Arranged:
            p, group = item
            k = int(p.window_of(int(group[0])))
            lo, hi = p.window_range(k)
            if (p.epoch, k) not in last:
                last.clear()  # the window before is done with: its views of the store go
                last[(p.epoch, k)] = (Window.read(self.store, p.segments(lo, hi), self.packed),
                                      p.window_permutation(k))
                if self.store.remote and self.read_ahead and following.get((p.epoch, k)):
                    in_background(self._prefetch, following[(p.epoch, k)], name="softtargets-fetch")
            window, perm = last[(p.epoch, k)]
            a = (int(group[0]) * p.cfg.batch_size - lo) // self.slab_rows * self.slab_rows
            return window.arrange(perm, self._logits_dtype, buffers, a, min(a + self.slab_rows, hi - lo))

        return arrange

    def _fetch_ahead(self, windows: Sequence[tuple[EpochPlan, int]]) -> Sequence[tuple[EpochPlan, int]]:
        """The first of ``windows`` whose rows a remote store can hold at once (half its ``remote_cache_bytes``;
        at least one window): bytes fetched ahead and let go before they are read would be fetched again."""
        budget, out = self.store.remote_cache_bytes // 2, 0
        for p, k in windows:
            lo, hi = p.window_range(k)
            budget -= (hi - lo) * self.row_bytes
            if out and budget < 0:
                break
            out += 1
        return windows[:out]

    def _prefetch(self, windows: Sequence[tuple[EpochPlan, int]]) -> None:
        """Fetch the bytes of ``(plan, window)`` s from a remote store in one round of requests, to be held until
        they are read (those held already are not fetched again). An error is left to the read, which meets it."""
        with contextlib.suppress(Exception):
            self.store.prefetch([piece for p, k in windows for piece in window_pieces(self.store,
                                                                                     p.segments(*p.window_range(k)))])

    def _groups(self, plan: EpochPlan, share: np.ndarray) -> list[np.ndarray]:
        """``share`` (ascending batch numbers) cut where a new slab starts (a window is cut into slabs of
        :attr:`slab_rows` rows from its start)."""
        if not len(share):
            return []
        windows = plan.window_of(share)
        starts = {k: plan.window_range(k)[0] for k in dict.fromkeys(windows.tolist())}
        offsets = share * plan.cfg.batch_size - np.array([starts[int(k)] for k in windows], dtype=np.int64)
        slabs = windows * (plan.cfg.window_rows // self.slab_rows + 2) + offsets // self.slab_rows
        return np.split(share, np.flatnonzero(np.diff(slabs)) + 1)

    def _main_buffers(self) -> Buffers:
        if self._buffers is None:
            self._buffers = Buffers()
        return self._buffers

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for DataLoader workers without the main process's window buffers and read-ahead."""
        return {**self.__dict__, "_buffers": None, "_early": None}

    def _batch(self, plan: EpochPlan, arranged: Arranged, j: int) -> dict[str, Any]:
        batch = arranged.batch(*plan.batch_offsets(j))
        members = batch.pop("members", None)
        if members is not None:
            batch.update(collate_packed(members, self.decode))
        if self.join is not None:
            batch.update(self.join(batch["index"], batch["key"], batch["label"]))
        if self.arrays is not None:
            batch.update(self.arrays(batch["index"]))
        batch["epoch"], batch["batch_idx"] = plan.epoch, j
        return batch

    def _bundle(self, plan: EpochPlan, arranged: Arranged, run: np.ndarray) -> dict[str, Any]:
        """Consecutive batches ``run`` of one window as one item (see :func:`unbundle`)."""
        bounds = [plan.batch_offsets(int(j))[0] for j in run] + [plan.batch_offsets(int(run[-1]))[1]]
        out = arranged.batch(bounds[0], bounds[-1])
        out.update(bundle_bounds=[b - bounds[0] for b in bounds], epoch=plan.epoch, batch_idx=int(run[0]))
        return out

    # -- convenience ------------------------------------------------------------------------------

    def loader(self, num_workers: int = 0, **kwargs: Any) -> StreamLoader:
        """A ``DataLoader`` over this stream (``batch_size=None``) that records each batch it hands out,
        so :meth:`state_dict` is exact with any ``num_workers``. ``kwargs`` go to ``DataLoader``."""
        return StreamLoader(self, num_workers=num_workers, **kwargs)


class StreamLoader(DataLoader):
    """``DataLoader(stream, batch_size=None)`` that calls ``stream.mark(batch)`` before handing each batch out.

    Workers of a target-only stream send runs of batches as one shared-memory item, unbundled here:
    one file-descriptor hand-over per run instead of one per tensor per batch (each hand-over costs a
    system call and a mapping; ``benchmarks/stream.py`` measures the stream with workers).
    """

    def __init__(self, dataset: TargetStream, **kwargs: Any):
        if kwargs.pop("batch_size", None) is not None:
            raise ValueError("a TargetStream yields whole batches: set its batch_size, not the DataLoader's")
        self.stream = dataset
        self._workers_at: int | None = None  # persistent workers: the epoch their copies will stream next
        kwargs.setdefault("collate_fn", _as_is)  # default_convert would walk every key of every batch
        super().__init__(_Bundled(dataset), batch_size=None, **kwargs)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        persistent = self.persistent_workers and self.num_workers > 0
        if persistent and self._workers_at is not None and (self.stream.epoch, len(self.stream)) != (
            self._workers_at, self.stream.batches_per_epoch
        ):
            raise RuntimeError(
                "persistent_workers keep the stream copy they started with: they can only follow whole epochs in "
                "order, not set_epoch/load_state_dict jumps or a pass left unfinished; use persistent_workers=False"
            )
        start, finished = self.stream.epoch, False
        try:
            for item in super().__iter__():
                for batch in unbundle(item):
                    self.stream.mark(batch)
                    yield batch
            finished = True
        finally:
            if persistent:
                self._workers_at = start + 1 if finished else -1


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


class _Bundled(IterableDataset):
    """The stream as a StreamLoader's workers iterate it: bundles where that helps."""

    def __init__(self, stream: TargetStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.stream._iter(bundle=True, mark=False)  # StreamLoader marks what it hands out

    def __len__(self) -> int:
        return len(self.stream)


def unbundle(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The batches of a bundle (views into its tensors), or the item itself when it is a batch."""
    bounds = item.get("bundle_bounds")
    if bounds is None:
        yield item
        return
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        yield {
            "key": item["key"][a:b], "index": item["index"][a:b], "teacher_logits": item["teacher_logits"][a:b],
            "label": item["label"][a:b], "epoch": item["epoch"], "batch_idx": item["batch_idx"] + i,
        }
