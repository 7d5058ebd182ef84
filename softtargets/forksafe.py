"""Locks and lazy attributes that a fork cannot leave held.

DataLoader workers are forked while the parent's helper threads (a stream's read-ahead, a writer)
may be anywhere. A lock such a thread held at the fork stays held in the child for good, and the
child's first use of it waits forever. :class:`ForkSafeLock` is made new in a forked child;
:class:`cached_once` caches a computed attribute without the class-wide lock that
``functools.cached_property`` takes on Python < 3.12 (one lock for every instance of the class).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_LOCKS: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for lock in list(_LOCKS):
        lock._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_in_child)


class ForkSafeLock:
    """A ``threading.Lock`` (use it with ``with``) that a forked child gets new and unlocked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _LOCKS.add(self)

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class cached_once(Generic[T]):  # noqa: N801 - used like functools.cached_property
    """A computed attribute stored in the instance's ``__dict__`` on first access, taking no lock.

    Two threads reaching it at once may both compute it; the value must not depend on which wins
    (true of pure functions of the instance's state).
    """

    def __init__(self, fn: Callable[[Any], T]):
        self.fn = fn
        self.name = fn.__name__
        self.__doc__ = fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = self.fn(instance)
        instance.__dict__[self.name] = value
        return value
