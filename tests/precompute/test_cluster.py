"""softtargets.precompute.cluster: how shards are cut into dask tasks, and the LocalCluster workers it starts."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from softtargets.precompute.cluster import MAX_SHARDS_PER_TASK, dask_client, map_shards, task_groups


@pytest.mark.parametrize(("n", "workers", "size"), [(8, 2, 1), (24, 1, 6), (24, 2, 3), (1000, 4, MAX_SHARDS_PER_TASK),
                                                     (3, 8, 1), (5, 0, 2)])
def test_task_groups_are_runs_of_consecutive_shards(n, workers, size):
    groups = task_groups(list(range(n)), workers)
    assert [sid for g in groups for sid in g] == list(range(n))  # every shard once, in order
    assert all(g == list(range(g[0], g[0] + len(g))) for g in groups)
    assert max(map(len, groups)) == size
    assert all(len(g) == size for g in groups[:-1])


def test_task_groups_break_at_gaps():
    # A resumed run's shards to do: runs never span a shard that is done.
    assert task_groups([0, 1, 2, 5, 6, 9], 1) == [[0, 1], [2], [5, 6], [9]]


def _pair(payload: int, ids: list[int]) -> list[tuple[int, int]]:
    return [(payload, i) for i in ids]


def test_local_cluster_workers_and_map_shards():
    """A LocalCluster of one worker process, as precompute starts it: torch's thread count set, dask's
    MALLOC_TRIM_THRESHOLD_ not (it would make every large activation fresh mmapped memory), not daemonic;
    map_shards hands each shard's result to on_result and returns them all."""
    with dask_client(None, workers=1) as client:
        env = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"),
                                  multiprocessing.current_process().daemon))
        assert list(env.values()) == [(None, str(max(1, os.cpu_count() or 1)), False)]
        seen: list[tuple[int, int]] = []
        results = map_shards(_pair, 7, list(range(10)), scheduler=client, on_result=seen.append, name="pairs")
    assert sorted(results) == sorted(seen) == [(7, i) for i in range(10)]
