"""Stream throughput: batches/s and rows/s of ``softtargets.stream`` against a memory copy.

Stores: float16 logits of 1000 classes, K=1 (``[N, C]``, 2 000 B/row) and K=5 (``[N, 5, C]``,
10 000 B/row), zarr and wds (``block`` layout), the writer's default block size, 8 shards
each, written to a temporary folder (reads come from the page cache: this measures the
software path, not a disk). For each store:

* ``memcpy``: ``np.copyto`` of the whole stored logits array (the same bytes) into another;
* ``store.rows``: one pass of ``store.rows(a, b)`` over the store, one read unit at a time, in
  store order (what the stream's reads cost, without shuffling, batching or workers);
* ``stream``: one whole epoch of ``stream(store, batch_size=256, shuffle=True)`` through
  ``DataLoader(batch_size=None)`` with ``num_workers`` 0 and 2 (worker start-up included),
  reading each batch's last logit; ``verify="none"`` unless the row says ``lazy`` (each
  shard's sha256 checked on first read in each worker process).

Best of ``--repeats`` runs. Ratio = rows/s / memcpy rows/s of the same store.

    python benchmarks/stream.py            # ~1-3 min on 2 cores
    python benchmarks/stream.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timing import best_of

import softtargets as st
from softtargets.streaming import stream

C = 1000
BATCH = 256
SHARDS = 8
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "stream.json"


def write_store(path: Path, layout: str, k: int, n: int) -> st.TargetStore:
    """``n`` rows of random normal logits (spread 3), float16, 8 shards."""
    g = torch.Generator().manual_seed(0)
    shard_rows = n // SHARDS
    shape = (C,) if k == 1 else (k, C)
    w = st.create_targets(path, num_classes=C, content="geometric" if k == 1 else "per_teacher", num_teachers=k,
                          layout=layout, dtype="float16", num_samples=n, shard_rows=shard_rows)
    step = shard_rows
    for a in range(0, n, step):
        w.write([f"s{i:09d}" for i in range(a, a + step)], torch.randn(step, *shape, generator=g) * 3)
    w.close()
    return st.open_targets(path, verify="none")


def bench_store(path: Path, layout: str, k: int, n: int, repeats: int) -> list[dict[str, Any]]:
    store = write_store(path, layout, k, n)
    m = store.manifest
    logits = store[:]["logits"].numpy()
    dst = np.empty_like(logits)
    rows_out = []

    def row(case: str, seconds: float, batches: int | None = None) -> None:
        rows_out.append({
            "layout": layout, "K": k, "rows": n, "bytes_per_row": logits[0].nbytes, "block_rows": m.block_rows,
            "shard_rows": m.shard_rows, "case": case, "seconds": seconds, "rows_per_s": n / seconds,
            "batches_per_s": None if batches is None else batches / seconds,
            "GB_per_s": logits.nbytes / seconds / 1e9,
        })

    row("memcpy", best_of(lambda: np.copyto(dst, logits), 3))  # first call pays dst page faults

    def read_all() -> None:
        fresh = st.open_targets(path, verify="none")
        for a in range(0, n, m.block_rows):
            fresh.rows(a, a + m.block_rows)

    row("store.rows", best_of(read_all, repeats))

    for workers, verify in ((0, "none"), (2, "none"), (2, "lazy")):
        batches = 0

        def epoch(workers: int = workers, verify: str = verify) -> None:
            nonlocal batches
            ds = stream(st.open_targets(path, verify=verify), batch_size=BATCH, seed=0)
            batches = 0
            for b in ds.loader(num_workers=workers):
                float(b["teacher_logits"].reshape(-1)[-1])  # the batch's tensor is real, not a lazy view
                batches += 1

        label = f"stream nw={workers}" + (" lazy" if verify == "lazy" else "")
        row(label, best_of(epoch, repeats if verify == "none" else 1), batches)
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small stores, one repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sizes = {1: 16384, 5: 2048} if args.quick else {1: 262144, 5: 65536}
    repeats = 1 if args.quick else args.repeats
    tmp = Path(tempfile.mkdtemp(prefix="softtargets-bench-stream-"))
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for k, n in sizes.items():
            for layout in ("zarr", "wds"):
                results += bench_store(tmp / f"k{k}.{layout}", layout, k, n, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    memcpy = {(r["layout"], r["K"]): r["rows_per_s"] for r in results if r["case"] == "memcpy"}
    print(f"{'store':<10} {'case':<16} {'rows/s':>12} {'batches/s':>10} {'GB/s':>7} {'vs memcpy':>10}")
    for r in results:
        r["ratio_to_memcpy"] = r["rows_per_s"] / memcpy[(r["layout"], r["K"])]
        bps = "" if r["batches_per_s"] is None else f"{r['batches_per_s']:.1f}"
        print(f"{r['layout'] + ' K=' + str(r['K']):<10} {r['case']:<16} {r['rows_per_s']:>12,.0f} {bps:>10} "
              f"{r['GB_per_s']:>7.2f} {r['ratio_to_memcpy']:>10.3f}")
    report = {
        "benchmark": "stream", "batch_size": BATCH, "classes": C, "dtype": "float16",
        "seconds_total": time.perf_counter() - started, "cpus": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({report['seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
