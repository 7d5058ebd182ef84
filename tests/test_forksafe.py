"""A fork (a DataLoader worker starting) while another thread is inside a lock or a lazily computed
attribute leaves the child able to take that lock and compute that attribute."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from softtargets.forksafe import ForkSafeLock
from softtargets.store.lru import Lru
from softtargets.streaming.plan import EpochPlan, SplitConfig, Units

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

UNITS = Units.from_shards([(0, 400_000)], unit_rows=1, grouped=False)  # an epoch order of ~10 ms
CFG = SplitConfig(batch_size=16, seed=1)


def _child_finishes(work, timeout: float = 10.0) -> bool:
    """Fork; the child runs ``work()`` and exits 0. True when it exits 0 within ``timeout`` s."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            work()
        finally:
            os._exit(0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def test_forks_while_another_thread_computes_an_epoch_plan_do_not_hang():
    stop = threading.Event()

    def plans() -> None:  # the stream's read-ahead thread: next epochs' first windows
        epoch = 0
        while not stop.is_set():
            EpochPlan(UNITS, CFG, epoch, 0).segments(0, 16)
            epoch += 1

    thread = threading.Thread(target=plans, daemon=True)
    thread.start()
    try:
        finished = [_child_finishes(lambda: EpochPlan(UNITS, CFG, 10_000, 0).segments(0, 16)) for _ in range(12)]
    finally:
        stop.set()
        thread.join()
    assert all(finished), f"{finished.count(False)} of {len(finished)} forked children hung"


@pytest.mark.parametrize("make", [ForkSafeLock, lambda: Lru(2)._lock], ids=["lock", "lru"])
def test_a_lock_held_by_another_thread_at_the_fork_is_free_in_the_child(make):
    lock = make()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        assert lock.locked()

        def take() -> None:
            with lock:
                pass

        assert _child_finishes(take, timeout=5.0)
    finally:
        release.set()
        thread.join()
