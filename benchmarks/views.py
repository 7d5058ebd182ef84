"""Reading views: the layout a views store uses (one row per view, view-major) against the alternatives.

One epoch of a views store hands the student one view of each of N samples. Three ways to store and read it,
float16 logits of C classes, V views, the stream's defaults (shuffled, batch 256, no workers, ``verify="lazy"``):

* **rows, view-major, one view per epoch** (what softtargets writes and :class:`softtargets.ViewStream` reads):
  an epoch is one contiguous run of N rows;
* **axis** ``[N, V, C]`` (emulated by a ``per_teacher`` store with K = V): an epoch reads every row whole,
  V views, and keeps one per sample;
* **rows, a random view per sample**: an epoch gathers N scattered rows (``store.take`` in shuffled batches).

Useful rows/s (one view per sample) of each, best of ``--repeats`` epochs after a first one (one stream per
layout, held across epochs as a training job holds it), measured interleaved in one run; the files are in the
page cache (just written): the software path, not the disk.

    python benchmarks/views.py            # ~1 min on 2 cores
    python benchmarks/views.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from timing import best_of, write_report

import softtargets as st
from softtargets.store.files import sha256_hex
from softtargets.store.views import ORDER, npy_file, params_file


def write_rows_store(url: Path, n: int, v: int, c: int) -> None:
    """A views store of ``n`` samples x ``v`` views (random logits; one float16 parameter per view)."""
    decl = {"count": v, "samples": n, "seed": 0, "order": ORDER, "params": [{"name": "angle", "dtype": "float16"}]}
    w = st.create_targets(url, num_classes=c, content="geometric", num_samples=n * v, views=decl)
    rng = np.random.default_rng(0)
    for lo in range(0, n * v, 8192):
        hi = min(lo + 8192, n * v)
        w.write([str(i) for i in range(lo, hi)], rng.normal(0, 3, (hi - lo, c)).astype(np.float32))
    files = []
    for sid in range(w.spec.num_shards):
        a, b = w.spec.shard_range(sid)
        blob = npy_file(np.zeros(b - a, [("angle", "<f2")]))
        (url / "views").mkdir(exist_ok=True)
        (url / params_file(sid)).write_bytes(blob)
        files.append({"path": params_file(sid), "bytes": len(blob), "sha256": sha256_hex(blob)})
    assert w.spec.views is not None
    w.spec.views["files"] = files
    w.close()


def write_axis_store(url: Path, n: int, v: int, c: int) -> None:
    """``[n, v, c]`` float16: the views as an axis of the row (a per_teacher store with K = v)."""
    w = st.create_targets(url, num_classes=c, content="per_teacher", num_teachers=v, num_samples=n)
    rng = np.random.default_rng(0)
    step = max(1, 8192 // v)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        w.write([str(i) for i in range(lo, hi)], rng.normal(0, 3, (hi - lo, v, c)).astype(np.float32))
    w.close()


def epoch_rows(s: st.TargetStream, epoch: int) -> int:
    s.set_epoch(epoch)
    return sum(len(b["index"]) for b in s)


def epoch_axis(s: st.TargetStream, epoch: int, v: int) -> int:
    s.set_epoch(epoch)
    rng = np.random.default_rng(epoch)
    rows = 0
    for b in s:
        logits = b["teacher_logits"]
        pick = logits[np.arange(len(logits)), rng.integers(0, v, len(logits))]  # one view per sample
        rows += len(pick)
    return rows


def epoch_scattered(store: st.TargetStore, epoch: int, n: int, v: int) -> int:
    rng = np.random.default_rng(epoch)
    order, views = rng.permutation(n), rng.integers(0, v, n)
    rows = 0
    for lo in range(0, n, 256):
        i = order[lo:lo + 256]
        rows += len(store.take(views[i] * n + i)["logits"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "views.json")
    args = p.parse_args()
    cases = [(2048, 8, 10), (256, 4, 1000)] if args.quick else [(50_000, 16, 10), (4096, 16, 1000)]
    tmp = Path(tempfile.mkdtemp(prefix="views-bench-"))
    results: list[dict[str, Any]] = []
    try:
        for n, v, c in cases:
            rows_url, axis_url = tmp / f"rows-{n}-{v}-{c}.zarr", tmp / f"axis-{n}-{v}-{c}.zarr"
            write_rows_store(rows_url, n, v, c)
            write_axis_store(axis_url, n, v, c)
            timings: dict[str, list[float]] = {"rows_view_major": [], "axis": [], "rows_scattered": []}
            # One stream (one store) per layout for every epoch, as a training job holds it; epoch 0 warms the
            # caches up (a shard's keys are decoded once) and is not counted.
            rows_stream, axis_stream = st.stream(rows_url, batch_size=256, seed=0), st.stream(axis_url, batch_size=256,
                                                                                              seed=0)
            rows_store = st.open_targets(rows_url)
            for r in range(args.repeats + 1):  # interleaved
                runs = {"rows_view_major": functools.partial(epoch_rows, rows_stream, r),
                        "axis": functools.partial(epoch_axis, axis_stream, r, v),
                        "rows_scattered": functools.partial(epoch_scattered, rows_store, r, n, v)}
                for name, fn in runs.items():
                    seconds = best_of(fn, 1)
                    if r:
                        timings[name].append(seconds)
            rate = {k: n / min(t) for k, t in timings.items()}
            results.append({"samples": n, "views": v, "classes": c, "rows_per_s": rate,
                            "bytes_per_epoch": {"rows_view_major": n * c * 2, "axis": n * v * c * 2,
                                                "rows_scattered": n * c * 2}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| N | V | C | rows, view-major (one view per epoch) | axis [N, V, C] | rows, random view per sample |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        x = r["rows_per_s"]
        print(f"| {r['samples']} | {r['views']} | {r['classes']} | {x['rows_view_major']:,.0f} | {x['axis']:,.0f} "
              f"({x['axis'] / x['rows_view_major']:.2f}x) | {x['rows_scattered']:,.0f} "
              f"({x['rows_scattered'] / x['rows_view_major']:.2f}x) |")
    write_report(args.out, {"benchmark": "views", "quick": args.quick, "repeats": args.repeats, "results": results})


if __name__ == "__main__":
    main()
