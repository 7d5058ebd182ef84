"""A remote store's bytes (object storage, http, any fsspec filesystem that is not local): fetched
concurrently in as few requests as the ranges allow, each range once, and kept while they fit.

A reader asks for many ``(file, start, end)`` ranges at once (a shuffle window's inner chunks, or
whole shard files). Those already held are sliced from what is held; the rest are merged per
file where they lie within :data:`GAP_BYTES` of each other (:func:`fsspec.utils.merge_offset_ranges`)
and fetched with one ``cat_ranges`` call, which an asynchronous filesystem (s3, gcs, http) runs
concurrently: a window costs about one round trip, not one per range. What came back is kept
(least recently used first out) up to ``capacity`` bytes, so a range asked for again -- by the
read-ahead thread, then by the reader -- is fetched once.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import fsspec
import numpy as np
from fsspec.utils import merge_offset_ranges

from ..forksafe import ForkSafeLock
from .files import join

GAP_BYTES = 1 << 20  # ranges of one file at most this far apart are fetched as one
CACHE_BYTES = 1 << 30  # bytes of fetched ranges kept per reader (see RemoteFiles)

Range = tuple[str, int, int]  # (path relative to the store's root, start, end) in bytes


class ShortRead(OSError):
    """Fewer bytes came back than a range asked for: the file is shorter (or the server ignores Range)."""

    def __init__(self, rel: str, start: int, end: int, got: int) -> None:
        super().__init__(f"{rel}: asked for bytes {start}-{end - 1}, got {got}")
        self.rel, self.start, self.end, self.got = rel, start, end, got


class RemoteFiles:
    """Byte ranges of the files under ``root`` on ``fs``, fetched with ``cat_ranges`` and kept up to
    ``capacity`` bytes. Threads may share it: fetches take turns (each is concurrent inside), so two
    threads asking for the same range fetch it once. ``requests`` counts the ranges fetched."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, capacity: int = CACHE_BYTES,
                 gap: int = GAP_BYTES) -> None:
        self.fs, self.root, self.capacity, self.gap = fs, root, capacity, gap
        self._pid = os.getpid()
        self.requests = 0
        self._held: OrderedDict[Range, np.ndarray] = OrderedDict()  # least recently used first
        self._by_file: dict[str, set[Range]] = {}
        self._bytes = 0
        self._lock = ForkSafeLock()  # the held ranges
        self._fetching = ForkSafeLock()  # one fetch at a time

    def get(self, wanted: Sequence[Range]) -> list[np.ndarray]:
        """The bytes of each range in ``wanted`` (read-only ``uint8`` arrays, views of what is held).

        Raises:
            FileNotFoundError: a file is missing (its path relative to the root is the error's ``filename``).
            OSError: the filesystem's error for a range, or a range that came back short.
        """
        out: list[np.ndarray | None] = [self._find(r) for r in wanted]
        if any(got is None for got in out):
            with self._fetching:
                fresh = self._fetch([r for r, got in zip(wanted, out, strict=True) if got is None and
                                     self._find(r) is None])  # another thread may have fetched some meanwhile
            for i, r in enumerate(wanted):
                if out[i] is None:
                    got = _covering(fresh, r)
                    out[i] = got if got is not None else self._find(r)
                if out[i] is None:  # held by another thread's fetch, and let go since: fetched again
                    out[i] = self.get([r])[0]
        return out  # type: ignore[return-value]

    def _find(self, r: Range) -> np.ndarray | None:
        rel, a, b = r
        with self._lock:
            for key in self._by_file.get(rel, ()):
                if key[1] <= a and b <= key[2]:
                    self._held.move_to_end(key)
                    return self._held[key][a - key[1]:b - key[1]]
        return None

    def _fetch(self, wanted: list[Range]) -> dict[Range, np.ndarray]:
        """Fetch ``wanted`` (none held), merged per file, in one ``cat_ranges`` call; hold what came back, and
        return it (held or not: more may have come than can be held)."""
        if not wanted:
            return {}
        paths, starts, ends = merge_offset_ranges([r[0] for r in wanted], [r[1] for r in wanted],
                                                  [r[2] for r in wanted], max_gap=self.gap)
        if self._pid != os.getpid():  # a forked child (DataLoader worker): fsspec's async instances are not fork-safe
            self.fs, self._pid = type(self.fs)(**self.fs.storage_options), os.getpid()
        blobs = self.fs.cat_ranges([join(self.root, p) for p in paths], starts, ends, on_error="return")
        self.requests += len(paths)
        fresh: dict[Range, np.ndarray] = {}
        for rel, a, b, blob in zip(paths, starts, ends, blobs, strict=True):
            if isinstance(blob, FileNotFoundError):
                raise FileNotFoundError(2, "missing", rel)
            if isinstance(blob, BaseException):
                raise OSError(f"{rel}: {blob}") from blob
            assert b is not None  # every range asked for has an end
            if len(blob) != b - a:
                raise ShortRead(rel, a, b, len(blob))
            fresh[(rel, a, b)] = self._hold((rel, a, b), np.frombuffer(blob, np.uint8))
        return fresh

    def _hold(self, key: Range, data: np.ndarray) -> np.ndarray:
        with self._lock:
            if key in self._held:
                return data
            self._held[key] = data
            self._by_file.setdefault(key[0], set()).add(key)
            self._bytes += data.nbytes
            dropped = []
            while self._bytes > self.capacity and len(self._held) > 1:
                old, value = self._held.popitem(last=False)
                self._by_file[old[0]].discard(old)
                self._bytes -= value.nbytes
                dropped.append(value)
        del dropped  # released outside the lock
        return data


def _covering(held: dict[Range, np.ndarray], r: Range) -> np.ndarray | None:
    """The bytes of range ``r`` sliced from a range of ``held`` that covers it, or None."""
    rel, a, b = r
    for (path, start, end), data in held.items():
        if path == rel and start <= a and b <= end:
            return data[a - start:b - start]
    return None
