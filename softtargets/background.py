"""Work handed to helper threads so the thread that trains or runs teachers does not wait for it.

numpy, hashlib, file I/O and most torch operations release the GIL, so this work runs beside
the caller on another core.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ahead(items: list[T], fn: Callable[[T], R], name: str = "softtargets-ahead") -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in order, ``fn`` of the next item running in a thread meanwhile."""
    return prefetched(((item, fn(item)) for item in items), depth=1, name=name)


def in_order(items: list[T], fn: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in order, on the calling thread (``ahead``'s synchronous twin)."""
    for item in items:
        yield item, fn(item)


def in_background(fn: Callable[[T], R], item: T, name: str = "softtargets-background") -> Future[R]:
    """``fn(item)`` on a thread of its own, not waited for by anyone who does not ask for the result."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    try:
        return pool.submit(fn, item)
    finally:
        pool.shutdown(wait=False)


def prefetched(items: Iterable[T], depth: int = 2, name: str = "softtargets-prefetch") -> Iterator[T]:
    """The items of ``items`` in order, each taken (``next``) on a helper thread up to ``depth`` items
    before the caller asks for it; its errors are raised to the caller when it reaches them. Closing
    early stops the helper (after the item it is taking). Hand-offs go through ``SimpleQueue`` s (C
    code), so a caller that runs a model between items loses microseconds per item, not a pool's
    Python-level futures."""
    it = iter(items)
    ready: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    room: queue.SimpleQueue[bool] = queue.SimpleQueue()  # one True per item the helper may take
    for _ in range(max(1, depth)):
        room.put(True)

    def fill() -> None:
        try:
            while room.get():
                ready.put((True, next(it)))
        except StopIteration:
            ready.put((False, None))
        except BaseException as exc:  # raised to the caller
            ready.put((False, exc))

    helper = threading.Thread(target=fill, name=name, daemon=True)
    helper.start()
    try:
        while True:
            ok, value = ready.get()
            if not ok:
                if value is None:
                    return
                raise value
            room.put(True)
            yield value
    finally:
        while True:  # take back the helper's room, then tell it to stop
            try:
                room.get_nowait()
            except queue.Empty:
                break
        room.put(False)
        helper.join()
