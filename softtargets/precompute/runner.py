"""The compute loop and the writer thread: one :class:`ShardRunner` per process computes shards and writes them.

The transfer set is cut into the store's shards (rows ``[i * shard_rows, (i + 1) * shard_rows)``).
A shard is the unit of work, of retry and of resume: one :class:`ShardRunner` computes a
shard's rows batch by batch, starting at the shard's first row (so results do not depend on
which shards ran before), and writes it whole with ``write_shard`` (atomic, idempotent, marked
done when complete). The driver, :func:`precompute`, creates the store, runs the shards that
are not done yet (in this process, or as dask tasks: :mod:`softtargets.precompute.cluster`) and writes the
manifest last.

Per batch, the compute loop runs every teacher's forward pass under ``torch.inference_mode()`` (and
optional autocast). The rest is done where it costs the compute loop least. On CUDA, on the device:
the logits gathered into one ``[B, K, C]`` float32 tensor, a per-teacher finiteness mask ``[B, K]``,
the store's reduction (:func:`softtargets.math.temperature.reduce_teachers`), an asynchronous copy to the
host. On CPU all of that happens on the writer thread, so the teachers' core only runs teachers.
The background writer thread, fed by a bounded queue, checks and encodes the batches (zero-mean,
storage dtype) so the device does not wait on storage. A local Zarr store's shard files are
written as the batches are encoded (logits from one small buffer that stays in cache); otherwise
a shard's rows fill a buffer of the whole shard, written once its last batch is in. Batches reach
the writer in groups (up to half the queue, never across a shard's end): one wake-up per group.
CUDA groups are joined and encoded at once; CPU batches one by one (a batch's logits stay in
the core's cache from the check to the file; a single float32 teacher's output is read in place).
Gather and shard buffers go back to a pool for reuse (fresh ones would be paid for in page faults
every batch).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..background import prefetched
from ..math.temperature import reduce_teachers
from ..store import attach_writer
from ..store.base import MARKER_DIR, ShardStream, TargetWriter
from ..store.encoding import NonFiniteLogits
from ..store.files import atomic_write, join, remove_file
from ..store.manifest import Manifest, ShardRecord
from .cluster import TaskFailure
from .compact_run import CompactRows
from .options import (
    AUTOCAST,
    INPUT_MEMBER,
    NONFINITE_SUFFIX,
    NonFiniteError,
    PrecomputeJob,
    RunOptions,
    check_autocast,
    load_transfer_set,
    resolve_device,
)
from .teachers import Teacher, load_teachers
from .transfer import Batch, TransferSet

_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _device_lock(device: torch.device) -> threading.Lock:
    """One compute loop per device per process; a second dask thread meanwhile writes its shard."""
    with _LOCKS_LOCK:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


_IMPORT_THREADS = torch.get_num_threads()  # the process's setting before any writer thread of this module set 1


def teacher_threads() -> int:
    """The torch threads teachers run with, set in the compute loop's thread each time it runs them.

    On the main thread, its own count (the user's ``torch.set_num_threads``); on any other thread (a dask
    worker's, a user's), the process's count when this module was imported (``OMP_NUM_THREADS``, or
    torch's default). A thread starts with the count any thread set last, e.g. 1 from a writer thread,
    so a helper thread's own count says nothing, and 1 thread gives other bits than 2.
    """
    if threading.current_thread() is threading.main_thread():
        return torch.get_num_threads()
    return _IMPORT_THREADS


# ---------------------------------------------------------------------------------------------------
# Computing and writing shards


@dataclass
class _Item:
    """One computed batch on its way to the writer thread (CPU tensors once ``event`` completes), or there
    a group of CUDA batches combined (``ShardRunner._combine``), or a CPU batch reduced (``_reduce``)."""

    shard: int
    keys: list[str]
    logits: torch.Tensor | list[torch.Tensor]  # [B, K, C] or [B, C] float32; CPU: the K teachers' [B, C]
    bad: torch.Tensor | None  # [B, K] bool: teacher k gave a non-finite row; None: not checked yet
    labels: torch.Tensor  # [B] int64
    x: torch.Tensor | None  # [B, ...] inputs, when packed
    event: Any = None  # torch.cuda.Event: the device-to-host copies are done


@dataclass
class _Part:
    """A shard's batches so far, encoded for the store (``TargetWriter.encode``), in row order: in its
    ``stream`` (``TargetWriter.shard_stream``: its files, written as the rows come), or kept here."""

    logits: np.ndarray | None  # [rows, K, C] or [rows, C], storage dtype, filled batch by batch; None: streamed
    keys: list[np.ndarray] = field(default_factory=list)  # [B] str
    labels: list[np.ndarray] = field(default_factory=list)  # [B] int64
    inputs: list[dict[str, Any]] = field(default_factory=list)  # one per row, when packed
    rows: int = 0
    nonfinite: dict[str, list[str]] = field(default_factory=dict)
    stream: ShardStream | None = None


_END = object()


class _ShardWriterThread(threading.Thread):
    """Takes computed batches from a bounded queue, encodes them into their shards (streamed to the shard's
    files, or kept until its last row) and completes each shard once all its rows are in.

    The queue is two ``SimpleQueue`` s (C code: a put costs the compute loop microseconds): groups of
    items, and ``queue_size`` tokens of room, one per batch, that the compute loop takes and the
    writer gives back. A group is handed over at its shard's last batch or at ``queue_size // 2``
    batches, so the compute loop always has room for the next group while the writer works.
    """

    def __init__(self, runner: ShardRunner, queue_size: int, prepare: Callable[[], None] | None = None,
                 threads: int | None = None) -> None:
        super().__init__(name="softtargets-writer", daemon=True)
        self.runner = runner
        self.prepare = prepare
        self.threads = threads or torch.get_num_threads()  # set back on exit (threads started later inherit it)
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.room: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(queue_size):
            self.room.put(None)
        self.group_size = max(1, queue_size // 2)
        self._group: list[_Item] = []  # the compute loop's batches not handed over yet
        self.parts: dict[int, _Part] = {}
        self._encoded: np.ndarray | None = None  # a streamed batch's stored logits (CUDA: a group's), reused
        self.records: list[ShardRecord] = []
        self.error: BaseException | None = None

    def put(self, item: _Item, shard_done: bool) -> None:
        """Queue ``item`` once there is room (``shard_done``: it is its shard's last batch); raises the
        writer's error if it has failed."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.room.get(timeout=0.05)
                break
            except queue.Empty:
                if not self.is_alive():  # it may have failed since the check above
                    if self.error is not None:
                        raise self.error from None
                    raise RuntimeError("the shard writer thread stopped") from None
        self._group.append(item)
        if shard_done or len(self._group) == self.group_size:
            self.queue.put(self._group)
            self._group = []

    def finish(self) -> list[ShardRecord]:
        """Wait for every queued shard to be written; returns their records in write order."""
        if self._group:  # not a shard's end: the loop stopped early
            raise RuntimeError("finish() before the last batch of a shard")
        self.queue.put(_END)
        self.join()
        if self.error is not None:
            raise self.error
        return self.records

    def drain(self) -> None:
        """After a failure upstream: write the shards whose rows are all queued, drop partial ones.

        Nothing computed is thrown away that a resume could keep (batches not handed over belong to
        a shard whose last batch never came); errors of the writer itself (if it is the one that
        failed) are left to the caller's exception.
        """
        self._group = []
        self.queue.put(_END)  # past the room tokens: the compute loop has stopped
        self.join()

    def run(self) -> None:
        # One torch thread here: encoding must not take the teachers' cores. Threads started meanwhile
        # inherit 1; on exit the teachers' count is set back, so threads started later get it.
        torch.set_num_threads(1)
        try:
            if self.prepare is not None:
                self.prepare()
            with torch.inference_mode():
                while True:
                    group = self.queue.get()
                    if group is _END:
                        return
                    self._take(group)
                    for _ in group:
                        self.room.put(None)
        except BaseException as exc:  # handed to the compute thread
            self.error = exc
        finally:
            torch.set_num_threads(self.threads)
            for part in self.parts.values():  # shards left unfinished by a failure
                if part.stream is not None:
                    part.stream.discard()

    def _take(self, group: list[_Item]) -> None:
        runner = self.runner
        if not isinstance(group[0].logits, list):  # CUDA: reduced and checked on the device already
            self._add(runner._combine(group), None, None)
            return
        for item in group:  # CPU: batch by batch, so each batch's rows stay in cache while encoded and written
            self._add(*runner._reduce(item))

    def _add(self, item: _Item, teachers: torch.Tensor | None, buffer: torch.Tensor | None) -> None:
        """Encode ``item`` (reduced) into its shard, and write the shard once complete. ``teachers``: the
        batch's ``[B, K, C]`` teacher logits (CPU), searched for NaN/Inf if encoding refuses the reduced
        ones; ``buffer``: a pooled buffer to give back once encoded."""
        runner = self.runner
        start, stop = runner.spec.shard_range(item.shard)
        part = self.parts.get(item.shard)
        if part is None:
            stream = runner.writer.shard_stream(item.shard)
            part = self.parts[item.shard] = _Part(None if stream else runner._shard_buffer(stop - start), stream=stream)
        if item.bad is not None and item.bad.any():
            part.nonfinite.update(runner._nonfinite(item))
        rows = len(item.keys)
        if part.stream is None:
            assert part.logits is not None  # not streamed: the shard's rows are kept in part.logits
            out = part.logits[part.rows:part.rows + rows]
        else:
            if self._encoded is None or self._encoded.shape[0] < rows:
                self._encoded = np.empty((rows, *runner.spec.logits_shape[1:]), runner.spec.storage_dtype)
            out = self._encoded[:rows]
        try:
            runner._encode(item, part, out)
        except NonFiniteLogits:
            if teachers is not None and item.bad is None:  # which teachers, which keys (NonFiniteError)
                runner._nonfinite(replace(item, bad=_nonfinite_rows(teachers, "error")))
            raise
        if buffer is not None:
            runner._free.put(buffer)
        if part.rows == stop - start:
            self.records.append(runner._write(item.shard, self.parts.pop(item.shard)))
            if part.logits is not None:
                runner._free_shards.put(part.logits)


def _nonfinite_rows(logits: torch.Tensor, nonfinite: str) -> torch.Tensor:
    """``[B, K]`` bool of ``logits [B, K, C]``: teacher k's row holds NaN/Inf. With ``nonfinite="uniform"``
    those rows are zeroed in place; with ``"error"`` the writer thread raises.

    A row's sum is NaN/Inf iff the row holds one (or overflows float32: garbage either way): one
    pass, no ``[B, K, C]`` mask.
    """
    bad = ~torch.isfinite(logits.sum(dim=-1))
    if nonfinite == "uniform":
        logits.masked_fill_(bad[..., None], 0.0)
    return bad


def _reuse(pool: queue.SimpleQueue[Any], shape: tuple[int, ...]) -> Any:
    """A buffer of ``shape`` from ``pool``, or None; buffers of other shapes (a short last batch or
    shard, reduced logits) are dropped, so a pool holds at most the buffers in flight."""
    while True:
        try:
            buffer = pool.get_nowait()
        except queue.Empty:
            return None
        if tuple(buffer.shape) == shape:
            return buffer


class _BatchFetcher(Dataset):
    """Map-style dataset whose items are whole batches: ``fetcher[indices]`` is ``transfer_set.batch(indices)``."""

    def __init__(self, transfer_set: TransferSet) -> None:
        self.transfer_set = transfer_set

    def __getitem__(self, indices: range) -> Batch:
        return self.transfer_set.batch(indices)


def _as_is(batch: Batch) -> Batch:
    """The DataLoader's ``collate_fn`` for batches fetched whole (picklable, for worker processes)."""
    return batch


class ShardRunner:
    """Computes and writes whole shards of one store on one device.

    Args:
        teachers: the loaded ensemble (moved to ``device`` here).
        transfer_set: the inputs; row ``i`` of the store is ``transfer_set[i]``.
        writer: a writer of the unfinished store (``create_targets`` or ``attach_writer``).
        options: see :class:`RunOptions`.
    """

    def __init__(self, teachers: Sequence[Teacher], transfer_set: TransferSet, writer: TargetWriter,
                 options: RunOptions) -> None:
        self.options = options
        self.device = resolve_device(options.device)
        check_autocast(self.device, options.autocast)
        self.teachers = list(teachers)
        for t in self.teachers:
            t.module.to(self.device)
        self.transfer_set = transfer_set
        self.writer = writer
        self._batches: list[range] = []
        self._dataloader: DataLoader | None = None
        # Buffers handed back for reuse by writer threads (fresh pages each batch or shard would cost page faults):
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # CPU [B, K, C] float32 logits
        self._free_shards: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()  # a shard's stored logits
        self._workers = int(options.num_workers)
        if self._workers and multiprocessing.current_process().daemon:
            warnings.warn("this process is daemonic (a dask worker with distributed.worker.daemon=True) and "
                          "cannot start DataLoader workers; loading in the process (num_workers=0)", stacklevel=2)
            self._workers = 0
        self.spec: Manifest = writer.spec
        if len(transfer_set) != self.spec.num_samples:
            raise ValueError(f"the transfer set has {len(transfer_set)} samples, the store {writer.url} "
                             f"expects {self.spec.num_samples}")
        if options.pack_inputs and not self.spec.inputs:
            raise ValueError(f"{writer.url}: pack_inputs needs a store created with inputs (wds 'sample' layout)")
        self.compact = CompactRows(self.spec, [t.module for t in self.teachers], self.device) \
            if self.spec.compact is not None else None

    # -- the compute loop -------------------------------------------------------------------------

    def run(self, shard_ids: Sequence[int], on_rows: Callable[[int], None] | None = None,
            prepare: Callable[[], None] | None = None) -> list[ShardRecord]:
        """Compute and write ``shard_ids``; returns their records (in the order they were written).

        ``on_rows(n)`` is called after each batch's forward pass. On an error, shards whose rows
        were all computed are still written (a resume keeps them), then the error is raised.
        Batches are fetched on a helper thread, two ahead, so this loop only runs teachers.
        ``prepare()``, if given, runs first on the writer thread (creating the store meanwhile).

        The teachers run on this thread with :func:`teacher_threads` torch threads (this thread's own
        count is set back on return). DataLoader workers fork before this run starts its helper
        threads: a child forked while a thread holds a lock or a subprocess's pipe can leave that
        thread waiting forever.
        """
        threads, before = teacher_threads(), torch.get_num_threads()
        torch.set_num_threads(threads)
        sink: _ShardWriterThread | None = None
        try:
            with _device_lock(self.device), torch.inference_mode():
                batches = self._loader(shard_ids)  # DataLoader workers start here, on this thread
                sink = _ShardWriterThread(self, self.options.queue_size, prepare, threads)
                sink.start()
                for shard, shard_done, batch in prefetched(batches, name="softtargets-loader"):
                    sink.put(self._forward(shard, batch), shard_done)
                    if on_rows is not None:
                        on_rows(len(batch.keys))
            records = sink.finish()
            self.writer.sync()  # on disk before the driver's manifest says so
            return records
        except BaseException:
            if sink is not None:
                sink.drain()
            raise
        finally:
            torch.set_num_threads(before)

    def _loader(self, shard_ids: Sequence[int]) -> Iterator[tuple[int, bool, Batch]]:
        """``(shard id, last batch of the shard, batch)``: batches of ``batch_size`` rows in shard order;
        each shard's first batch starts at its first row.

        Each batch is fetched whole by :meth:`TransferSet.batch` (one slice of a ``TensorDataset``).
        With ``num_workers=0`` that happens as the batches are taken (pinned for CUDA); otherwise one
        DataLoader per runner, with persistent workers: a dask worker process runs many shard tasks, and
        its DataLoader workers start once (they are spawned there: seconds each). They start (fork)
        here, on the calling thread, not on the thread that later takes the batches.
        """
        bs = int(self.options.batch_size)
        batches = []
        for sid in shard_ids:
            start, stop = self.spec.shard_range(sid)
            batches += [range(lo, min(lo + bs, stop)) for lo in range(start, stop, bs)]
        cuda = self.device.type == "cuda"
        rows = self.spec.shard_rows
        ends = {self.spec.shard_range(sid)[1] for sid in shard_ids}
        if not self._workers:
            fetched: Iterator[Batch] = (self.transfer_set.batch(indices, copy=False) for indices in batches)
            if cuda:  # x may view the dataset: only read, or pinned (a copy)
                fetched = (batch._replace(x=batch.x.pin_memory()) for batch in fetched)
        else:
            self._batches[:] = batches  # the loader's batch sampler, read at each iter()
            if self._dataloader is None:
                self._dataloader = DataLoader(
                    _BatchFetcher(self.transfer_set), sampler=self._batches, batch_size=None,
                    collate_fn=_as_is,  # type: ignore[arg-type]  # batch_size=None: gets items; stub assumes lists
                    num_workers=self._workers, persistent_workers=True, pin_memory=cuda,
                )
            fetched = iter(self._dataloader)  # forks the workers (first call) or resets them
        return ((indices[0] // rows, indices.stop in ends, batch)
                for indices, batch in zip(batches, fetched, strict=True))

    def _forward(self, shard: int, batch: Batch) -> _Item:
        """All K teachers on one batch of ``shard`` (call under ``torch.inference_mode()``). On CUDA also the
        store's reduction and an async copy to the host; on CPU the outputs go to the writer thread as
        they are (it gathers and reduces them)."""
        b, c = len(batch.keys), self.spec.num_classes
        # No .to() where x is there already: even a no-op call lets the writer thread take the GIL.
        x = batch.x if batch.x.device == self.device else batch.x.to(self.device, non_blocking=True)
        autocast = contextlib.nullcontext() if self.options.autocast is None else torch.autocast(
            device_type=self.device.type, dtype=AUTOCAST[self.options.autocast])
        with autocast:
            outputs = [t.module(x) for t in self.teachers]
        for t, out in zip(self.teachers, outputs, strict=True):
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b, c):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"teacher {t.name!r} returned {got} for a batch of {b} "
                                 f"(shard {shard}); expected logits [{b}, {c}]")
        x_host = batch.x if self.options.pack_inputs else None
        if self.compact is not None:  # compact rows: encoded here, on the device; only the records go to the host
            logits = torch.stack(outputs, dim=1).float()
            bad = _nonfinite_rows(logits, self.options.nonfinite)
            records = self.compact.encode(shard, logits)
            return _Item(shard, batch.keys, records.cpu(), bad.cpu(), batch.labels, x_host)
        if self.device.type != "cuda":
            return _Item(shard, batch.keys, outputs, None, batch.labels, x_host)
        logits = torch.stack(outputs, dim=1).float()  # [B, K, C] float32 (autocast may give bf16/fp16)
        bad = _nonfinite_rows(logits, self.options.nonfinite)  # before the reduction mixes rows
        reduced = reduce_teachers(logits, self.spec.content, self.spec.temperature or 1.0)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (reduced, bad)]
        for dst, src in zip(host, (reduced, bad), strict=True):
            dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Item(shard, batch.keys, host[0], host[1], batch.labels, x_host, event)

    # -- on the writer thread ---------------------------------------------------------------------

    def _nonfinite(self, item: _Item) -> dict[str, list[str]]:
        """``{key: [teacher names]}`` of the batch's non-finite rows, or :class:`NonFiniteError`."""
        found: dict[str, list[str]] = {}
        assert item.bad is not None  # called only for checked batches
        for row, k in item.bad.nonzero().tolist():
            found.setdefault(item.keys[row], []).append(self.teachers[k].name)
        if self.options.nonfinite == "error":
            by_teacher: dict[str, list[str]] = {}
            for key, names in found.items():
                for name in names:
                    by_teacher.setdefault(name, []).append(key)
            detail = "; ".join(f"teacher {n!r} on {len(ks)} samples, keys {ks[:8]}" for n, ks in by_teacher.items())
            raise NonFiniteError(f"NaN/Inf teacher logits in shard {item.shard} of {self.writer.url}: {detail}. "
                                 "Fix the teacher or drop those samples, or pass nonfinite='uniform' to store a "
                                 "uniform distribution for them (listed in the manifest)",
                                 url=self.writer.url, shard=item.shard, teachers=by_teacher, keys=list(found))
        return found

    def _combine(self, group: list[_Item]) -> _Item:
        """One item for a group of consecutive CUDA batches of one shard (reduced and checked on the device)."""
        def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

        first = group[0]
        logits: list[torch.Tensor] = []
        bad: list[torch.Tensor] = []
        xs: list[torch.Tensor] = []
        for it in group:
            if it.event is not None:  # None: compact records, copied already
                it.event.synchronize()
            # CUDA items: reduced and checked on the device; x packed in all of them or none
            assert isinstance(it.logits, torch.Tensor) and it.bad is not None
            logits.append(it.logits)
            bad.append(it.bad)
            if first.x is not None:
                assert it.x is not None
                xs.append(it.x)
        return _Item(first.shard, list(itertools.chain.from_iterable(it.keys for it in group)),
                     joined(logits), joined(bad),
                     joined([it.labels for it in group]), None if first.x is None else joined(xs))

    def _reduce(self, item: _Item) -> tuple[_Item, torch.Tensor, torch.Tensor | None]:
        """A CPU batch reduced for the store (and checked, with ``nonfinite="uniform"``; with ``"error"``
        NaN/Inf are looked for only when encoding refuses the result: they survive every reduction).
        Returns it, its teachers' logits ``[B, K, C]`` float32 and the pooled buffer holding them (or None)."""
        assert isinstance(item.logits, list)  # a CPU batch: the K teachers' outputs
        teachers, buffer = self._gather(item.logits)
        bad = _nonfinite_rows(teachers, "uniform") if self.options.nonfinite == "uniform" else None
        logits = reduce_teachers(teachers, self.spec.content, self.spec.temperature or 1.0)
        return replace(item, logits=logits, bad=bad), teachers, buffer

    def _gather(self, outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch's K teacher outputs ``[B, C]`` (any float dtype) as one ``[B, K, C]`` float32 tensor, and
        the buffer of this runner's that holds it: None where it is a view of a single float32 output
        (nothing writes to it then; ``nonfinite="uniform"`` does, and gets a copy)."""
        if len(outputs) == 1 and outputs[0].dtype == torch.float32 and self.options.nonfinite != "uniform":
            return outputs[0][:, None, :], None
        shape = (len(outputs[0]), len(outputs), outputs[0].shape[1])
        buffer = _reuse(self._free, shape)
        if buffer is None:
            buffer = torch.empty(shape, dtype=torch.float32)
        torch.stack(outputs, dim=1, out=buffer)
        return buffer, buffer

    def _shard_buffer(self, rows: int) -> np.ndarray:
        """An array for a shard's stored logits ``[rows, K, C]`` or ``[rows, C]``: a written shard's, or new."""
        shape = (rows, *self.spec.logits_shape[1:])
        reused = _reuse(self._free_shards, shape)
        return np.empty(shape, self.spec.storage_dtype) if reused is None else reused

    def _encode(self, item: _Item, part: _Part, out: np.ndarray) -> None:
        """Check and encode ``item`` for the store (``TargetWriter.encode``; stored logits into ``out``) and add
        it to ``part``."""
        inputs: list[dict[str, Any]] | None = None
        if self.options.pack_inputs:
            assert item.x is not None  # packed: _forward kept the inputs
            inputs = [{INPUT_MEMBER: x.numpy()} for x in item.x]
        _, keys, labels = self.writer.encode(item.keys, item.logits, item.labels, inputs, out=out)
        if part.stream is not None:
            part.stream.append(out, labels, keys, inputs)
        else:
            part.keys.append(keys)
            part.labels.append(labels)
            part.inputs += inputs or ()
        part.rows += len(keys)

    def _write(self, shard: int, part: _Part) -> ShardRecord:
        side = join(self.writer.root, f"{MARKER_DIR}/{shard:06d}{NONFINITE_SUFFIX}")
        if part.nonfinite:
            atomic_write(self.writer.fs, side, json.dumps(part.nonfinite, sort_keys=True).encode())
        else:
            remove_file(self.writer.fs, side)
        if self.compact is not None:
            self.compact.write_stats(self.writer, shard)
        if part.stream is not None:
            return self.writer.write_shard(shard, stream=part.stream)
        inputs = part.inputs if self.options.pack_inputs else None
        return self.writer.write_shard(shard, np.concatenate(part.keys), part.logits, np.concatenate(part.labels),
                                       inputs, encoded=True)


# ---------------------------------------------------------------------------------------------------
# One runner per process per job (dask tasks)

_RUNNERS: dict[str, ShardRunner] = {}
_RUNNERS_LOCK = threading.Lock()
_PREPARED: dict[str, tuple[list[Teacher], TransferSet]] = {}  # job token -> what its pre-flight loaded here
_PREPARED_LOCK = threading.Lock()


def runner_for(job: PrecomputeJob) -> ShardRunner:
    """This process's runner for ``job``: teachers loaded once, checked against the driver's fingerprints."""
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(job.token)
        if runner is None:
            _RUNNERS.clear()  # one job at a time: free the previous job's teachers
            runner = _RUNNERS[job.token] = _make_runner(job)
        return runner


def prepare_job(job: PrecomputeJob) -> tuple[list[Teacher], TransferSet]:
    """``job``'s teachers and transfer set, loaded in this process and checked against the driver's; kept for
    the job's runner here (a pre-flight check loads them before the store exists)."""
    with _PREPARED_LOCK:
        if job.token in _PREPARED:
            return _PREPARED[job.token]
    prepared = _load_job(job)
    with _PREPARED_LOCK:
        _PREPARED.clear()  # one job at a time
        _PREPARED[job.token] = prepared
    return prepared


def _make_runner(job: PrecomputeJob) -> ShardRunner:
    with _PREPARED_LOCK:
        prepared = _PREPARED.pop(job.token, None)
    teachers, ts = _load_job(job) if prepared is None else prepared
    return ShardRunner(teachers, ts, attach_writer(job.url, job.storage_options), job.options)


def _load_job(job: PrecomputeJob) -> tuple[list[Teacher], TransferSet]:
    teachers = load_teachers(job.teachers)
    for t, want in zip(teachers, job.fingerprints, strict=True):
        if t.sha256 != want:
            raise ValueError(f"teacher {t.name!r} loaded in this process has other weights (sha256 {t.sha256[:12]}) "
                             f"than on the driver ({want[:12]}): its factory is not deterministic; give it "
                             "'weights' or seed it")
    ts = load_transfer_set(job.dataset)
    if len(ts) != job.num_samples:
        raise ValueError(f"the transfer set built in this process has {len(ts)} samples, the driver's "
                         f"{job.num_samples}")
    if ts.key_source != "item" and ts.fingerprint != job.dataset_fingerprint:
        raise ValueError("the transfer set built in this process has other keys than the driver's; its factory "
                         "must be deterministic")
    return teachers, ts


_NOT_RETRIED = (NonFiniteError, ValueError, TypeError, OverflowError, ImportError)


def run_shard_task(job: PrecomputeJob, shard_ids: list[int]) -> list[ShardRecord] | TaskFailure:
    """Dask task: compute and write shards ``shard_ids`` of ``job``'s store (one compute loop); their records.

    Deterministic errors (bad teacher output, NaN/Inf, bad data, import errors) come back as
    :class:`TaskFailure`; others (I/O, a lost DataLoader worker) raise, and dask retries them.
    """
    try:
        runner = runner_for(job)
    except Exception as exc:  # noqa: BLE001 - loading the job again here would fail again: not retried
        return TaskFailure(_on_worker(exc))
    try:
        return runner.run(shard_ids)
    except _NOT_RETRIED as exc:
        return TaskFailure(exc)


def _on_worker(exc: BaseException) -> BaseException:
    """``exc`` (a shard task's failure to load its job) with the worker's address and host in its message."""
    import socket

    try:
        from distributed import get_worker

        where = f"dask worker {get_worker().address} on {socket.gethostname()}"
    except (ImportError, ValueError):
        return exc
    try:  # the same type, so callers catch what they would have caught in this process
        return type(exc)(f"{where}: {exc}")
    except Exception:  # noqa: BLE001 - a constructor that takes other arguments
        return RuntimeError(f"{where} cannot load the job: {type(exc).__name__}: {exc}")
