"""Fan-out of shard tasks on dask.distributed: a LocalCluster by default, or an existing cluster.

:func:`map_shards` submits one task per shard id (``fn(payload, shard_id)``), with the
payload shipped once as a task of its own (so the scheduler can recompute it if the worker
holding it dies), collects the results as they finish and cancels the rest on the first
failure. Tasks must be idempotent: dask recomputes a task whose worker was lost, and retries
one that raised (``retries``). A task returns :class:`TaskFailure` for errors that a retry
would only repeat.

Local clusters: one worker process per visible GPU (one on CPU), two threads each (one
computes while the other finishes writing its shard), not daemonic (so DataLoader workers can
start inside them), no resources (a task asking for a resource nobody has would wait forever).
Dask workers pin no GPU themselves; a shard task picks GPU ``worker name % GPUs``. On a cluster
of your own, start one worker per GPU with ``CUDA_VISIBLE_DEVICES`` set and
``DASK_DISTRIBUTED__WORKER__DAEMON=False`` when the loader uses workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TaskFailure", "dask_client", "default_workers", "map_shards"]


@dataclass
class TaskFailure:
    """A task's deterministic error, returned (not raised) so that dask does not retry it."""

    error: BaseException


def default_workers() -> int:
    """One worker per visible GPU; one on CPU."""
    import torch

    return max(1, torch.cuda.device_count())


def _identity(x: Any) -> Any:
    return x


@contextlib.contextmanager
def dask_client(scheduler: Any = None, workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: the one given, one connected to ``scheduler`` (an address),
    or one on a fresh LocalCluster of ``workers`` processes (closed on exit)."""
    import dask
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
        return
    if isinstance(scheduler, str):
        with Client(scheduler) as client:
            yield client
        return
    if scheduler is not None:
        raise TypeError(f"scheduler must be None, an address string or a distributed.Client, got {scheduler!r}")
    n = int(workers or default_workers())
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    # Workers share the cores (dask's default gives torch 1 thread per worker); set before spawn.
    threads = max(1, (os.cpu_count() or 1) // n)
    config = {f"distributed.nanny.pre-spawn-environ.{v}": threads
              for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    config["distributed.worker.daemon"] = False
    # Worker processes import torch before they answer: on 2 busy cores that can pass dask's 30 s default.
    config["distributed.comm.timeouts.connect"] = "120s"
    with dask.config.set(config), LocalCluster(
        n_workers=n, threads_per_worker=2, processes=True, dashboard_address=":0", silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        yield client


def map_shards(
    fn: Callable[[Any, int], Any],
    payload: Any,
    shard_ids: Sequence[int],
    *,
    scheduler: Any = None,
    workers: int | None = None,
    retries: int = 3,
    on_result: Callable[[Any], None] | None = None,
    name: str = "shards",
) -> list[Any]:
    """Run ``fn(payload, shard_id)`` for every shard id on dask; results in completion order.

    Args:
        fn: a module-level function (workers import it by name).
        payload: picklable, shipped once to the workers that need it.
        scheduler, workers: see :func:`dask_client`.
        retries: times a task that raised is retried (a lost worker does not count).
        on_result: called in this process with each result as it arrives.
        name: prefix of the task keys (unique per run: keys identify results on a shared cluster).

    Raises:
        the error of the first :class:`TaskFailure` or failed task, after cancelling the others.
    """
    from distributed import as_completed

    with dask_client(scheduler, workers) as client:
        with warnings.catch_warnings():  # the payload (teachers) is meant to travel in the graph, once
            warnings.filterwarnings("ignore", message="Sending large graph")
            job = client.submit(_identity, payload, key=f"{name}-payload", pure=False)
        futures = [client.submit(fn, job, sid, key=f"{name}-{sid:06d}", retries=retries, pure=False)
                   for sid in shard_ids]
        results = []
        try:
            for future in as_completed(futures):
                result = future.result()
                if isinstance(result, TaskFailure):
                    raise result.error
                results.append(result)
                if on_result is not None:
                    on_result(result)
        except BaseException:
            client.cancel([*futures, job])
            raise
        client.cancel([job])
        return results
