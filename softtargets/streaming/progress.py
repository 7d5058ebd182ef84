"""Which batches of the current epoch were consumed: a set of batch numbers kept as ranges."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import numpy as np


class BatchSet:
    """A set of batch numbers stored as sorted, disjoint, non-adjacent ``[lo, hi)`` ranges.

    Consumption through ``n`` DataLoader workers leaves about ``n`` runs, so the saved
    state stays small whatever the epoch's length.
    """

    def __init__(self, ranges: Iterable[Iterable[int]] = ()):
        self._lo: list[int] = []
        self._hi: list[int] = []
        for lo, hi in sorted((int(a), int(b)) for a, b in ranges):
            if hi <= lo:
                continue
            if self._hi and lo <= self._hi[-1]:
                self._hi[-1] = max(self._hi[-1], hi)
            else:
                self._lo.append(lo)
                self._hi.append(hi)

    def add(self, j: int) -> None:
        i = bisect.bisect_right(self._lo, j) - 1
        if i >= 0 and j < self._hi[i]:
            return
        join_left = i >= 0 and self._hi[i] == j
        join_right = i + 1 < len(self._lo) and self._lo[i + 1] == j + 1
        if join_left and join_right:
            self._hi[i] = self._hi[i + 1]
            del self._lo[i + 1], self._hi[i + 1]
        elif join_left:
            self._hi[i] = j + 1
        elif join_right:
            self._lo[i + 1] = j
        else:
            self._lo.insert(i + 1, j)
            self._hi.insert(i + 1, j + 1)

    def __contains__(self, j: int) -> bool:
        i = bisect.bisect_right(self._lo, j) - 1
        return i >= 0 and j < self._hi[i]

    def __len__(self) -> int:
        return sum(h - lo for lo, h in zip(self._lo, self._hi, strict=True))

    def ranges(self) -> list[list[int]]:
        return [[lo, h] for lo, h in zip(self._lo, self._hi, strict=True)]

    def complement(self, n: int) -> np.ndarray:
        """The numbers in ``[0, n)`` not in the set, ascending (int64)."""
        parts, pos = [], 0
        for lo, h in zip(self._lo, self._hi, strict=True):
            if lo > pos:
                parts.append(np.arange(pos, min(lo, n), dtype=np.int64))
            pos = max(pos, h)
        if pos < n:
            parts.append(np.arange(pos, n, dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
