"""Fan-out of shard tasks on dask.distributed: a LocalCluster, or an existing cluster.

:func:`resolve_scheduler` picks the engine of ``precompute(scheduler=None)``: this process when at
most one CUDA device is visible, a LocalCluster when there are several.

:func:`map_shards` submits one task per run of consecutive shard ids (``fn(payload, shard_ids)``,
at most ``MAX_SHARDS_PER_TASK`` shards, about four tasks per worker), with the payload shipped once
as a task of its own (so the scheduler can recompute it if the worker holding it dies), collects
the results as they finish and cancels the rest on the first failure. A task runs its shards through
one compute loop (a task per shard would pay per shard for thread starts, a device-lock hand-off,
a flush to disk before returning; ``benchmarks/precompute.py`` measures the dask engine). Tasks must be
idempotent: dask recomputes a task whose
worker was lost, and retries one that raised (``retries``); shards it had finished are written again,
bitwise the same. A task returns :class:`TaskFailure` for errors that a retry would only repeat.

Local clusters: one worker process per visible GPU (one on CPU), two threads each (one
computes while the other finishes writing its shard), not daemonic (so DataLoader workers can
start inside them), no resources (a task asking for a resource nobody has would wait forever).
Dask workers pin no GPU themselves; a shard task picks GPU ``worker name % GPUs``. On a cluster
of your own, start one worker per GPU with ``CUDA_VISIBLE_DEVICES`` set and
``DASK_DISTRIBUTED__WORKER__DAEMON=False`` when the loader uses workers, and without dask's
``MALLOC_TRIM_THRESHOLD_`` (see :func:`worker_config`): put
``distributed: {nanny: {pre-spawn-environ: {MALLOC_TRIM_THRESHOLD_: null}}}`` in the workers' dask config
file (an environment variable cannot: dask lowercases the key it names).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeGuard

__all__ = [
    "LOCAL_CLUSTER", "MAX_SHARDS_PER_TASK", "TaskFailure", "check_main_guard", "dask_client", "default_workers",
    "map_shards", "resolve_scheduler", "task_groups", "worker_config",
]

LOCAL_CLUSTER = "dask"  # scheduler value: a fresh dask LocalCluster

MAX_SHARDS_PER_TASK = 8  # progress is reported per task: keep tasks small enough to show it
TASKS_PER_WORKER = 4  # enough to balance the load and to lose little to a lost worker


@dataclass
class TaskFailure:
    """A task's deterministic error, returned (not raised) so that dask does not retry it."""

    error: BaseException


def resolve_scheduler(scheduler: Any = None) -> Any:
    """The engine ``scheduler`` names: ``"local"`` (this process, no dask), :data:`LOCAL_CLUSTER` (a fresh
    dask LocalCluster), or the address or ``distributed.Client`` given.

    ``None`` is ``"local"`` where at most one CUDA device is visible (nothing to fan out, and no worker
    processes to start: a script needs no ``__main__`` guard), else a LocalCluster (one worker per GPU).
    """
    if scheduler is None:
        import torch

        return "local" if torch.cuda.device_count() <= 1 else LOCAL_CLUSTER
    if isinstance(scheduler, str) and not scheduler:
        raise ValueError('scheduler must not be empty; use None (automatic), "local", "dask" or "tcp://HOST:PORT"')
    return scheduler


def _is_main_guard(node: ast.AST) -> TypeGuard[ast.If]:
    """``node`` is ``if __name__ == "__main__":`` (either operand order)."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Eq)):
        return False
    sides = [node.test.left, *node.test.comparators]
    return any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides) and any(
        isinstance(x, ast.Constant) and x.value == "__main__" for x in sides)


def _unguarded_main_line() -> tuple[str, int] | None:
    """``(script, line)`` where the running script's top-level code made this call outside an
    ``if __name__ == "__main__":`` block; None when it did not (or there is no script: a notebook, ``-c``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path:
        return None
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None:
        return None
    line = frame.f_lineno
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    guarded = any(_is_main_guard(node) and node.body[0].lineno <= line <= (node.body[-1].end_lineno or line)
                  for node in ast.walk(tree))
    return None if guarded else (path, line)


def check_main_guard() -> None:
    """Refuse to start a LocalCluster from a script's top-level code outside ``if __name__ == "__main__":``.

    Its worker processes start by importing the script again (dask's default ``spawn``), which would run
    the call again in each of them; dask then fails with pages of ``Nanny failed to start``.

    Raises:
        RuntimeError: called (directly or not) from unguarded top-level code of the running script.
    """
    import dask

    if dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "fork":
        return
    found = _unguarded_main_line()
    if found is not None:
        path, line = found
        raise RuntimeError(f'a dask LocalCluster\'s worker processes import {path} again and would rerun line {line}: '
                           'put that code under `if __name__ == "__main__":`, or pass scheduler="local"')


def default_workers() -> int:
    """One worker per visible GPU; one on CPU."""
    import torch

    return max(1, torch.cuda.device_count())


def worker_config(threads: int) -> dict[str, Any]:
    """dask config for LocalCluster worker processes that run teachers on ``threads`` torch threads each.

    Environment set before a worker spawns: the thread counts, and dask's ``MALLOC_TRIM_THRESHOLD_``
    unset. Setting that variable (dask does, to hand freed memory back to the OS) also fixes glibc's
    mmap threshold at 128 KiB, so every activation or output of 128 KiB and more is fresh mmapped memory,
    paid for in page faults at each forward pass, which slows the teachers in such a worker
    (``benchmarks/precompute.py`` measures the dask engine against a bare loop). Not daemonic, so DataLoader
    workers can start inside; a 120 s connect timeout,
    since worker processes import torch before they answer (on 2 busy cores that can pass dask's 30 s).
    """
    env = "distributed.nanny.pre-spawn-environ"
    config: dict[str, Any] = {f"{env}.{v}": threads for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                "OPENBLAS_NUM_THREADS")}
    config[f"{env}.MALLOC_TRIM_THRESHOLD_"] = None  # None: not set (dask's own convention)
    config["distributed.worker.daemon"] = False
    config["distributed.comm.timeouts.connect"] = "120s"
    return config


def _identity(x: Any) -> Any:
    return x


@contextlib.contextmanager
def dask_client(scheduler: Any = None, workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: the one given, one connected to ``scheduler`` (an address),
    or, for ``None`` or :data:`LOCAL_CLUSTER`, one on a fresh LocalCluster of ``workers`` processes
    (closed on exit; see :func:`check_main_guard`)."""
    import dask
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
        return
    if isinstance(scheduler, str) and scheduler not in (LOCAL_CLUSTER, "local"):
        with Client(scheduler) as client:
            yield client
        return
    if scheduler not in (None, LOCAL_CLUSTER):
        raise TypeError(f'scheduler must be None or "dask" (a LocalCluster), an address string or a '
                        f"distributed.Client, got {scheduler!r}")
    check_main_guard()
    n = int(workers or default_workers())
    if n < 1:
        raise ValueError(f"workers must be >= 1, got {n}")
    # Workers share the cores (dask's default gives torch 1 thread per worker).
    with dask.config.set(worker_config(max(1, (os.cpu_count() or 1) // n))), LocalCluster(
        n_workers=n, threads_per_worker=2, processes=True, dashboard_address=":0", silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        yield client


def task_groups(shard_ids: Sequence[int], workers: int) -> list[list[int]]:
    """``shard_ids`` cut into runs of consecutive ids, one per task: about ``TASKS_PER_WORKER`` tasks per
    worker, at most ``MAX_SHARDS_PER_TASK`` shards each; a gap in the ids starts a new run."""
    size = max(1, min(MAX_SHARDS_PER_TASK, -(-len(shard_ids) // (TASKS_PER_WORKER * max(1, workers)))))
    groups: list[list[int]] = []
    for sid in shard_ids:
        if groups and len(groups[-1]) < size and groups[-1][-1] + 1 == sid:
            groups[-1].append(sid)
        else:
            groups.append([sid])
    return groups


def map_shards(
    fn: Callable[[Any, list[int]], Any],
    payload: Any,
    shard_ids: Sequence[int],
    *,
    scheduler: Any = None,
    workers: int | None = None,
    retries: int = 3,
    on_result: Callable[[Any], None] | None = None,
    name: str = "shards",
) -> list[Any]:
    """Run ``fn(payload, ids)`` over :func:`task_groups` of ``shard_ids`` on dask; results in completion order.

    Args:
        fn: a module-level function (workers import it by name) returning a list of results, one per shard id,
            or a :class:`TaskFailure`.
        payload: picklable, shipped once to the workers that need it.
        scheduler, workers: see :func:`dask_client`.
        retries: times a task that raised is retried (a lost worker does not count).
        on_result: called in this process with each shard's result as its task's results arrive.
        name: prefix of the task keys (unique per run: keys identify results on a shared cluster).

    Raises:
        the error of the first :class:`TaskFailure` or failed task, after cancelling the others.
    """
    from distributed import Future, as_completed

    with dask_client(scheduler, workers) as client:
        if isinstance(payload, Future):  # on the workers already (scattered)
            job = payload
        else:
            with warnings.catch_warnings():  # the payload (teachers) is meant to travel in the graph, once
                warnings.filterwarnings("ignore", message="Sending large graph")
                job = client.submit(_identity, payload, key=f"{name}-payload", pure=False)
        groups = task_groups(shard_ids, len(client.nthreads()))
        futures = [client.submit(fn, job, ids, key=f"{name}-{ids[0]:06d}-{ids[-1]:06d}", retries=retries, pure=False)
                   for ids in groups]
        results = []
        try:
            for future in as_completed(futures):
                done = future.result()
                if isinstance(done, TaskFailure):
                    raise done.error
                results += done
                if on_result is not None:
                    for result in done:
                        on_result(result)
        except BaseException:
            client.cancel([*futures, job])
            raise
        client.cancel([job])
        return results
