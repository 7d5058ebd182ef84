"""Independent training tasks on a few processes: the nets here are too small for more than one torch thread,
so two cores are best used by two processes.

:meth:`TaskRunner.map` calls ``fn(*args)`` for every ``args`` in ``tasks`` and returns the results in
task order. With ``workers <= 1`` it runs them in this process; otherwise on one ``spawn`` process
pool (kept for the whole run) whose workers each set ``torch.set_num_threads(threads)``. Every task
seeds its own generators, so a result does not depend on the process that computed it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm.auto import tqdm


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class TaskRunner:
    """Runs lists of independent tasks, on one process pool kept for the whole run (``with`` closes it).

    Args:
        workers: processes; ``<= 1`` runs every task in this process.
        threads: ``torch.set_num_threads`` in each worker process.
        progress: tqdm bars.
    """

    def __init__(self, workers: int, threads: int, progress: bool = True) -> None:
        self.workers, self.threads, self.progress = int(workers), int(threads), progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.threads,))
        return self._pool

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str,
            postfix: Callable[[Any], str] | None = None) -> list[Any]:
        """``[fn(*t) for t in tasks]`` in task order; ``postfix(result)`` labels the bar after each task.

        ``fn`` must be a module-level function and its arguments and results picklable. The first
        failure cancels the tasks not yet started and is raised.
        """
        results: list[Any] = [None] * len(tasks)
        bar = tqdm(total=len(tasks), desc=desc, unit="net", disable=not self.progress, dynamic_ncols=True)
        try:
            if self.workers <= 1:
                for i, t in enumerate(tasks):
                    results[i] = fn(*t)
                    _advance(bar, postfix, results[i])
                return results
            futures = {self.pool().submit(fn, *t): i for i, t in enumerate(tasks)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    _advance(bar, postfix, results[futures[future]])
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
            return results
        finally:
            bar.close()


def _advance(bar: Any, postfix: Callable[[Any], str] | None, result: Any) -> None:
    if postfix is not None:
        bar.set_postfix_str(postfix(result), refresh=False)
    bar.update()
