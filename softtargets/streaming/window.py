"""A shuffle window: the rows of some read units, laid out once in batch order; batches are views.

Each logit is copied once on its way from the store's read buffer to the batch: the window's
rows are scattered straight into one tensor in their shuffled order, and every batch is a
slice of it. In a DataLoader worker that tensor is allocated in shared memory, so sending a
batch to the main process moves a handle, not the bytes (the main process maps each window
once). numpy does the copying, on rows viewed as 8-byte words: fancy indexing of float16 items,
and ``torch.index_select``, are slower (``benchmarks/stream.py`` measures the stream against a memory copy).
numpy releases the GIL while it copies, so the pieces of a slab are copied on up to
:func:`copy_threads` threads at once: one core does not reach the memory's bandwidth.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..forksafe import ForkSafeLock
from ..store import TargetStore


@dataclass
class Window:
    """The rows of one window in plan order (before shuffling): ``logits[q]`` holds rows
    ``[starts[q], starts[q + 1])`` as the store returned them (storage dtype; bfloat16 as 16-bit ints)."""

    logits: list[np.ndarray]
    starts: np.ndarray  # int64 [P + 1]
    index: np.ndarray  # int64 [n] store rows
    label: np.ndarray  # int64 [n]
    key: np.ndarray  # str or object [n]
    members: list[dict[str, bytes]] | None  # packed inputs (wds sample layout), or None

    @classmethod
    def read(cls, store: TargetStore, segments: list[tuple[int, int]], packed: bool) -> Window:
        """Rows ``[a, b)`` of each segment, in order, as the store's read-only blocks (views of mapped
        files or of decoded wds shards where it can)."""
        logits, index, label, key, members = [], [], [], [], []
        pieces = window_pieces(store, segments)
        store.prefetch(pieces)  # the window's new shards checked at once; a remote store's bytes fetched at once
        for sid, lo, hi in pieces:
            base = store.shards[sid].start
            block = store.read_block(sid, lo - base, hi - base)
            logits.append(block["logits"])
            label.append(block["label"])
            key.append(block["key"])
            if packed:
                members.extend(store.read_shard(sid)["inputs"][lo - base:hi - base])
            index.append(np.arange(lo, hi, dtype=np.int64))
        starts = np.zeros(len(logits) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in logits], out=starts[1:])
        keys = np.concatenate(key) if key else np.zeros(0, dtype=object)
        return cls(logits, starts, _cat(index), _cat(label), keys, members if packed else None)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def arrange(self, perm: np.ndarray | None, dtype: torch.dtype, buffers: Buffers | None = None, lo: int = 0,
                hi: int | None = None) -> Arranged:
        """Positions ``[lo, hi)`` (default: all) of the window's rows in batch order: row ``perm[i]`` at position
        ``i`` (``None``: as read), in a buffer from ``buffers`` (None: shared memory, for a DataLoader worker).

        The whole window: each piece's rows are scattered straight to their positions (one copy). A slab of
        it: the rows of each piece that fall in the slab are gathered, then scattered (the second copy is of
        bytes still in the CPU's cache); memory then holds the slab, not the window."""
        n = len(self)
        hi = n if hi is None else hi
        shape = (hi - lo, *self.logits[0].shape[1:])
        out = _shared(shape, dtype) if buffers is None else buffers.tensor(shape, dtype)
        dst = _words((out.view(torch.int16) if dtype == torch.bfloat16 else out).numpy())
        order: Any
        copies: list[tuple[int, Callable[[], None]]] = []  # (rows, copy) per piece; they write disjoint rows
        if perm is None:
            for q, part in enumerate(self.logits):
                s = int(self.starts[q])
                a, b = max(s, lo), min(int(self.starts[q + 1]), hi)
                if a < b:
                    copies.append((b - a, functools.partial(_put, dst, slice(a - lo, b - lo), part,
                                                            slice(a - s, b - s))))
            order = slice(lo, hi)
        elif lo == 0 and hi == n:
            where = np.empty(n, dtype=np.int64)
            where[perm] = np.arange(n, dtype=np.int64)  # position of each window row in batch order
            for q, part in enumerate(self.logits):
                at = where[self.starts[q]:self.starts[q + 1]]
                copies.append((len(at), functools.partial(_put, dst, at, part, slice(None))))
            order = perm
        else:
            order = perm[lo:hi]
            piece = np.searchsorted(self.starts, order, side="right") - 1
            by_piece = np.argsort(piece, kind="stable")
            bounds = np.searchsorted(piece[by_piece], np.arange(len(self.logits) + 1))
            for q, part in enumerate(self.logits):
                if bounds[q] < bounds[q + 1]:
                    at = by_piece[bounds[q]:bounds[q + 1]]
                    copies.append((len(at), functools.partial(_put, dst, at, part, order[at] - self.starts[q])))
        run_copies(copies, dst.shape[1] * dst.itemsize)
        members = None if self.members is None else (
            self.members[lo:hi] if perm is None else [self.members[i] for i in perm[lo:hi].tolist()]
        )
        return Arranged(out, torch.from_numpy(self.index[order]), torch.from_numpy(self.label[order]), self.key[order],
                        members, lo)


@dataclass
class Arranged:
    """A window in batch order; ``batch(a, b)`` are views of positions ``[a, b)``."""

    logits: torch.Tensor
    index: torch.Tensor
    label: torch.Tensor
    key: np.ndarray  # str or object [n]
    members: list[dict[str, bytes]] | None
    offset: int = 0  # the window position of row 0 (a slab of a window starts past 0)

    def batch(self, a: int, b: int) -> dict[str, Any]:
        """Window positions ``[a, b)`` (inside this slab)."""
        a, b = a - self.offset, b - self.offset
        out: dict[str, Any] = {
            "key": self.key[a:b].tolist(), "index": self.index[a:b], "teacher_logits": self.logits[a:b],
            "label": self.label[a:b],
        }
        if self.members is not None:
            out["members"] = self.members[a:b]
        return out


def _put(dst: np.ndarray, at: Any, part: np.ndarray, rows: Any) -> None:
    """``dst[at] = part[rows]`` on rows viewed as words (:func:`_words`)."""
    dst[at] = _words(part)[rows]


MAX_COPY_THREADS = 4  # copies of one slab at once; memory bandwidth is shared beyond a few cores
PARALLEL_BYTES = 4 << 20  # a slab smaller than this is copied on the calling thread
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own
_pool_lock = ForkSafeLock()


def copy_threads() -> int:
    """Threads a slab's copies run on: ``torch.get_num_threads()`` (1 in a DataLoader worker; what the
    user set with ``torch.set_num_threads``), at most :data:`MAX_COPY_THREADS`."""
    return max(1, min(MAX_COPY_THREADS, torch.get_num_threads()))


def run_copies(copies: list[tuple[int, Callable[[], None]]], row_bytes: int) -> None:
    """Run ``(rows, copy)`` s, which write disjoint rows of ``row_bytes`` each, spread over :func:`copy_threads`
    threads by rows (the calling thread takes a share); errors are raised here."""
    global _pool
    threads = min(copy_threads(), len(copies))
    if threads <= 1 or sum(r for r, _ in copies) * row_bytes < PARALLEL_BYTES:
        for _, copy in copies:
            copy()
        return
    shares: list[list[Callable[[], None]]] = [[] for _ in range(threads)]
    load = [0] * threads
    for rows, copy in sorted(copies, key=lambda c: -c[0]):
        i = load.index(min(load))
        shares[i].append(copy)
        load[i] += rows
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(MAX_COPY_THREADS - 1, thread_name_prefix="softtargets-copy"))
        pool = _pool[1]
    futures = [pool.submit(_run_all, share) for share in shares[1:]]
    try:
        _run_all(shares[0])
    finally:
        wait(futures)  # no copy is left writing once this returns or raises
    for f in futures:
        f.result()


def _run_all(fns: list[Callable[[], None]]) -> None:
    for fn in fns:
        fn()


def _words(a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` as ``[n, W]`` unsigned words of the widest size dividing a row's bytes.

    numpy's fancy row copies move a row in fewer, wider items as 8-byte words than as float16 items.
    """
    flat = np.ascontiguousarray(a).reshape(a.shape[0], -1).view(np.uint8)
    width = next(w for w in (8, 4, 2, 1) if flat.shape[1] % w == 0)
    return flat.view(f"u{width}")


class Buffers:
    """Window buffers of the main process, used again once nothing refers to them: no batch of the
    window they held is alive (a tensor viewing a numpy array keeps a reference to it). Reuse spares
    the page faults of fresh memory, ~1/3 of arranging a window. Private buffers come from numpy,
    which asks Linux for huge pages."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = ForkSafeLock()  # read-ahead threads take buffers too

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        with self._lock:
            buf = None
            for candidate in self._free:
                # References: the list, ``candidate`` and getrefcount's argument; anything more is a live batch.
                if sys.getrefcount(candidate) == 3 and candidate.nbytes >= nbytes:
                    buf = candidate
                    break
            if buf is None:
                buf = np.empty(nbytes, dtype=np.uint8)
                self._free.append(buf)
                if len(self._free) > self.keep:
                    self._free.pop(0)
            return torch.from_numpy(buf[:nbytes]).view(dtype).reshape(shape)


def _shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor allocated in shared memory (not copied there)."""
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    strides = tuple(int(s) for s in np.cumprod((1, *shape[:0:-1]))[::-1])
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)


def window_pieces(store: TargetStore, segments: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(shard id, lo, hi)`` pieces of the store rows ``[a, b)`` of each segment, in order (see :func:`_pieces`)."""
    return [piece for a, b in segments for piece in _pieces(store, a, b)]


def _pieces(store: TargetStore, a: int, b: int) -> list[tuple[int, int, int]]:
    """``(shard id, lo, hi)`` pieces of rows ``[a, b)``: none crosses a shard, nor a multiple of
    ``store.piece_rows`` from its shard's start (what the store can hand out as one view)."""
    out = []
    block = store.piece_rows
    while a < b:
        sid = store.shard_of(a)
        start = store.shards[sid].start
        hi = min(b, store.shards[sid].stop, start + ((a - start) // block + 1) * block)
        out.append((sid, a, hi))
        a = hi
    return out


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    if not arrays:
        return np.zeros(0, np.int64)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
