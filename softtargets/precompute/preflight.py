"""Before any shard of a stage-one job runs on a dask cluster: can every worker run it?

:func:`preflight` runs :func:`check_worker` once on each worker of the cluster (a task pinned to it): the
worker imports the teachers' factories and loads the teachers (reading the weights, or receiving them:
``ship_weights``), checks their fingerprints against the driver's, builds the transfer set, and writes a
probe object where the store goes (then removes it). What it loaded is kept for the job's first shard
task there. Every worker that fails is named in one :class:`~softtargets.errors.PreflightError` with its
address, its host, what failed and the fix; the driver raises it before the store is created.

:func:`ship` sends the job with its teachers' weights from the driver to every worker
(``Client.scatter(..., broadcast=True)``), for clusters without a shared filesystem: the workers then need
the factories' code, not the weight files.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from ..errors import PreflightError, TeacherLoadError
from ..store.access import check_writable, describe_access_error
from .options import PrecomputeJob
from .teachers import Teacher

__all__ = ["check_worker", "preflight", "ship", "shipped_job", "worker_name"]


def worker_name() -> tuple[str, str]:
    """``(address, host)`` of the dask worker this runs on (``("local", host)`` outside one)."""
    try:
        from distributed import get_worker

        address = str(get_worker().address)
    except (ImportError, ValueError):
        address = "local"
    return address, socket.gethostname()


def _fix(exc: BaseException) -> str:
    """What to do about a worker's failure to load a job."""
    if isinstance(exc, ModuleNotFoundError | ImportError):
        return ("install that module on every worker, or put its folder on the workers' PYTHONPATH, and restart "
                "the workers (a worker keeps a module it imported until it restarts)")
    if isinstance(exc, FileNotFoundError | PermissionError) or isinstance(exc, TeacherLoadError) and \
            "not found" in str(exc):
        return ("make the file readable on every worker at the same path (a shared filesystem), or pass "
                "ship_weights=True (--ship-weights) to send the weights from the driver")
    return ""


def check_worker(job: PrecomputeJob, probe: str | None) -> tuple[str, str, str] | None:
    """Dask task, one per worker: ``None`` when this worker can run ``job``, else ``(address, host, problem
    and fix)``. Loads what the job's shard tasks load (kept for them: :func:`.runner.prepare_job`) and
    writes a probe object at ``probe`` (see :func:`softtargets.store.access.check_writable`)."""
    from .runner import prepare_job

    address, host = worker_name()
    try:
        prepare_job(job)
    except Exception as exc:  # noqa: BLE001 - reported, with the worker, to the driver
        fix = _fix(exc)
        return address, host, f"{type(exc).__name__}: {exc}" + (f"; {fix}" if fix else "")
    if probe is not None:
        try:
            check_writable(job.url, job.storage_options, probe)
        except Exception as exc:  # noqa: BLE001
            cause = exc if exc.__cause__ is None else exc.__cause__
            return address, host, f"{exc if cause is exc else describe_access_error(cause)}"
    return None


def preflight(client: Any, job: Any, probe: str | None, token: str) -> None:
    """Run :func:`check_worker` on every worker of ``client``'s cluster (``job``: the job, or its future).

    Raises:
        PreflightError: naming each worker that cannot run the job, with its host and the fix.
        RuntimeError: the cluster has no workers.
    """
    workers = sorted(client.nthreads())
    if not workers:
        raise RuntimeError("the dask cluster has no workers: start some (dask worker SCHEDULER_ADDRESS)")
    futures = [client.submit(check_worker, job, probe, key=f"softtargets-preflight-{token}-{i}", workers=[w],
                             allow_other_workers=False, pure=False, retries=0)
               for i, w in enumerate(workers)]
    failed = [r for r in client.gather(futures) if r is not None]
    client.cancel(futures)
    if failed:
        detail = "; ".join(f"worker {a} on {h}: {why}" for a, h, why in failed)
        raise PreflightError(f"{len(failed)} of {len(workers)} dask workers cannot run this job, nothing was "
                             f"created: {detail}", workers=failed)


def shipped_job(job: PrecomputeJob, loaded: list[Teacher]) -> PrecomputeJob:
    """``job`` with its teachers as the driver loaded them (modules with their weights), to ship.

    Raises:
        ValueError: a teacher is a TorchScript or exported archive (those are read from their files).
    """
    specs: list[Any] = []
    for spec, teacher in zip(job.teachers, loaded, strict=True):
        if isinstance(spec, dict) and ("torchscript" in spec or "exported" in spec):
            raise ValueError(f"teacher {teacher.name!r}: ship_weights sends factory teachers' weights; a TorchScript "
                             "or exported archive must be readable on every worker")
        specs.append({"name": teacher.name, "module": teacher.module})
    return dataclasses.replace(job, teachers=specs)


def ship(client: Any, job: PrecomputeJob) -> Any:
    """``job`` scattered to every worker (``broadcast=True``): its future, for the shard tasks."""
    return client.scatter(job, broadcast=True, hash=False)
