"""Read-only memory maps of a local store's files: a row range becomes a view, not a read.

Finished stores never change, so their files can be mapped: a reader then copies each
logit once, from the page cache straight into the batch, instead of reading it into a
buffer first (or, for zarr, through its asynchronous codec pipeline). A file truncated
while mapped raises SIGBUS on access; the size check at open catches one truncated before.
"""

from __future__ import annotations

import mmap

import numpy as np

from .lru import Lru


def map_file(path: str) -> np.ndarray:
    """The bytes of ``path`` as a read-only ``uint8`` array backed by a private memory map.

    The map lives as long as any view of the array does."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)


class MappedFiles:
    """The most recently used ``capacity`` maps, keyed by path; threads may share it. A map dropped
    from here is unmapped once the last view of it is gone. Pages a process touched through a map
    count in its RSS while mapped, so few are kept: mapping a file again costs a system call and a
    few page faults (fault-around maps 64 KiB a fault), far less than the reads it replaces."""

    def __init__(self, capacity: int = 8):
        self._maps: Lru[str, np.ndarray] = Lru(capacity)

    def __call__(self, path: str) -> np.ndarray:
        buf = self._maps.get(path)
        return self._maps.put(path, map_file(path)) if buf is None else buf
