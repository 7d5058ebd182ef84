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
  shard's sha256 checked on first read in each worker process); ``read_ahead=False`` (every
  process on one core) unless the row says ``read-ahead`` (the next window arranged on a
  second thread: what training wants, nothing to gain when nothing runs between batches);
* ``wds per-sample``: the baseline the issue names — plain ``webdataset.WebDataset(urls).decode()``
  over a one-row-per-tar-sample copy of the store's first rows (``logits.npy`` + ``cls`` per
  sample, written with ``webdataset.TarWriter``, 8 tars, ``mtime=0``), through
  ``DataLoader(batch_size=None)`` with ``num_workers`` 0 and 2 (webdataset splits the tars over
  workers), counting rows. No shuffling (that would only slow it down).

Best of ``--repeats`` runs. "vs memcpy" = rows/s / memcpy rows/s of the same store; "vs wds/sample"
= rows/s / per-sample webdataset rows/s of the same K with the same number of workers.
Goals stated by the issue: >= 1 M rows/s on one core for K=1, and >= 10x per-sample webdataset.

    python benchmarks/stream.py            # ~1-3 min on 2 cores
    python benchmarks/stream.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from timing import best_of, write_report
from torch.utils.data import DataLoader

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

    for workers, verify, read_ahead in ((0, "none", False), (0, "none", True), (2, "none", False), (2, "lazy", False)):
        batches = 0

        def epoch(workers: int = workers, verify: str = verify, read_ahead: bool = read_ahead) -> None:
            nonlocal batches
            ds = stream(st.open_targets(path, verify=verify), batch_size=BATCH, seed=0, read_ahead=read_ahead)
            batches = 0
            for b in ds.loader(num_workers=workers):
                float(b["teacher_logits"].reshape(-1)[-1])  # the batch's tensor is real, not a lazy view
                batches += 1

        label = f"stream nw={workers}" + (" lazy" if verify == "lazy" else "") + (" read-ahead" if read_ahead else "")
        row(label, best_of(epoch, repeats if verify == "none" else 1), batches)
    return rows_out


def bench_wds_samples(store_path: Path, out_dir: Path, k: int, n: int, repeats: int) -> list[dict[str, Any]]:
    """Per-sample webdataset baseline: the store's first ``n`` rows, one tar sample per row."""
    src = st.open_targets(store_path, verify="none")
    rows = src[:n]
    logits, labels, keys = rows["logits"].numpy(), rows["label"].numpy(), rows["key"]
    out_dir.mkdir(parents=True, exist_ok=True)
    per_tar = -(-n // SHARDS)
    urls = []
    for t in range(SHARDS):
        url = str(out_dir / f"samples-{t:06d}.tar")
        with wds.TarWriter(url, mtime=0) as sink:
            for i in range(t * per_tar, min(n, (t + 1) * per_tar)):
                sink.write({"__key__": keys[i], "logits.npy": logits[i], "cls": int(labels[i])})
        urls.append(url)
    out = []
    for workers in (0, 2):
        count = 0

        def epoch(workers: int = workers) -> None:
            nonlocal count
            ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
            count = 0
            for sample in DataLoader(ds, batch_size=None, num_workers=workers):
                float(sample["logits.npy"].reshape(-1)[-1])
                count += 1

        seconds = best_of(epoch, repeats)
        if count != n:
            raise RuntimeError(f"per-sample webdataset read {count} rows, expected {n}")
        out.append({
            "layout": "wds-sample", "K": k, "rows": n, "bytes_per_row": logits[0].nbytes, "block_rows": 1,
            "shard_rows": per_tar, "case": f"wds per-sample nw={workers}", "seconds": seconds,
            "rows_per_s": n / seconds, "batches_per_s": None, "GB_per_s": logits[:n].nbytes / seconds / 1e9,
        })
    return out


def goal_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals against the best single-process stream rate of each K (met or not, as measured)."""
    out: dict[str, Any] = {"lines": []}
    for k in sorted({r["K"] for r in results}):
        one_core = [r for r in results if r["K"] == k and r["case"] == "stream nw=0"]
        best = max(one_core, key=lambda r: r["rows_per_s"])
        ratio = best["ratio_to_wds_per_sample"]
        out[f"K={k}"] = {"best_stream_nw0_rows_per_s": best["rows_per_s"], "layout": best["layout"],
                         "vs_wds_per_sample_nw0": ratio, "ge_10x_wds_per_sample": ratio >= 10}
        line = f"goal K={k}: best one-core stream {best['rows_per_s']:,.0f} rows/s ({best['layout']}), " \
               f"{ratio:.1f}x per-sample webdataset (goal >= 10x: {'met' if ratio >= 10 else 'NOT met'})"
        if k == 1:
            out[f"K={k}"]["ge_1M_rows_per_s"] = best["rows_per_s"] >= 1e6
            line += f"; >= 1 M rows/s: {'met' if best['rows_per_s'] >= 1e6 else 'NOT met'}"
        out["lines"].append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small stores, one repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sizes = {1: 16384, 5: 2048} if args.quick else {1: 262144, 5: 65536}
    sample_rows = {1: 2048, 5: 1024} if args.quick else {1: 32768, 5: 16384}
    repeats = 1 if args.quick else args.repeats
    tmp = Path(tempfile.mkdtemp(prefix="softtargets-bench-stream-"))
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for k, n in sizes.items():
            for layout in ("zarr", "wds"):
                results += bench_store(tmp / f"k{k}.{layout}", layout, k, n, repeats)
            results += bench_wds_samples(tmp / f"k{k}.zarr", tmp / f"k{k}.samples", k, sample_rows[k], repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    memcpy = {(r["layout"], r["K"]): r["rows_per_s"] for r in results if r["case"] == "memcpy"}
    per_sample = {(r["K"], r["case"][-4:]): r["rows_per_s"] for r in results if r["layout"] == "wds-sample"}
    print(f"{'store':<13} {'case':<20} {'rows/s':>12} {'batches/s':>10} {'GB/s':>7} {'vs memcpy':>10} "
          f"{'vs wds/sample':>14}")
    for r in results:
        # Per-sample rows are compared with the zarr store's memcpy (the same bytes).
        mem = memcpy[("zarr" if r["layout"] == "wds-sample" else r["layout"], r["K"])]
        r["ratio_to_memcpy"] = r["rows_per_s"] / mem
        workers = re.search(r"nw=\d", r["case"])
        base = per_sample.get((r["K"], workers.group())) if workers else None
        r["ratio_to_wds_per_sample"] = None if base is None else r["rows_per_s"] / base
        bps = "" if r["batches_per_s"] is None else f"{r['batches_per_s']:.1f}"
        vs = "" if base is None else f"{r['ratio_to_wds_per_sample']:.1f}x"
        print(f"{r['layout'] + ' K=' + str(r['K']):<13} {r['case']:<20} {r['rows_per_s']:>12,.0f} {bps:>10} "
              f"{r['GB_per_s']:>7.2f} {r['ratio_to_memcpy']:>10.3f} {vs:>14}")
    goals = goal_summary(results)
    for line in goals["lines"]:
        print(line)
    report = {
        "benchmark": "stream", "batch_size": BATCH, "classes": C, "dtype": "float16",
        "seconds_total": time.perf_counter() - started, "cpus": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "webdataset": wds.__version__ if hasattr(wds, "__version__") else None,
        "goals": {k: v for k, v in goals.items() if k != "lines"}, "results": results,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
