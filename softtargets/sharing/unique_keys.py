"""Duplicate sample keys among any number of rows, in bounded memory.

Each key is hashed to 64 bits (FNV-1a over its code points, vectorised in numpy, then a
splitmix64 finaliser) and kept with its row number: 16 bytes a row. Records collect in a
buffer of ``buffer_bytes``; when it fills they are split by the hash's top bits into P
partition files in a temporary directory, P chosen so that one partition of the expected
rows fits in ``partition_bytes``. Each partition is then sorted on its own; rows with equal
hashes are candidates, confirmed by comparing the keys themselves (64-bit hashes of 10^9 keys
collide with probability ~3 %, so candidates are never reported unconfirmed).

Memory: the buffer plus one partition (plus its sort); disk: 16 bytes per row, and none
at all when every record fits in the buffer.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

RECORD = np.dtype([("hash", "<u8"), ("row", "<i8")])
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def str_array(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """Keys as a fixed-width numpy unicode array ``[n]`` (from lists, object or variable-width string arrays)."""
    arr = np.asarray(keys)
    if arr.dtype.kind != "U":
        arr = np.asarray(arr.astype(object) if arr.dtype.kind not in "OS" else arr, dtype=str)
    return arr.reshape(-1)


def hash_keys(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """64-bit hashes ``uint64 [n]`` of string keys (equal strings give equal hashes)."""
    arr = str_array(keys)
    n = arr.shape[0]
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0 or arr.dtype.itemsize == 0:
        return _mix(h)
    codes = arr.view(np.uint32).reshape(n, -1)
    for col in codes.T:  # one vectorised step per character position; padding (0) is skipped
        col64 = col.astype(np.uint64)
        h = np.where(col64 != 0, (h ^ col64) * _FNV_PRIME, h)
    return _mix(h)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads FNV's bits so the top bits pick partitions evenly."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass
class Duplicates:
    """Confirmed duplicate keys: ``groups`` maps a key to the rows (>= 2, sorted) that hold it, by first row.

    ``unconfirmed`` counts further groups of equal hashes left unchecked past ``limit``.
    """

    groups: dict[str, list[int]] = field(default_factory=dict)
    unconfirmed: int = 0

    def __bool__(self) -> bool:
        return bool(self.groups) or self.unconfirmed > 0


class KeyChecker:
    """Collects ``(key, row)`` pairs with :meth:`add`, then finds duplicate keys with :meth:`duplicates`.

    Args:
        expected_rows: rows that will be added (sizes the partitions; a guess is fine).
        partition_bytes: most bytes of records one partition may hold (16 bytes a row).
        buffer_bytes: records kept in memory before they are spilled to partition files.
        tmpdir: where partition files go (default: the system's temporary directory).
    """

    def __init__(
        self, expected_rows: int, *, partition_bytes: int = 32 << 20, buffer_bytes: int = 16 << 20,
        tmpdir: str | None = None,
    ):
        parts = max(1, -(-int(expected_rows) * RECORD.itemsize // int(partition_bytes)))
        self.bits = (parts - 1).bit_length()  # P = 2**bits partitions
        self.buffer_rows = max(1, int(buffer_bytes) // RECORD.itemsize)
        self._tmpdir = tmpdir
        self._dir: tempfile.TemporaryDirectory | None = None
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.rows = 0

    def add(self, keys: Sequence[str] | np.ndarray, rows: np.ndarray | int) -> None:
        """Add keys ``[n]`` held by ``rows`` (int64 ``[n]``, or the first row of a contiguous run)."""
        h = hash_keys(keys)
        rec = np.empty(h.shape[0], dtype=RECORD)
        rec["hash"] = h
        if isinstance(rows, (int, np.integer)):
            rec["row"] = np.arange(rows, rows + h.shape[0])
        else:
            rec["row"] = np.asarray(rows, dtype=np.int64)
        self._buffer.append(rec)
        self._buffered += rec.shape[0]
        self.rows += rec.shape[0]
        if self._buffered >= self.buffer_rows:
            self._spill()

    def _partition_of(self, hashes: np.ndarray) -> np.ndarray:
        if self.bits == 0:
            return np.zeros(hashes.shape[0], dtype=np.int64)
        return (hashes >> np.uint64(64 - self.bits)).astype(np.int64)

    def _spill(self) -> None:
        if not self._buffered:
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="softtargets-keys-", dir=self._tmpdir)
        rec = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        part = self._partition_of(rec["hash"])
        order = np.argsort(part, kind="stable")
        rec, part = rec[order], part[order]
        bounds = np.flatnonzero(np.diff(part)) + 1
        for first, chunk in zip(np.concatenate(([0], bounds)), np.split(rec, bounds), strict=True):
            with open(os.path.join(self._dir.name, f"{int(part[first]):06d}.bin"), "ab") as f:
                chunk.tofile(f)

    def _partitions(self) -> Iterator[np.ndarray]:
        if self._dir is None:  # everything fitted in the buffer
            if self._buffer:
                yield np.concatenate(self._buffer)
            return
        self._spill()
        for name in sorted(os.listdir(self._dir.name)):
            yield np.fromfile(os.path.join(self._dir.name, name), dtype=RECORD)

    def candidate_groups(self, limit: int) -> tuple[list[np.ndarray], int]:
        """Up to ``limit`` groups of rows (int64, sorted) sharing a hash, and how many more groups there are."""
        groups: list[np.ndarray] = []
        more = 0
        for rec in self._partitions():
            rec = rec[np.argsort(rec["hash"], kind="stable")]
            bounds = np.flatnonzero(np.diff(rec["hash"])) + 1
            starts = np.concatenate(([0], bounds))
            stops = np.concatenate((bounds, [rec.shape[0]]))
            repeated = stops - starts > 1
            for a, b in zip(starts[repeated], stops[repeated], strict=True):
                if len(groups) < limit:
                    groups.append(np.sort(rec["row"][a:b]))
                else:
                    more += 1
        return groups, more

    def duplicates(self, read_keys: Callable[[np.ndarray], Sequence[str]], limit: int = 1000) -> Duplicates:
        """Confirm candidates by reading their keys: ``read_keys(rows int64 [m], sorted) -> m keys``.

        Checks at most ``limit`` hash groups; the rest are counted in ``Duplicates.unconfirmed``.
        """
        groups, more = self.candidate_groups(limit)
        out = Duplicates(unconfirmed=more)
        if not groups:
            return out
        rows = np.unique(np.concatenate(groups))
        keys = dict(zip(rows.tolist(), read_keys(rows), strict=True))
        for g in groups:
            by_key: dict[str, list[int]] = {}
            for r in g.tolist():
                by_key.setdefault(str(keys[r]), []).append(r)
            for key, rs in by_key.items():
                if len(rs) > 1:
                    out.groups.setdefault(key, []).extend(rs)
        out.groups = {k: sorted(rs) for k, rs in sorted(out.groups.items(), key=lambda kv: min(kv[1]))}
        return out

    def close(self) -> None:
        """Remove the partition files."""
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self._buffer, self._buffered = [], 0

    def __enter__(self) -> KeyChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
