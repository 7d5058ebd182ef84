"""One opened store read by several threads at once (a stream's read-ahead threads beside the
caller's own ``take``), over real zarr shard files and real tar shards: every read gives the stored
rows, and the caches of maps and decoded shards stay whole while threads evict from them; a fork
while a thread holds a cache lock leaves the child a free one."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import softtargets as st
from softtargets.store.lru import Lru
from tests.store_data import LAYOUTS, keys, store_path, write_store

N, C, SHARD = 480, 6, 16  # 30 shards: far more than the caches hold, so threads evict all the time
THREADS, READS = 4, 40


@pytest.mark.parametrize("layout", LAYOUTS)
def test_threads_share_one_store(tmp_path, layout):
    x = torch.randn(N, C, generator=torch.Generator().manual_seed(4))
    path = store_path(tmp_path, layout)
    write_store(path, x, layout=layout, dtype="float32", content="geometric", shard_rows=SHARD, block_rows=8)
    store = st.open_targets(path)
    ref = store[:]["logits"]  # one thread, every shard checked once: the threads then race on the caches only
    assert torch.allclose(ref, x - x.mean(-1, keepdim=True), atol=1e-6)  # geometric: stored centred
    errors: list[BaseException] = []
    mismatches: list[int] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(READS):
                idx = rng.integers(0, N, size=int(rng.integers(1, 40)))
                got = store.take(idx)
                if not (torch.equal(got["logits"], ref[idx]) and got["key"] == [keys(1, i)[0] for i in idx]):
                    mismatches.append(seed)
        except BaseException as e:  # noqa: BLE001 (reported below, with its thread's seed)
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []


def test_lru_keeps_the_most_recent():
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1), lru.put("b", 2)
    assert lru.get("a") == 1  # now "b" is the least recent
    lru.put("c", 3)
    assert (lru.get("b"), lru.get("a"), lru.get("c"), len(lru)) == (None, 1, 3, 2)
    assert lru.put("a", 4) == 4 and lru.get("a") == 4 and len(lru) == 2
    with pytest.raises(ValueError, match="at least 1"):
        Lru(0)


def test_a_forked_child_gets_a_free_lock():
    """A fork while another thread holds a cache's lock (a read-ahead thread mid-put) must not leave the
    child's copy of the cache locked for good."""
    import multiprocessing

    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    with lru._lock:  # as if a thread were inside put at the fork
        child = ctx.Process(target=lambda: result.put((lru.get("a"), lru.put("b", 2))))
        child.start()
    child.join(10)
    if child.is_alive():  # stuck on the lock it was forked with
        child.kill()
    assert child.exitcode == 0 and result.get(timeout=5) == (1, 2)
