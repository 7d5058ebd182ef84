"""Peak memory of ``softtargets verify`` (and ``convert``) as the store grows: it should stay flat.

Builds stores of 1x, 4x and 10x a base size (default 32 MiB, so up to 320 MiB) with small
shards (4 MiB: 2048 rows x 1000 classes, float16), in both layouts, then runs the real
command line under ``/usr/bin/time -v`` and reads its peak resident set size. A baseline run
(``softtargets --version``: the imports alone) shows the fixed overhead; what verify adds on
top should be about two shards whatever the store's size.

    python benchmarks/verify_memory.py [--base-mib 32] [--scales 1,4,10] [--json PATH]

verify runs with ``--key-memory 1`` (MiB) so that the key-uniqueness check spills to disk on the
larger stores: its memory is bounded too, not merely small for these sizes.

Needs GNU time at /usr/bin/time (Debian: ``apt-get install time``). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from timing import write_report

import softtargets as st

GNU_TIME = "/usr/bin/time"
CLASSES, SHARD_ROWS, BLOCK_ROWS = 1000, 2048, 512
ROW_BYTES = 2 * CLASSES  # float16 geometric logits


def cli() -> list[str]:
    exe = shutil.which("softtargets", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "softtargets.cli"]


def build(path: Path, rows: int, layout: str) -> float:
    """Write ``rows`` random rows; returns seconds taken."""
    t0 = time.perf_counter()
    w = st.create_targets(path, num_classes=CLASSES, content="geometric", teachers=["bench"], layout=layout,
                          dtype="float16", shard_rows=SHARD_ROWS, block_rows=BLOCK_ROWS, num_samples=rows)
    g = torch.Generator().manual_seed(0)
    block = torch.randn(SHARD_ROWS, CLASSES, generator=g) * 3  # one random shard, shifted per shard (fast)
    for sid, lo in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - lo)
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        logits = block[:n].roll(sid, dims=1) + torch.randn(n, 1, generator=g)
        w.write_shard(sid, [f"s{lo + i:09d}" for i in range(n)], logits, labels)
    w.finalize()
    return time.perf_counter() - t0


def measure(args: list[str]) -> dict[str, float]:
    """Run ``args`` under GNU time: peak RSS (MiB), wall seconds, exit status."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([GNU_TIME, "-v", *args], capture_output=True, text=True, env=env)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    if rss is None or wall is None:
        raise RuntimeError(f"could not read GNU time's report:\n{proc.stderr[-2000:]}")
    h, m, s = wall.groups()
    return {"peak_rss_mib": int(rss.group(1)) / 1024, "wall_s": int(h or 0) * 3600 + int(m) * 60 + float(s),
            "exit": proc.returncode}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-mib", type=float, default=32.0, help="size of the 1x store (MiB of logits)")
    p.add_argument("--scales", default="1,4,10", help="store sizes as multiples of the base")
    p.add_argument("--convert-scales", default="1,10", help="scales at which convert is measured too ('' = none)")
    p.add_argument("--key-memory", type=float, default=1.0,
                   help="verify --key-memory (MiB): small, so the key check spills to disk on the bigger stores")
    p.add_argument("--layouts", default="zarr,wds")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "verify_memory.json"))
    p.add_argument("--tmp", default=None, help="where to build the stores (default: system temp)")
    a = p.parse_args()
    if not os.access(GNU_TIME, os.X_OK):
        sys.exit(f"{GNU_TIME} is missing: install GNU time (Debian: apt-get install time)")
    scales = [int(s) for s in a.scales.split(",")]
    convert_scales = {int(s) for s in a.convert_scales.split(",") if s.strip()}
    base_rows = int(a.base_mib * 2**20 / ROW_BYTES)
    baseline = measure([*cli(), "--version"])
    print(f"baseline (imports only): {baseline['peak_rss_mib']:.0f} MiB peak RSS; shard = {SHARD_ROWS} rows = "
          f"{SHARD_ROWS * ROW_BYTES / 2**20:.1f} MiB")
    results = []
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="verify-mem-") as tmp:
        for layout in a.layouts.split(","):
            for scale in scales:
                rows = base_rows * scale
                store = Path(tmp) / f"s{scale}.{layout}"
                build_s = build(store, rows, layout)
                m = st.open_targets(store, verify="none").manifest
                v = measure([*cli(), "verify", "--no-progress", "--key-memory", str(a.key_memory), str(store)])
                if v["exit"] != 0:
                    raise RuntimeError(f"verify failed on the benchmark store {store}")
                row = {"layout": layout, "scale": scale, "rows": rows, "shards": len(m.shards),
                       "store_mib": m.nbytes / 2**20, "build_s": build_s, "verify": v}
                if scale in convert_scales:
                    other = "wds" if layout == "zarr" else "zarr"
                    dst = Path(tmp) / f"c{scale}.{other}"
                    row["convert"] = measure([*cli(), "convert", "--no-progress", str(store), str(dst)])
                    shutil.rmtree(dst, ignore_errors=True)
                shutil.rmtree(store)
                results.append(row)
                conv = row.get("convert")
                print(f"{layout:<5} {scale:>3}x {row['store_mib']:8.0f} MiB {row['shards']:5d} shards | verify "
                      f"{v['peak_rss_mib']:6.0f} MiB peak, {v['wall_s']:6.1f} s"
                      + (f" | convert {conv['peak_rss_mib']:6.0f} MiB peak, {conv['wall_s']:6.1f} s" if conv else ""),
                      flush=True)
    print()
    print("| layout | store | shards | verify peak RSS | over baseline | verify time | convert peak RSS "
          "| convert time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        v = r["verify"]
        line = (f"| {r['layout']} | {r['store_mib']:.0f} MiB ({r['scale']}x) | {r['shards']} | "
                f"{v['peak_rss_mib']:.0f} MiB | +{v['peak_rss_mib'] - baseline['peak_rss_mib']:.0f} MiB | "
                f"{v['wall_s']:.1f} s |")
        c = r.get("convert")
        line += f" {c['peak_rss_mib']:.0f} MiB | {c['wall_s']:.1f} s |" if c else " - | - |"
        print(line)
    write_report(Path(a.json), {
        "baseline": baseline, "key_memory_mib": a.key_memory,
        "shard_mib": SHARD_ROWS * ROW_BYTES / 2**20, "classes": CLASSES, "dtype": "float16",
        "results": results, "platform": platform.platform(), "cpus": os.cpu_count(),
        "softtargets": st.__version__,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
