"""Stage one's overhead: `softtargets.precompute` against a bare loop of teacher forward passes.

    python benchmarks/precompute.py                # ~5 min on 2 CPU cores
    python benchmarks/precompute.py --samples 4096 --repeats 1
    python benchmarks/precompute.py --engines local --teachers 1 --hidden 384 --samples 262144 \
        --shard-rows 65536 --repeats 7             # teachers of ~5-6 ms a batch, the default shard size

The same in-memory inputs and the same K teachers (MLPs 512-H-H-1000, H = ``--hidden`` = 1024 by
default: ~2.6 M parameters, 14-23 ms per batch of 256 on one core of a 2-vCPU Xeon VM) run:

* ``bare``: ``for each batch: [t(x) for t in teachers]`` under ``torch.inference_mode()``, nothing kept;
* ``local``: ``precompute(..., scheduler="local")``, per-teacher float16 logits into a Zarr store
  (teacher loading and fingerprinting, key checks, the class-count probe, writes and checksums included);
* ``dask-warm``: the dask engine on a LocalCluster (1 worker process) started beforehand (each run
  still ships the teachers and loads them in the worker);
* ``dask``: the default engine as a user gets it, a fresh LocalCluster (start-up included), run once.

Teachers run on ``--threads`` torch threads (default 1; the other core is left to the writer
thread, as a GPU run leaves the CPU to it). Overhead = (engine - bare) / bare, wall clock, minimum
of ``--repeats`` interleaved runs; ``local`` against bare runs made with no dask cluster alive (an idle
cluster's heartbeats take CPU), ``dask-warm`` against bare runs made while its cluster idles; also in
CPU seconds of this process (bare and local only: dask
computes in its worker), which a busy machine disturbs less. ``paired`` is the median over the repeats
of (engine run i - bare run i) / bare run i: each engine run against the bare loop run just before it,
which cancels the drift of this shared VM's speed over minutes (dask-warm, local only). ``in-run`` (local
only) is the median of (precompute wall - the time its own forward passes took) / that forward time,
timed by hooks on the teachers: the software's overhead within one run, whatever the machine's speed
that minute, but blind to forward passes slowed by the writer thread (which the other two include).
``fwd slow`` (local only) is that slowdown: the median of (time in forward passes during a precompute run)
/ (time in forward passes of the bare run before it) - 1, by the same hooks. ``in-run`` + ``fwd slow``
is roughly the paired overhead.
``fixed ms`` is
the local engine's cost per run that does not grow with the data (creating the store, fingerprinting the
teachers, writing the manifest...): precompute minus the bare loop over a single batch (best of the
repeats).
The load average goes into the JSON.
Prints a table and writes JSON (default ``benchmarks/results/precompute.json``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import write_report
from torch import nn
from torch.utils.data import TensorDataset

from softtargets.precompute import precompute
from softtargets.precompute.cluster import worker_config

IN, HIDDEN, CLASSES = 512, 1024, 1000


def teacher(seed: int, hidden: int = HIDDEN) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES)).eval()


class ForwardClock:
    """Seconds spent inside the teachers' forward passes (hooks on each model), read and reset per run."""

    def __init__(self, models: list[nn.Module]):
        self.seconds, self._t0 = 0.0, 0.0
        for m in models:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, *_: object) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._t0

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def bare_loop(models: list[nn.Module], x: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of the forward passes alone."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            batch = x[lo:lo + batch_size]
            for m in models:
                m(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_precompute(models: list[nn.Module], data: TensorDataset, out: Path, batch_size: int, shard_rows: int,
                   scheduler: object) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all of it for the local engine, the driver's for dask)."""
    if out.exists():
        shutil.rmtree(out)
    specs = [{"name": f"t{i}", "module": m} for i, m in enumerate(models)]
    wall, cpu = time.perf_counter(), time.process_time()
    precompute(specs, data, out, batch_size=batch_size, shard_rows=shard_rows, num_workers=0, scheduler=scheduler,
               progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24576)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--teachers", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="teachers' hidden width (sets ms per batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the teachers (here and in the warm dask worker); the other cores "
                             "are left to the writer thread")
    parser.add_argument("--engines", nargs="+", default=["local", "dask-warm", "dask"],
                        choices=["local", "dask-warm", "dask"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "precompute.json")
    args = parser.parse_args()

    import dask
    from distributed import Client, LocalCluster

    torch.set_num_threads(args.threads)
    spawn_env = worker_config(args.threads)  # the warm cluster's workers, set up as softtargets sets up its own
    x = torch.randn(args.samples, IN, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x)
    tmp = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    rows = []
    engines = args.engines
    with dask.config.set(spawn_env):
        for k in args.teachers:
            models = [teacher(i, args.hidden) for i in range(k)]
            with torch.inference_mode():  # warm-up: first calls allocate
                for m in models:
                    m(x[: args.batch_size])
            clock = ForwardClock(models)
            beyond: list[float] = []  # local runs: (wall - time in forward passes) / time in forward passes
            slower: list[float] = []  # local runs: time in forward passes / that of the bare run before - 1
            times: dict[str, list[tuple[float, float]]] = {"bare": []}
            one = x[: args.batch_size]
            small: dict[str, list[float]] = {"bare": [], "local": []}  # one batch: the fixed cost per run
            if "local" in engines:  # no cluster alive meanwhile: its heartbeats would take CPU from both
                times["local"] = []
                for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
                    times["bare"].append(bare_loop(models, x, args.batch_size))
                    bare_forward = clock.take()
                    times["local"].append(run_precompute(models, data, tmp / "l.zarr", args.batch_size,
                                                         args.shard_rows, "local"))
                    forward = clock.take()
                    beyond.append((times["local"][-1][0] - forward) / forward)
                    slower.append(forward / bare_forward - 1)
                    small["bare"].append(bare_loop(models, one, args.batch_size)[0])
                    small["local"].append(run_precompute(models, TensorDataset(one), tmp / "s.zarr",
                                                         args.batch_size, args.shard_rows, "local")[0])
            references = {"local": times["bare"]}
            if "dask-warm" in engines:  # against bare runs made while the warm cluster idles
                times["dask-warm"], references["dask-warm"] = [], []
                with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster, Client(cluster) as warm:
                    for _ in range(args.repeats):
                        references["dask-warm"].append(bare_loop(models, x, args.batch_size))
                        times["dask-warm"].append(run_precompute(models, data, tmp / "w.zarr", args.batch_size,
                                                                 args.shard_rows, warm))
                times["bare"] = times["bare"] or references["dask-warm"]
            if "dask" in engines:  # a fresh LocalCluster, once, as a user gets it
                times["dask"] = [run_precompute(models, data, tmp / "d.zarr", args.batch_size, args.shard_rows,
                                                "dask")]
            if not times["bare"]:
                times["bare"] = [bare_loop(models, x, args.batch_size) for _ in range(args.repeats)]
            bare, bare_cpu = min(w for w, _ in times["bare"]), min(c for _, c in times["bare"])
            batches = -(-args.samples // args.batch_size)
            for engine, ts in times.items():
                best = min(w for w, _ in ts)
                cpu = min(c for _, c in ts) if engine in ("bare", "local") else None
                ref = references.get(engine)
                base = bare if ref is None else min(b for b, _ in ref)
                rows.append({
                    "teachers": k, "engine": engine, "seconds": round(best, 3),
                    "all_seconds": [round(w, 3) for w, _ in ts],
                    "samples_per_s": round(args.samples / best, 1),
                    "overhead_pct": None if engine == "bare" else round(100 * (best - base) / base, 1),
                    "paired_overhead_pct": None if ref is None else round(100 * statistics.median(
                        (w - b) / b for (w, _), (b, _) in zip(ts, ref, strict=True)), 1),
                    "cpu_seconds": None if cpu is None else round(cpu, 3),
                    "cpu_overhead_pct": None if cpu is None or engine == "bare" else round(
                        100 * (cpu - bare_cpu) / bare_cpu, 1),
                    "ms_per_batch_per_teacher": round(1000 * bare / batches / k, 2) if engine == "bare" else None,
                    "fixed_ms": round(1000 * (min(small["local"]) - min(small["bare"])), 1)
                    if engine == "local" else None,
                    "beyond_forward_pct": round(100 * statistics.median(beyond), 1) if engine == "local" else None,
                    "forward_slowdown_pct": round(100 * statistics.median(slower), 1) if engine == "local" else None,
                })
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"{args.samples} samples, batch {args.batch_size}, shards of {args.shard_rows}, "
          f"teachers {IN}-{args.hidden}-{args.hidden}-{CLASSES}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'K':>2} {'engine':<10} {'wall s':>7} {'samples/s':>10} {'overhead':>9} {'paired':>8} {'in-run':>7} "
          f"{'fwd slow':>8} {'CPU s':>7} {'CPU over':>9} {'fixed ms':>9}   wall s of each run")
    for r in rows:
        over = "" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f} %"
        cpu = "" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.2f}"
        cpu_over = "" if r["cpu_overhead_pct"] is None else f"{r['cpu_overhead_pct']:+.1f} %"
        fixed = "" if r["fixed_ms"] is None else f"{r['fixed_ms']:.1f}"
        paired = "" if r["paired_overhead_pct"] is None else f"{r['paired_overhead_pct']:+.1f} %"
        in_run = "" if r.get("beyond_forward_pct") is None else f"{r['beyond_forward_pct']:+.1f} %"
        slow = "" if r.get("forward_slowdown_pct") is None else f"{r['forward_slowdown_pct']:+.1f} %"
        print(f"{r['teachers']:>2} {r['engine']:<10} {r['seconds']:>7.2f} {r['samples_per_s']:>10.0f} {over:>9} "
              f"{paired:>8} {in_run:>7} {slow:>8} {cpu:>7} {cpu_over:>9} {fixed:>9}   {r['all_seconds']}")
    for k in args.teachers:
        ms = next(r["ms_per_batch_per_teacher"] for r in rows if r["teachers"] == k and r["engine"] == "bare")
        print(f"K={k}: bare forward {ms} ms per batch per teacher")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_report(args.out, {
        "benchmark": "precompute", "samples": args.samples, "batch_size": args.batch_size, "hidden": args.hidden,
        "shard_rows": args.shard_rows, "repeats": args.repeats, "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "load_average": load,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
