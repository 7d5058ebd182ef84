"""Stage one: run a teacher ensemble over a transfer set once and write its logits to a target store.

The driver, :func:`precompute`: checks its arguments, creates (or resumes) the store, runs the shards not done
yet with :mod:`.runner` (here, or as dask tasks through :mod:`.cluster`) and writes the manifest last.
The options every process shares are in :mod:`.options`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..choices import Autocast, Compressor, Content, Dtype, Layout, NonFinite, Overflow
from ..math.compact import as_compact_spec
from ..store import BYTES_PER_DTYPE, LAYOUTS, create_targets, default_rows, layout_class, open_targets
from ..store.access import check_writable, probe_location
from ..store.base import MARKER_DIR, TargetWriter
from ..store.compact_rows import write_head
from ..store.files import atomic_write, is_local, join, url_to_fs
from ..store.manifest import Manifest, ShardRecord
from .cluster import LOCAL_CLUSTER, check_main_guard, dask_client, resolve_scheduler
from .compact_run import collect_stats
from .contents import head_weights, hidden_size_of
from .hints import add_hints
from .options import (
    INPUT_MEMBER,
    NONFINITE_SUFFIX,
    SETTINGS_FILE,
    PrecomputeJob,
    RunOptions,
    check_autocast,
    load_transfer_set,
    resolve_device,
)
from .runner import ShardRunner, run_shard_task
from .specialists import add_specialists, split_specialists
from .teachers import TeacherSpec, load_teachers, module_device, num_classes_of
from .transfer import TransferSet, check_unique_keys
from .views import Augment, ViewCapture

__all__ = ["precompute"]

log = logging.getLogger("softtargets.precompute")


# ---------------------------------------------------------------------------------------------------
# The driver


def _refuse_existing(url: str, storage_options: dict | None) -> None:
    fs, root = url_to_fs(url, **(storage_options or {}))
    if fs.exists(root) and (not fs.isdir(root) or fs.ls(root)):
        raise FileExistsError(f"{url} exists; pass resume=True to continue an unfinished run, or overwrite=True "
                              "to replace it")


def _check_settings(writer: TargetWriter, settings: dict[str, Any], resumed: bool) -> None:
    """Record the run settings beside the shard markers; on resume, refuse different ones."""
    path = join(writer.root, SETTINGS_FILE)
    if resumed and writer.fs.exists(path):
        before = json.loads(writer.fs.cat_file(path))
        diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume {writer.url} with other settings ({detail}): shards would differ; "
                             "use the original settings or overwrite=True")
        return
    atomic_write(writer.fs, path, json.dumps(settings, sort_keys=True).encode())


def _collect_nonfinite(writer: TargetWriter) -> dict[str, list[str]]:
    marker_dir = join(writer.root, MARKER_DIR)
    found: dict[str, list[str]] = {}
    if writer.fs.exists(marker_dir):
        for path in sorted(writer.fs.ls(marker_dir, detail=False)):
            if path.endswith(NONFINITE_SUFFIX):
                found.update(json.loads(writer.fs.cat_file(path)))
    return found


@contextlib.contextmanager
def _existing_cluster(scheduler: Any, needed: bool) -> Iterator[Any]:
    """A client of the existing dask cluster ``scheduler`` names (an address or a ``distributed.Client``), open
    for the whole run when ``needed`` (pre-flight, shipped weights); else None (a LocalCluster, or this
    process: their workers share this machine's files and modules)."""
    if not needed or scheduler in ("local", LOCAL_CLUSTER) or scheduler is None:
        yield None
        return
    with dask_client(scheduler) as client:
        yield client


def _example_batch(ts: TransferSet) -> torch.Tensor:
    return ts.batch(range(min(2, len(ts)))).x


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", unit_scale=True, dynamic_ncols=True, desc=desc,
                disable=not enabled or None)


def precompute(
    teachers: Sequence[TeacherSpec],
    dataset: Any,
    out: str | os.PathLike[str],
    *,
    content: Content = "per_teacher",
    temperature: float | None = None,
    layout: Layout | None = None,
    dtype: Dtype = "float16",
    shard_rows: int | None = None,
    block_rows: int | None = None,
    compressor: Compressor = "none",
    overflow: Overflow = "error",
    class_names: Sequence[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    device: str = "auto",
    autocast: Autocast | None = None,
    nonfinite: NonFinite = "error",
    pack_inputs: bool = False,
    scheduler: Any = None,
    workers: int | None = None,
    retries: int = 3,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_rows: Callable[[int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
    hints: Sequence[str] | Mapping[str, str] | None = None,
    specialist_top: int = 1,
    ship_weights: bool = False,
    preflight: bool = True,
    views: int | None = None,
    augment: Augment | None = None,
    seed: int = 0,
    compact: Any = None,
) -> Manifest:
    """Run ``teachers`` over ``dataset`` once and write their logits to a target store at ``out``.

    Args:
        teachers: K teacher specs: ``nn.Module`` objects or config mappings (see
            :func:`softtargets.precompute.teachers.load_teacher`). They must agree on C.
        dataset: a :class:`TransferSet`, a map-style dataset, WebDataset URL(s), or a mapping for
            :func:`load_transfer_set`. Keys must be unique. Inputs are stacked per batch as given.
        out: the store's path or fsspec URL.
        content: ``per_teacher`` (``[N, K, C]``), ``geometric`` (mean logits ``[N, C]``) or
            ``arithmetic`` (``log mean_k softmax(v_k / T0)`` ``[N, C]``; needs ``temperature=T0``).
        layout: as in
            :func:`softtargets.create_targets`. A shard is also the unit of work and of resume.
        dtype: see ``layout``.
        shard_rows: see ``layout``.
        block_rows: see ``layout``.
        compressor: see ``layout``.
        overflow: see ``layout``.
        class_names: see ``layout``.
        batch_size: see :class:`RunOptions`.
            ``pack_inputs`` writes a wds ``sample``-layout store with ``input.npy`` beside each row.
        num_workers: see ``batch_size``.
        device: see ``batch_size``.
        autocast: see ``batch_size``.
        nonfinite: see ``batch_size``.
        pack_inputs: see ``batch_size``.
        scheduler: ``None`` (automatic: ``"local"`` where at most one CUDA device is visible, else
            ``"dask"``), ``"local"`` (this process, no dask), ``"dask"`` (a fresh dask ``LocalCluster``:
            one worker process per visible GPU, one on CPU; a script must make the call under
            ``if __name__ == "__main__":``, as its workers import it again), a scheduler address
            ``"tcp://host:port"``, or a ``distributed.Client``.
        workers: LocalCluster workers (default: one per GPU, one on CPU); unused by other schedulers.
        retries: dask retries of a failed shard task (a lost worker is recomputed by dask anyway).
        resume: continue an unfinished store: shards that are complete and verified are kept.
        overwrite: replace whatever is at ``out``. Without either, an existing ``out`` is refused.
        progress: a tqdm bar (samples/s, ETA).
        on_rows: called with each number of rows this run computes (a resumed store's kept shards are
            not counted): their sum is this run's work, e.g. for its samples/s.
        hints: FitNets hints to store beside the logits, ``["TEACHER:MODULE", ...]`` or ``{name:
            "TEACHER:MODULE"}``: each module's output flattened to ``[N, D]`` float16
            (:func:`softtargets.precompute.hints.add_hints`, a second pass once the logits are stored).
        specialist_top: teacher entries with ``classes = [...]`` (and optionally ``oversample``) are
            specialists, run after the logits are stored
            (:func:`softtargets.precompute.specialists.add_specialists`); one is active for a row when its
            subset holds one of the generalist's ``specialist_top`` classes.
        storage_options: fsspec options of ``out``'s filesystem (s3fs: ``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``); sent to dask workers with the job, never written into the
            store. An object store is checked first with a probe object (one line naming the fix, nothing created).
        ship_weights: on dask, send the teachers as loaded here (modules with their weights) to every worker
            (``Client.scatter(..., broadcast=True)``), for workers that cannot read the weight files; they still
            import the factories.
        preflight: on dask, check every worker before the store is created
            (:func:`softtargets.precompute.preflight.preflight`): imports, weights, transfer set, output.

        views: V: run the teachers on V augmented views of every sample instead of the sample itself; the store
            holds ``N * V`` rows, view-major, and each view's parameters (:mod:`softtargets.precompute.views`).
        augment: with ``views``: ``augment(x, rng) -> (x_view, params)`` (:class:`~.views.ViewCapture`).
        seed: with ``views``: the store seed the views' generators are seeded from, with each sample's key.

    Returns:
        The written :class:`Manifest`. The store is complete only once this returns; a failed or
        killed run leaves no manifest (``open_targets`` refuses it) and can be resumed.
    """
    if resume and overwrite:
        raise ValueError("pass resume=True or overwrite=True, not both")
    options = RunOptions(batch_size=batch_size, num_workers=num_workers, device=device, autocast=autocast,
                         nonfinite=nonfinite, pack_inputs=pack_inputs)
    url = os.fspath(out)
    remote = not is_local(url_to_fs(url, **(storage_options or {}))[0])
    if remote:  # credentials, endpoint, bucket: one line now, not a traceback once the store is half made
        check_writable(url, storage_options)
    if not (resume or overwrite):
        _refuse_existing(url, storage_options)
    if pack_inputs and layout and not (layout in LAYOUTS and layout_class(layout).packs_inputs):
        raise ValueError(f"pack_inputs writes inputs into tar samples: it needs layout='wds', not {layout!r}")
    scheduler = resolve_scheduler(scheduler)
    local = scheduler == "local"
    if local or scheduler == LOCAL_CLUSTER:
        check_autocast(resolve_device(device), autocast)
    if scheduler == LOCAL_CLUSTER:
        check_main_guard()  # before the store exists: an unguarded script would leave half of one

    teachers, specialists = split_specialists(teachers)
    if not teachers:
        raise ValueError("every teacher declares 'classes' (a specialist): give at least one generalist")
    loaded = load_teachers(teachers)
    ts = load_transfer_set(dataset)
    capture = None
    if views is not None:
        capture = ViewCapture(ts, views, augment, seed)
        ts = dataset = capture.transfer_set  # dask workers get the views, not the samples
    elif augment is not None:
        raise ValueError("augment= is used with views=V (the number of views per sample)")
    n = len(ts)
    if n == 0:
        raise ValueError("the transfer set is empty")
    if ts.key_source != "index":  # keys "0".."N-1" are unique as they are
        check_unique_keys(ts.all_keys())
    num_classes = num_classes_of(loaded, _example_batch(ts))

    if shard_rows is not None and block_rows is None:  # a read unit that divides the shard
        k = len(loaded) if content == "per_teacher" else 1
        auto_block, _ = default_rows(BYTES_PER_DTYPE.get(dtype, 4) * num_classes * k)
        block_rows = math.gcd(int(shard_rows), auto_block)
    job = None if local else PrecomputeJob(
        url=url, teachers=list(teachers), fingerprints=[t.sha256 for t in loaded],
        dataset=dataset if isinstance(dataset, Mapping) else ts, num_samples=n,
        dataset_fingerprint=ts.fingerprint, options=options, storage_options=storage_options,
    )
    with _existing_cluster(scheduler, preflight or ship_weights) as client:
        payload: Any = job
        if client is not None and job is not None:
            if ship_weights:
                from .preflight import ship, shipped_job

                payload = ship(client, shipped_job(job, loaded))
            if preflight:  # before the store exists: a worker that cannot run the job leaves nothing behind
                from .preflight import preflight as check_workers

                check_workers(client, payload, probe_location(url, storage_options), job.token)
        # A new store in this process is created on the writer thread while the first batches compute, once the
        # teachers' fingerprints (hashed on helper threads meanwhile) are in: start-up does not wait for either.
        defer = local and not resume
        compact_spec = None if compact is None else as_compact_spec(compact)
        hidden_size = hidden_size_of([t.module for t in loaded], compact_spec.head, content) \
            if compact_spec is not None and compact_spec.kind == "hidden" else None
        writer = create_targets(
            url, num_classes=num_classes, content=content, teachers=None if defer else [t.info() for t in loaded],
            num_teachers=len(loaded), layout=layout or ("wds" if pack_inputs else None), dtype=dtype,
            temperature=temperature, overflow=overflow, num_samples=n, shard_rows=shard_rows, block_rows=block_rows,
            sample_layout="sample" if pack_inputs else "block",
            inputs={INPUT_MEMBER: "the transfer-set input x of this row"} if pack_inputs else None,
            class_names=class_names, transfer_set={"name": ts.name, "fingerprint": ts.fingerprint},
            compressor=compressor, overwrite=overwrite, resume=resume, storage_options=storage_options, defer=defer,
            views=None if capture is None else capture.declaration,
            compact=compact_spec, hidden_size=hidden_size,
        )
        spec = writer.spec

        def prepare() -> None:
            spec.teachers = [t.info() for t in loaded]
            writer.prepare()
            _check_settings(writer, options.settings(), resumed=resume)
            if compact_spec is not None and compact_spec.kind == "hidden":
                write_head(writer.fs, writer.root, spec, *head_weights([t.module for t in loaded],
                                                                      compact_spec.head, content))

        done = writer.completed_shards(verify=True) if resume else {}
        if not defer:
            prepare()
        todo = [i for i in range(spec.num_shards) if i not in done]
        if done:
            log.info("resuming %s: %d of %d shards already complete, %d to do", url, len(done), spec.num_shards,
                     len(todo))
        rows_todo = sum(spec.shard_range(i)[1] - spec.shard_range(i)[0] for i in todo)

        with _progress(rows_todo, progress, "precompute") as bar:
            def update(rows: int) -> None:
                bar.update(rows)
                if on_rows is not None:
                    on_rows(rows)

            if not todo:
                records: list[ShardRecord] = []
            elif local:
                # The runner moves the caller's modules to the device; they go back where they were afterwards.
                homes = [module_device(t.module) for t in loaded]
                runner = None
                try:
                    runner = ShardRunner(loaded, ts, writer, options)
                    records = runner.run(todo, on_rows=update, prepare=prepare if defer else None)
                finally:
                    if runner is not None and runner.compact is not None:
                        runner.compact.close()  # no head hooks left on the caller's modules
                    for t, home in zip(loaded, homes, strict=True):
                        if home is not None:
                            t.module.to(home)
            else:
                from .cluster import map_shards

                assert job is not None  # not local
                records = map_shards(run_shard_task, payload, todo, scheduler=client or scheduler, workers=workers,
                                     retries=retries, on_result=lambda rec: update(rec.rows),
                                     name=f"softtargets-{job.token}")
    if defer and not todo:
        prepare()
    spec.extra["precompute"] = options.settings()
    nonfinite_rows = _collect_nonfinite(writer)
    if nonfinite_rows:
        spec.extra["nonfinite"] = {"policy": options.nonfinite, "rows": nonfinite_rows}
        log.warning("%d samples had NaN/Inf teacher logits, stored as uniform: see manifest extra['nonfinite']",
                    len(nonfinite_rows))
    if capture is not None:
        capture.write_params(writer)
    collect_stats(writer)
    manifest = writer.finalize([*done.values(), *records])
    if specialists or hints:
        store = open_targets(url, storage_options=storage_options)
    if specialists:
        manifest = add_specialists(store, specialists, ts, top=specialist_top, batch_size=batch_size, device=device)
    if hints:
        manifest = add_hints(store, loaded, hints, ts, batch_size=batch_size, device=device)
    return manifest

