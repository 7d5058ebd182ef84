"""softtargets at its defaults beside the loaders users would pick instead, in one run.

One data set per configuration -- float16 logits of K=1 x 1000 classes, K=5 x 1000 classes and
K=1 x 32 768 classes, random normal (spread 3), with an int64 row number and a label -- written
once into every system's own format in a temporary folder (reads come from the page cache: this
measures the software path, not a disk). Each measurement runs in a fresh Python process, and the
repeats are interleaved (system A, B, C, ..., A, B, C, ...) so a busy machine slows all alike.
One epoch, batch 256, shuffled, reading each batch's last logit:

* ``softtargets``: ``stream(store, batch_size=256)`` over a zarr and a wds (block) store, at its
  defaults (``verify="lazy"``, ``read_ahead``, the default ``buffer_size``) and with
  ``verify="none"``, in the main process (``num_workers=0``) and through ``stream.loader(num_workers=2)``.
  ``lazy`` runs twice: ``cold`` with the per-machine record of checked files removed first (every
  check happens in the run) and ``warm`` (files checked by an earlier process and unchanged since
  are not hashed again; see ``docs/stage-two.md``);
* ``litdata``: ``StreamingDataset(dir, shuffle=True)`` + ``StreamingDataLoader(batch_size=256)``
  over a litdata-optimized copy (``BinaryWriter``, 64 MB chunks);
* ``mosaic``: MosaicML ``StreamingDataset(local=dir, shuffle=True, batch_size=256)`` +
  ``DataLoader(batch_size=256)`` over an MDS copy (imported with its torchvision datasets stubbed
  out where torchvision is absent: the vision datasets are not used);
* ``wds/sample``: ``webdataset.WebDataset(tars).shuffle(1000).decode()`` + ``DataLoader(batch_size=256)``
  over one tar member set per row (``logits.npy``, ``cls``), 8 tars, ``mtime=0``;
* ``TensorDataset``: the whole logits array in RAM, ``DataLoader(TensorDataset(...), batch_size=256,
  shuffle=True)`` (its memory includes the data set itself);
* ``page-cache``: ``readinto`` of every file of the zarr store into one reused buffer (the floor a
  reader of those files cannot beat);
* ``memcpy``: ``np.copyto`` of the whole logits array into another (the limit);
* ``workers``: ``DataLoader(num_workers=2)`` over an ``IterableDataset`` that yields the batches'
  row numbers and no logits: the memory two forked workers hold of their own (their copies of the
  parent's pages), beside which the ``w=2`` rows' memory reads.

The slow per-sample systems (``mosaic``, ``wds/sample``) read the first ``--slow-rows`` rows
only (rows/s stays comparable; the table says how many rows each read). Memory: peak RSS and peak
anonymous memory (``RssAnon`` of ``/proc/<pid>/status``, the process and its DataLoader workers
summed, sampled every 5 ms) above the process's figures after its imports. Mixing: for each
batch, the spread of its rows' source positions, ``(max - min) / N``, and their standard deviation
over that of a uniform draw from ``[0, N)`` (1.0 = as mixed as a full shuffle), medians over
batches.

    python benchmarks/peers.py              # ~5-10 min on 2 busy cores
    python benchmarks/peers.py --quick      # small data, one repeat, seconds per system
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "peers.json"
BATCH = 256
CONFIGS = {  # name: (K, classes, rows, rows with --quick)
    "K=1": (1, 1000, 65536, 4096),
    "K=5": (5, 1000, 16384, 1024),
    "C=32768": (1, 32768, 2048, 512),
}
SLOW = ("mosaic", "wds/sample")


# -- memory ------------------------------------------------------------------------------------


def _status(pid: int | str) -> dict[str, int]:
    """``VmRSS`` and ``RssAnon`` of a process, in bytes (absent: 0)."""
    out = {"VmRSS": 0, "RssAnon": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids + [g for k in kids for g in _children(k)]


def memory_now() -> dict[str, int]:
    """RSS and anonymous memory of this process and its descendants (DataLoader workers), summed."""
    total = {"VmRSS": 0, "RssAnon": 0}
    for pid in [os.getpid(), *_children(os.getpid())]:
        for k, v in _status(pid).items():
            total[k] += v
    return total


class PeakMemory:
    """Samples :func:`memory_now` every ``interval`` seconds on a thread; ``peak`` holds the largest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, memory_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = memory_now()
            self.peak = {k: max(self.peak[k], now[k]) for k in now}

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        now = memory_now()
        self.peak = {k: max(self.peak[k], now[k]) for k in now}


# -- data sets ---------------------------------------------------------------------------------


def make_logits(k: int, c: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (n, c) if k == 1 else (n, k, c)
    return (rng.standard_normal(shape, dtype=np.float32) * 3).astype(np.float16)


def write_all(root: Path, k: int, c: int, n: int, slow_rows: int) -> dict[str, Any]:
    """Every system's copy of the same rows under ``root``; returns what the children need and what could not be
    written (system -> why)."""
    import softtargets as st

    logits = make_logits(k, c, n)
    np.save(root / "logits.npy", logits)
    labels = np.arange(n, dtype=np.int64) % 10
    skipped: dict[str, str] = {}
    for layout in ("zarr", "wds"):
        w = st.create_targets(root / f"store.{layout}", num_classes=c, num_teachers=k, layout=layout,
                              content="geometric" if k == 1 else "per_teacher", dtype="float16", num_samples=n)
        step = 4096
        for a in range(0, n, step):
            b = min(n, a + step)
            w.write([f"s{i:09d}" for i in range(a, b)], torch.from_numpy(logits[a:b]).float(),
                    torch.from_numpy(labels[a:b]))
        w.close()
    try:
        from litdata.streaming.writer import BinaryWriter

        out = root / "litdata"
        bw = BinaryWriter(str(out), chunk_bytes="64MB")
        for i in range(n):
            bw.add_item(i, {"index": i, "label": int(labels[i]), "logits": logits[i]})
        bw.done()
        bw.merge(num_workers=1)
    except Exception as e:  # noqa: BLE001 - any failure of a peer is reported, not fatal
        skipped["litdata"] = f"{type(e).__name__}: {e}"
    try:
        _stub_torchvision()
        from streaming import MDSWriter

        with MDSWriter(out=str(root / "mosaic"), columns={"index": "int64", "label": "int64",
                                                           "logits": "ndarray:float16"}, size_limit=1 << 26) as mw:
            for i in range(min(n, slow_rows)):
                mw.write({"index": i, "label": int(labels[i]), "logits": logits[i]})
    except Exception as e:  # noqa: BLE001
        skipped["mosaic"] = f"{type(e).__name__}: {e}"
    try:
        import webdataset as wds

        (root / "wds-sample").mkdir()
        m = min(n, slow_rows)
        per = -(-m // 8)
        for t in range(8):
            with wds.TarWriter(str(root / "wds-sample" / f"{t:04d}.tar"), mtime=0) as tw:
                for i in range(t * per, min(m, (t + 1) * per)):
                    tw.write({"__key__": f"{i:09d}", "logits.npy": logits[i], "cls": int(labels[i])})
    except Exception as e:  # noqa: BLE001
        skipped["wds/sample"] = f"{type(e).__name__}: {e}"
    return {"skipped": skipped}


def _stub_torchvision() -> None:
    """MosaicML streaming imports torchvision's datasets at import; where torchvision is absent (or broken
    against this torch), stand-ins let the rest of it import. Its vision datasets are not used here."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001
        pass
    for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional"):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mod.__path__ = []  # type: ignore[attr-defined]
        sys.modules[name] = mod
    sys.modules["torchvision.datasets"].VisionDataset = type("VisionDataset", (), {})  # type: ignore[attr-defined]
    sys.modules["torchvision.transforms.functional"].to_tensor = None  # type: ignore[attr-defined]


# -- one measurement (a child process) ---------------------------------------------------------


class _RowNumbers(torch.utils.data.IterableDataset):
    """Batches of row numbers only, split over DataLoader workers: what workers cost with no data."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for a in range(wid * BATCH, self.n, nw * BATCH):
            yield torch.arange(a, min(a + BATCH, self.n))


def child(case: dict[str, Any]) -> dict[str, Any]:
    """One epoch of one system; runs in its own process."""
    from torch.utils.data import DataLoader

    system, root, n = case["system"], Path(case["root"]), case["rows"]
    it: Any
    rows_expected = n
    if system == "softtargets":
        import softtargets as st

        if case.get("cold"):
            shutil.rmtree(case["verify_cache"], ignore_errors=True)
        os.environ["SOFTTARGETS_VERIFY_CACHE"] = case["verify_cache"]
    elif system == "litdata":
        from litdata import StreamingDataLoader, StreamingDataset
    elif system == "mosaic":
        _stub_torchvision()
        from streaming import StreamingDataset as MosaicDataset
        rows_expected = min(n, case["slow_rows"])
    elif system == "wds/sample":
        import webdataset as wds
        rows_expected = min(n, case["slow_rows"])
    elif system == "TensorDataset":
        from torch.utils.data import TensorDataset
    base = memory_now()
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        if system == "softtargets":
            s = st.stream(str(root / f"store.{case['layout']}"), batch_size=BATCH, verify=case["verify"],
                          seed=case["repeat"])
            it = s if not case["workers"] else s.loader(num_workers=case["workers"])
            get = lambda b: (b["teacher_logits"], b["index"])  # noqa: E731
        elif system == "litdata":
            ds = StreamingDataset(str(root / "litdata"), shuffle=True, seed=case["repeat"])
            it = StreamingDataLoader(ds, batch_size=BATCH, num_workers=case["workers"])
            get = lambda b: (b["logits"], b["index"])  # noqa: E731
        elif system == "mosaic":
            ds = MosaicDataset(local=str(root / "mosaic"), shuffle=True, batch_size=BATCH, shuffle_seed=case["repeat"])
            it = DataLoader(ds, batch_size=BATCH, num_workers=case["workers"])
            get = lambda b: (b["logits"], b["index"])  # noqa: E731
        elif system == "wds/sample":
            urls = sorted(str(p) for p in (root / "wds-sample").glob("*.tar"))
            ds = wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False, seed=case["repeat"]).shuffle(
                1000).decode().to_tuple("logits.npy", "__key__")
            it = DataLoader(ds, batch_size=BATCH, num_workers=case["workers"])
            get = lambda b: (b[0], torch.tensor([int(x) for x in b[1]]))  # noqa: E731
        elif system == "TensorDataset":
            x = torch.from_numpy(np.load(root / "logits.npy"))
            ds = TensorDataset(x, torch.arange(len(x)))
            g = torch.Generator().manual_seed(case["repeat"])
            it = DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=case["workers"], generator=g)
            get = lambda b: (b[0], b[1])  # noqa: E731
        elif system == "workers":
            it = DataLoader(_RowNumbers(n), batch_size=None, num_workers=case["workers"])
            get = lambda b: (b, b)  # noqa: E731
        elif system == "page-cache":
            files = sorted(p for p in (root / "store.zarr").rglob("*") if p.is_file())
            buf = bytearray(max(p.stat().st_size for p in files))
            view = memoryview(buf)
            t0 = time.perf_counter()
            for p in files:
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(view):
                        pass
            seconds = time.perf_counter() - t0
            return _result(case, n, seconds, seconds, base, peak, [])
        elif system == "memcpy":
            src = np.load(root / "logits.npy")
            dst = np.empty_like(src)
            t0 = time.perf_counter()
            np.copyto(dst, src)
            seconds = time.perf_counter() - t0
            return _result(case, n, seconds, seconds, base, peak, [])
        else:
            raise ValueError(system)
        first, rows, positions = None, 0, []
        for batch in it:
            logits, index = get(batch)
            float(logits[-1].reshape(-1)[-1])
            if first is None:
                first = time.perf_counter() - t0
            rows += len(index)
            positions.append(np.asarray(index))
        seconds = time.perf_counter() - t0
    if rows < rows_expected:
        raise RuntimeError(f"{system} yielded {rows} rows, expected {rows_expected}")
    return _result(case, rows, seconds, first or seconds, base, peak, positions)


def _result(case: dict[str, Any], rows: int, seconds: float, first: float, base: dict[str, int], peak: PeakMemory,
            positions: list[np.ndarray]) -> dict[str, Any]:
    k, c = case["k"], case["c"]
    n = case["rows"] if case["system"] not in SLOW else min(case["rows"], case["slow_rows"])
    spread = [float(p.max() - p.min()) / n for p in positions if len(p) > 1]
    std = [float(p.std()) / (n / 12 ** 0.5) for p in positions if len(p) > 1]
    return {
        "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
        "mb_per_s": rows * k * c * 2 / seconds / 1e6, "first_batch_s": first,
        "peak_rss_mb": (peak.peak["VmRSS"] - base["VmRSS"]) / 2**20,
        "peak_anon_mb": (peak.peak["RssAnon"] - base["RssAnon"]) / 2**20,
        "spread": float(np.median(spread)) if spread else None, "std_ratio": float(np.median(std)) if std else None,
    }


# -- the run -----------------------------------------------------------------------------------


def cases_for(config: str, skipped: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for layout in ("zarr", "wds"):
        for workers in (0, 2):
            for verify, cold in (("lazy", True), ("lazy", False), ("none", False)):
                label = f"softtargets {layout} w={workers} {'defaults' if verify == 'lazy' else 'verify=none'}" + (
                    (" cold" if cold else " warm") if verify == "lazy" else "")
                out.append({"system": "softtargets", "layout": layout, "workers": workers, "verify": verify,
                            "cold": cold, "label": label})
    for system in ("litdata", "mosaic", "wds/sample", "TensorDataset"):
        if system not in skipped:
            out.append({"system": system, "workers": 0, "label": system})
    out += [{"system": "page-cache", "workers": 0, "label": "page-cache copy (floor)"},
            {"system": "memcpy", "workers": 0, "label": "memcpy (limit)"},
            {"system": "workers", "workers": 2, "label": "empty IterableDataset w=2 (memory reference)"}]
    return [{**c, "config": config} for c in out]


def run_child(case: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1][:300]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow-rows", type=int, default=8192, help="rows the per-sample peers read")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--only", default="", help="comma-separated labels' prefixes to run (default: all)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    sys.path.insert(0, str(HERE))
    from timing import write_report

    repeats = 1 if args.quick else args.repeats
    slow_rows = 512 if args.quick else args.slow_rows
    tmp = Path(tempfile.mkdtemp(prefix="softtargets-peers-"))
    report: dict[str, Any] = {"batch": BATCH, "repeats": repeats, "slow_rows": slow_rows, "configs": {}}
    try:
        all_cases = []
        for name in args.configs.split(","):
            k, c, n, nq = CONFIGS[name]
            n = nq if args.quick else n
            root = tmp / name.replace("=", "")
            root.mkdir()
            written = write_all(root, k, c, n, slow_rows)
            report["configs"][name] = {"k": k, "classes": c, "rows": n, "could_not_run": written["skipped"]}
            for why in written["skipped"].items():
                print(f"{name}: {why[0]} could not run: {why[1]}")
            cases = cases_for(name, written["skipped"])
            if args.only:
                cases = [cc for cc in cases if any(cc["label"].startswith(p) for p in args.only.split(","))]
            all_cases += [{**cc, "k": k, "c": c, "rows": n, "root": str(root), "slow_rows": slow_rows,
                           "verify_cache": str(tmp / "verify-cache")} for cc in cases]
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(repeats):
            for case in all_cases:
                res = run_child({**case, "repeat": r})
                results.setdefault((case["config"], case["label"]), []).append(res)
                print(f"  [{r + 1}/{repeats}] {case['config']:8s} {case['label']:44s} "
                      + (f"{res['rows_per_s'] / 1e3:9.1f} k rows/s" if "error" not in res else res["error"]),
                      flush=True)
        rows_out = []
        for (config, label), runs in results.items():
            ok = [x for x in runs if "error" not in x]
            if not ok:
                rows_out.append({"config": config, "label": label, "error": runs[-1]["error"]})
                continue
            best = max(ok, key=lambda x: x["rows_per_s"])
            rows_out.append({"config": config, "label": label, **best,
                             "peak_anon_mb": float(np.median([x["peak_anon_mb"] for x in ok])),
                             "peak_rss_mb": float(np.median([x["peak_rss_mb"] for x in ok])),
                             "all_rows_per_s": [x["rows_per_s"] for x in ok]})
        report["results"] = rows_out
        print_table(rows_out)
        write_report(args.out, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(rows: list[dict[str, Any]]) -> None:
    ref = {(r["config"], r["label"]): r.get("rows_per_s") for r in rows}
    print(f"\n{'config':8s} {'system':44s} {'k rows/s':>9s} {'MB/s':>7s} {'1st batch':>9s} {'RSS MB':>7s} "
          f"{'anon MB':>7s} {'spread':>6s} {'std':>5s} {'x litdata':>9s} {'x TDS':>6s} {'x floor':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:8s} {r['label']:44s} could not run: {r['error']}")
            continue
        lit, tds = ref.get((r["config"], "litdata")), ref.get((r["config"], "TensorDataset"))
        floor = ref.get((r["config"], "page-cache copy (floor)"))

        def ratio(x: float | None, r: dict[str, Any] = r) -> str:
            return f"{r['rows_per_s'] / x:.2f}" if x else "-"

        sp = "-" if r["spread"] is None else f"{r['spread']:.2f}"
        sd = "-" if r["std_ratio"] is None else f"{r['std_ratio']:.2f}"
        print(f"{r['config']:8s} {r['label']:44s} {r['rows_per_s'] / 1e3:9.1f} {r['mb_per_s']:7.0f} "
              f"{r['first_batch_s']:9.3f} {r['peak_rss_mb']:7.0f} {r['peak_anon_mb']:7.0f} {sp:>6s} {sd:>5s} "
              f"{ratio(lit):>9s} {ratio(tds):>6s} {ratio(floor):>7s}")


if __name__ == "__main__":
    main()
