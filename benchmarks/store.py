"""Target-store throughput and size: write and read rows/s, bytes/row, per layout and compressor.

Float16 logits of 1000 classes, K=1 ([N, C]) and K=5 ([N, K, C]), zero-meaned random
normal rows (spread 3, like trained classifiers' logits). Cases:

* zarr with compressor none / zstd / blosc (the store's default block and shard sizes);
* wds ``block`` layout (block_rows rows per tar sample) and, at a smaller N, the wds
  ``sample`` layout (one tar sample per row) for comparison;
* a numpy memcpy of the same stored array, in the same run: the ceiling for a reader.

Write = ``create_targets`` .. ``close()`` from float32 batches of 1024 rows (zero-meaning,
float16 cast, files, sha256, manifest). Read = a fresh ``open_targets`` and one pass over
all rows shard by shard, with ``verify="none"`` (bits only) and ``verify="lazy"`` (the default:
zarr inner chunks checked against their crc32c, wds shards against their sha256, on first read).
Reads come from the page cache (files just written):
this measures the software path, not the disk. Best of ``--repeats`` for reads; writes once.

    python benchmarks/store.py            # full run, ~1-2 min on 2 cores
    python benchmarks/store.py --quick    # tiny run, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
from timing import best_of, write_report

import softtargets as st
from softtargets.math.temperature import zero_mean

C = 1000
BATCH = 1024
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "store.json"


def make_logits(n: int, k: int, seed: int = 0) -> np.ndarray:
    """float32 ``[n, c]`` (k=1) or ``[n, k, c]``: random normal logits, spread 3, offset per row."""
    rng = np.random.default_rng(seed)
    shape = (n, C) if k == 1 else (n, k, C)
    x = rng.standard_normal(shape, dtype=np.float32) * 3.0
    return x + rng.standard_normal((n,) + (1,) * (len(shape) - 1), dtype=np.float32) * 2.0


def memcpy_rows_per_s(stored: np.ndarray, repeats: int) -> float:
    dst = np.empty_like(stored)
    np.copyto(dst, stored)  # fault the pages in first
    return len(stored) / best_of(lambda: np.copyto(dst, stored), repeats)


def write(path: Path, x: np.ndarray, k: int, layout: str, **kw: Any) -> tuple[float, st.Manifest]:
    """Seconds to write ``x`` as a float16 store; and its manifest."""
    keys = [f"{i:09d}" for i in range(len(x))]
    t0 = time.perf_counter()
    w = st.create_targets(path, num_classes=C, num_teachers=k, layout=layout, dtype="float16",
                          content="per_teacher" if k > 1 else "geometric", **kw)
    for lo in range(0, len(x), BATCH):
        w.write(keys[lo:lo + BATCH], torch.from_numpy(x[lo:lo + BATCH]))
    m = w.close()
    return time.perf_counter() - t0, m


def read_all(path: Path, verify: str) -> int:
    """One pass over every row of a freshly opened store; returns the rows seen (checked)."""
    store = st.open_targets(path, verify=verify)
    rows = 0
    for part in store:
        rows += part["logits"].shape[0]
    if rows != len(store):
        raise RuntimeError(f"{path}: read {rows} rows of {len(store)}")
    return rows


def check_equal(path: Path, stored: np.ndarray) -> None:
    """The store holds exactly ``stored`` (so the timings are of correct reads)."""
    got = st.open_targets(path, verify="none")[:]["logits"].numpy()
    if not np.array_equal(got.view(np.uint16), stored.view(np.uint16)):
        raise RuntimeError(f"{path}: read-back differs from what was written")


def run_case(
    workdir: Path, x: np.ndarray, stored: np.ndarray, k: int, layout: str, variant: str, repeats: int,
    memcpy: float, **kw: Any,
) -> dict[str, Any]:
    path = workdir / f"k{k}-{layout}-{variant}.{'zarr' if layout == 'zarr' else 'wds'}"
    write_s, m = write(path, x, k, layout, **kw)
    check_equal(path, stored)
    read_s = best_of(lambda: read_all(path, "none"), repeats)
    verified_s = best_of(lambda: read_all(path, "lazy"), repeats)
    n = len(x)
    raw_row = stored[0].nbytes
    stored_row = m.nbytes / n
    out = {
        "layout": layout, "variant": variant, "K": k, "C": C, "N": n, "dtype": "float16",
        "block_rows": m.block_rows, "shard_rows": m.shard_rows, "shards": len(m.shards),
        "write_s": write_s, "write_rows_per_s": n / write_s,
        "read_s": read_s, "read_rows_per_s": n / read_s, "read_MB_per_s": n * raw_row / read_s / 1e6,
        "read_verified_rows_per_s": n / verified_s,
        "bytes_per_row": stored_row, "raw_bytes_per_row": raw_row, "compression_ratio": raw_row / stored_row,
        "read_vs_memcpy": (n / read_s) / memcpy,
    }
    shutil.rmtree(path)
    return out


def codec_survey(stored: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Compression ratio and encode/decode MB/s of candidate codecs on one ~4 MiB block of ``stored``."""
    block = np.ascontiguousarray(stored[: max(1, (4 << 20) // stored[0].nbytes)])
    shuffle, bitshuffle = numcodecs.Blosc.SHUFFLE, numcodecs.Blosc.BITSHUFFLE
    candidates = {
        "zstd-1": numcodecs.Zstd(level=1), "zstd-3 (store 'zstd')": numcodecs.Zstd(level=3),
        "blosc-lz4-bitshuffle (store 'blosc')": numcodecs.Blosc("lz4", 5, bitshuffle),
        "blosc-lz4-shuffle": numcodecs.Blosc("lz4", 5, shuffle),
        "blosc-zstd-shuffle": numcodecs.Blosc("zstd", 3, shuffle),
        "blosc-zstd-bitshuffle": numcodecs.Blosc("zstd", 3, bitshuffle),
    }
    out = []
    for name, codec in candidates.items():
        encoded = codec.encode(block)
        dec = np.empty_like(block)
        enc_s = best_of(lambda c=codec: c.encode(block), repeats)
        dec_s = best_of(lambda c=codec, e=encoded, d=dec: c.decode(e, out=d), repeats)
        if not np.array_equal(dec.view(np.uint16), block.view(np.uint16)):
            raise RuntimeError(f"{name} did not round-trip")
        out.append({"codec": name, "block_bytes": block.nbytes, "ratio": block.nbytes / len(encoded),
                    "encode_MB_per_s": block.nbytes / enc_s / 1e6, "decode_MB_per_s": block.nbytes / dec_s / 1e6})
    return out


def cases(quick: bool) -> list[tuple[int, int, int]]:
    """``(K, N, N for the one-row-per-sample wds layout)``."""
    if quick:
        return [(1, 4096, 512), (5, 1024, 256)]
    return [(1, 65536, 4096), (5, 16384, 2048)]


def run(quick: bool, repeats: int, workdir: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    survey: dict[int, list[dict[str, Any]]] = {}
    load_before = os.getloadavg()
    for k, n, n_sample in cases(quick):
        x = make_logits(n, k)
        stored = zero_mean(torch.from_numpy(x)).to(torch.float16).numpy()  # what the store holds, bit for bit
        memcpy = memcpy_rows_per_s(stored, max(repeats, 3))
        baselines.append({"K": k, "N": n, "memcpy_rows_per_s": memcpy,
                          "memcpy_MB_per_s": memcpy * stored[0].nbytes / 1e6})
        print(f"K={k}: N={n}, {stored.nbytes / 1e6:.0f} MB float16; memcpy {memcpy:,.0f} rows/s", flush=True)
        survey[k] = codec_survey(stored, max(repeats, 3))
        for compressor in ("none", "zstd", "blosc"):
            rows.append(run_case(workdir, x, stored, k, "zarr", compressor, repeats, memcpy, compressor=compressor))
            print(f"  zarr {compressor} done", flush=True)
        rows.append(run_case(workdir, x, stored, k, "wds", "block", repeats, memcpy))
        print("  wds block done", flush=True)
        rows.append(run_case(workdir, x[:n_sample], stored[:n_sample], k, "wds", "sample", repeats, memcpy,
                             sample_layout="sample"))
        print("  wds sample done", flush=True)
    return {
        "benchmark": "store", "quick": quick, "repeats": repeats, "batch_rows": BATCH,
        "note": "reads from the page cache (files just written); float16, zero-meaned random normal logits",
        "environment": {
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "numpy": np.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "softtargets": st.__version__, "workdir": str(workdir),
            "torch_threads": torch.get_num_threads(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        },
        "memcpy": baselines, "results": rows, "codecs": {f"K={k}": v for k, v in survey.items()},
    }


def table(report: dict[str, Any]) -> str:
    head = (f"{'layout':<6} {'variant':<7} {'K':>2} {'N':>6} {'block/shard':>12} {'write rows/s':>13} "
            f"{'read rows/s':>12} {'lazy':>10} {'read MB/s':>10} {'bytes/row':>10} {'ratio':>6} {'vs memcpy':>9}")
    lines = [head, "-" * len(head)]
    for b in report["memcpy"]:
        lines.append(f"{'numpy':<6} {'memcpy':<7} {b['K']:>2} {b['N']:>6} {'':>12} {'':>13} "
                     f"{b['memcpy_rows_per_s']:>12,.0f} {'':>10} {b['memcpy_MB_per_s']:>10,.0f}")
    for r in report["results"]:
        lines.append(
            f"{r['layout']:<6} {r['variant']:<7} {r['K']:>2} {r['N']:>6} {r['block_rows']:>5}/{r['shard_rows']:<6} "
            f"{r['write_rows_per_s']:>13,.0f} {r['read_rows_per_s']:>12,.0f} {r['read_verified_rows_per_s']:>10,.0f} "
            f"{r['read_MB_per_s']:>10,.0f} {r['bytes_per_row']:>10,.0f} {r['compression_ratio']:>6.3f} "
            f"{r['read_vs_memcpy']:>9.3f}"
        )
    for k, survey in report["codecs"].items():
        lines += ["", f"codecs on one block of stored float16 logits ({k}): ratio, encode / decode MB/s"]
        lines += [f"  {c['codec']:<38} {c['ratio']:>6.3f} {c['encode_MB_per_s']:>8,.0f} {c['decode_MB_per_s']:>8,.0f}"
                  for c in survey]
    env = report["environment"]
    lines += ["", f"torch threads {env['torch_threads']}; load average before {env['loadavg_before'][0]:.2f}, "
              f"after {env['loadavg_after'][0]:.2f} (1 min) on {env['cpus']} CPUs"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--repeats", type=int, default=3, help="reads: best of this many passes (default 3)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    p.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp folder)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="softtargets-bench-", dir=args.dir))
    try:
        report = run(args.quick, args.repeats, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(report))
    print("\nread rows/s: verify='none'; lazy: verify='lazy' (zarr: crc32c per chunk; wds: sha256 per shard). "
          "ratio: raw float16 bytes / stored bytes. Reads from the page cache.")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
