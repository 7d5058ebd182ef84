"""A least-recently-used cache that threads can share.

A store is read by several threads of one process at once (the stream's read-ahead threads, the
caller's own ``take``), so its caches take a lock. Values dropped from the cache are released
after the lock is let go: freeing a memory map unmaps it, which releases the GIL. A forked child
(a DataLoader worker) gets its caches' locks new, in case another thread held one at the fork.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from ..forksafe import ForkSafeLock

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """The ``capacity`` values most recently put or got, by key."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = ForkSafeLock()

    def get(self, key: K) -> V | None:
        """The value kept for ``key`` (now the most recent), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        """Keep ``value`` for ``key`` (replacing any), dropping the least recent beyond ``capacity``."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            dropped = [self._items.popitem(last=False) for _ in range(len(self._items) - self.capacity)]
        del dropped  # released here, outside the lock
        return value

    def __len__(self) -> int:
        return len(self._items)
