"""What checking a store's bytes costs, per checksum, beside copying them: GB/s on one core.

The options for lazy verification (issue #20): sha256 (the manifest's per-file digest, what a wds shard
and a format-1 zarr file are checked with), crc32c (zarr format 2's per-inner-chunk trailer, through
``google_crc32c``), xxh3-64 (a faster non-cryptographic hash; ``xxhash``, when installed) and blake2b,
against ``np.copyto`` of the same bytes (what reading them into a batch costs at best). 128 MiB of
random bytes, in memory; best of ``--repeats``, the cases interleaved.

    python benchmarks/checksums.py
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
from timing import write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "checksums.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    data = np.random.default_rng(0).integers(0, 256, args.mib << 20, dtype=np.uint8)
    dst = np.empty_like(data)
    cases: dict[str, Callable[[], object]] = {
        "memcpy": lambda: np.copyto(dst, data),
        "sha256": lambda: hashlib.sha256(data).digest(),
        "crc32c": lambda: google_crc32c.value(data),
        "blake2b": lambda: hashlib.blake2b(data).digest(),
    }
    try:
        import xxhash

        cases["xxh3-64"] = lambda: xxhash.xxh3_64(data).digest()
    except ImportError:
        print("xxh3-64: not measured (xxhash is not installed)")
    best = {name: float("inf") for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    rows = [{"case": name, "gb_per_s": args.mib / 1024 / s, "vs_memcpy": best["memcpy"] / s}
            for name, s in best.items()]
    print(f"{'case':10s} {'GB/s':>6s} {'time vs memcpy':>15s}")
    for r in rows:
        print(f"{r['case']:10s} {r['gb_per_s']:6.2f} {1 / r['vs_memcpy']:15.2f}")
    write_report(args.out, {"mib": args.mib, "repeats": args.repeats, "results": rows})


if __name__ == "__main__":
    main()
