"""Stage two from a remote store: an epoch of ``softtargets.stream`` over HTTP with 20 ms per request, against
the same store on local disk.

The server: ``tests/http_server.py``, Python's threaded ``http.server`` with Range support, on
127.0.0.1 in a process of its own, sleeping ``--delay`` (default 20 ms, object storage's latency)
before answering each request and counting them by method. The client: fsspec's ``HTTPFileSystem`` (aiohttp).

Stores: float16 logits of 1000 classes, K=1 (``[N, C]``, 2 000 B/row) and K=5 (``[N, 5, C]``,
10 000 B/row), zarr and wds (``block`` layout), the writer's default block size, 8 shards,
written to a temporary folder and served from it (so both sides read the page cache: the
comparison is of the software path and the latency, not of a disk or a network's bandwidth).

Each case: open the store afresh with the default checks (``verify="lazy"``; the per-machine record
of checked files is turned off, so the local reader hashes too), and stream one whole epoch
(``batch_size=256``, shuffled, ``num_workers=0``, read-ahead on: the defaults), reading each
batch's last logit. Local and remote runs alternate; best of ``--repeats``. "GETs/epoch" counts
the server's GET requests during the epoch (opening the store is counted apart), "objects" the
store's shard files; a second epoch of the same stream is counted too (what it holds it does not
fetch again). "fetch-only": the rows/s of downloading every shard file once with one ``cat_ranges``
call and nothing else (what this machine's HTTP client and server can move; no check, no stream).
Goal stated by the issue: remote >= 50 % of local rows/s, and one GET per object or range group,
never two.

    python benchmarks/remote.py                                  # ~30 s on 2 cores
    python benchmarks/remote.py --quick                          # seconds
    python benchmarks/remote.py --layouts zarr --hold-mb 100     # stores bigger than a reader holds
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
from stream import BATCH, C, write_store
from timing import write_report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/http_server.py: the server

import softtargets as st  # noqa: E402
from softtargets.store.verified import ENV as VERIFY_CACHE_ENV  # noqa: E402
from tests.http_server import Requests, serve_directory  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "remote.json"


class Server:
    """:func:`serve_directory` in a process of its own (as object storage is: its work does not take the
    reader's CPU time or GIL), with ``delay`` seconds per request; :meth:`count` and :meth:`clear` its
    request counts by method."""

    def __init__(self, directory: Path, delay: float) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(str(directory), delay, child), daemon=True)
        self._process.start()
        self.base = self._conn.recv()

    def count(self, method: str = "GET") -> int:
        self._conn.send(("count", method))
        return self._conn.recv()

    def clear(self) -> None:
        self._conn.send(("clear", ""))
        self._conn.recv()

    def close(self) -> None:
        self._conn.send(("stop", ""))
        self._process.join(timeout=10)


def _serve(directory: str, delay: float, conn: Any) -> None:
    requests = Requests()
    with serve_directory(directory, delay=delay, requests=requests) as base:
        conn.send(base)
        while True:
            command, method = conn.recv()
            if command == "stop":
                return
            if command == "clear":
                requests.clear()
            conn.send(requests.count(method))


def bench_store(root: Path, server: Server, layout: str, k: int, n: int, repeats: int) -> dict[str, Any]:
    name = f"k{k}.{layout}"
    m = write_store(root / name, layout, k, n).manifest
    url = f"{server.base}/{name}"
    local, remote, fetch = float("inf"), float("inf"), float("inf")
    gets: list[int] = []
    files = [f for s in m.shards for f in s.files]
    for _ in range(repeats):  # alternating, best of each
        local = min(local, timed_epoch(str(root / name))[0])
        fs, path = fsspec.core.url_to_fs(url)
        t0 = time.perf_counter()
        fs.cat_ranges([f"{path}/{f.path}" for f in files], 0, [f.bytes for f in files], on_error="raise")
        fetch = min(fetch, time.perf_counter() - t0)
        server.clear()
        t0 = time.perf_counter()
        ds = st.stream(st.open_targets(url), batch_size=BATCH, seed=0)
        opening = time.perf_counter() - t0
        opened = server.count("GET")
        seconds, rows = run_epoch(ds)
        first = server.count("GET") - opened
        run_epoch(ds)
        second = server.count("GET") - opened - first
        remote = min(remote, opening + seconds)
        gets = [opened, first, second]
        if rows != n:
            raise RuntimeError(f"an epoch of {url} gave {rows} rows, expected {n}")
    objects = sum(len(s.files) for s in m.shards)
    return {
        "layout": layout, "K": k, "rows": n, "bytes_per_row": m.storage_dtype.itemsize * k * C,
        "shard_rows": m.shard_rows, "block_rows": m.block_rows, "objects": objects,
        "store_MB": sum(f.bytes for s in m.shards for f in s.files) / 1e6,
        "local_rows_per_s": n / local, "remote_rows_per_s": n / remote, "ratio": local / remote,
        "fetch_only_rows_per_s": n / fetch, "remote_vs_fetch_only": fetch / remote,
        "GETs_open": gets[0], "GETs_epoch": gets[1], "GETs_second_epoch": gets[2],
        "HEADs": server.count("HEAD"),
    }


def timed_epoch(url: str) -> tuple[float, int]:
    """Seconds to open ``url`` (lazy checks) and stream one epoch, and its rows."""
    t0 = time.perf_counter()
    ds = st.stream(st.open_targets(url), batch_size=BATCH, seed=0)
    opened = time.perf_counter() - t0
    seconds, rows = run_epoch(ds)
    return opened + seconds, rows


def run_epoch(ds: Any) -> tuple[float, int]:
    """Seconds and rows of one epoch of ``ds`` (each batch's last logit read)."""
    t0 = time.perf_counter()
    rows = 0
    for b in ds:
        float(b["teacher_logits"].reshape(-1)[-1])
        rows += len(b["key"])
    return time.perf_counter() - t0, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small stores, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds the server waits before each answer")
    parser.add_argument("--layouts", default="zarr,wds")
    parser.add_argument("--teachers", default="1,5", help="K values to run")
    parser.add_argument("--hold-mb", type=float, help="bytes a reader holds (TargetStore.remote_cache_bytes), in "
                                                       "MB; below twice a store's size, zarr files are checked by "
                                                       "their chunk index and trailers and read by chunk")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.hold_mb is not None:
        st.TargetStore.remote_cache_bytes = int(args.hold_mb * 1e6)
    os.environ[VERIFY_CACHE_ENV] = "off"  # the local reader hashes what it reads, as the remote one does
    sizes = {1: 8192, 5: 2048} if args.quick else {1: 65536, 5: 16384}
    sizes = {k: n for k, n in sizes.items() if str(k) in args.teachers.split(",")}
    repeats = 1 if args.quick else args.repeats
    tmp = Path(tempfile.mkdtemp(prefix="softtargets-bench-remote-"))
    server = Server(tmp, args.delay)
    results = []
    started = time.perf_counter()
    try:
        for k, n in sizes.items():
            for layout in args.layouts.split(","):
                results.append(bench_store(tmp, server, layout, k, n, repeats))
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'store':<10} {'MB':>6} {'objects':>7} {'local rows/s':>13} {'remote rows/s':>14} {'ratio':>6} "
          f"{'fetch-only rows/s':>17} {'GETs open':>9} {'GETs/epoch':>10} {'2nd epoch':>9} {'HEADs':>5}")
    for r in results:
        print(f"{r['layout'] + ' K=' + str(r['K']):<10} {r['store_MB']:>6.0f} {r['objects']:>7} "
              f"{r['local_rows_per_s']:>13,.0f} {r['remote_rows_per_s']:>14,.0f} {r['ratio']:>6.2f} "
              f"{r['fetch_only_rows_per_s']:>17,.0f} "
              f"{r['GETs_open']:>9} {r['GETs_epoch']:>10} {r['GETs_second_epoch']:>9} {r['HEADs']:>5}")
    met = all(r["ratio"] >= 0.5 for r in results)
    once = all(r["GETs_epoch"] <= r["objects"] for r in results)
    print(f"goal remote >= 0.5 x local rows/s: {'met' if met else 'NOT met'}; "
          f"GETs per epoch <= objects: {'met' if once else 'NOT met'}")
    report = {
        "benchmark": "remote", "batch_size": BATCH, "classes": C, "dtype": "float16", "delay_s": args.delay,
        "remote_cache_bytes": st.TargetStore.remote_cache_bytes,
        "seconds_total": time.perf_counter() - started, "goals": {"ratio_ge_0.5": met, "gets_le_objects": once},
        "results": results,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
