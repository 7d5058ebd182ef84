"""Stage one's trust loops: overwrites that must delete nothing but stores, local runs with DataLoader
workers that must never hang, and dask runs killed and resumed that must end byte-identical to an
uninterrupted run.

    python benchmarks/trust_loops.py                       # 20 + 20 runs + 10 kill/resume cycles, ~5 min on 2 cores
    python benchmarks/trust_loops.py --overwrites 6 --runs 5 --cycles 2

* ``overwrite``: ``--overwrites`` folders that are not softtargets stores (a web app's ``manifest.json``,
  an empty or non-object one, a manifest of an unknown format version, a foreign run marker, in turn),
  each given to ``create_targets(..., overwrite=True)`` and to ``softtargets convert SRC DST --overwrite``;
  a folder counts as kept when both refuse and every file in it is unchanged. Every fourth round is a real
  store holding a link to a folder outside it: the overwrite must replace the store and leave the linked
  folder whole.

* ``hang``: ``--runs`` fresh processes, each ``precompute(..., scheduler="local", num_workers=2)`` over a
  custom map-style ``Dataset`` of 3000 rows with two ``nn.Linear`` teachers; a run still going after
  ``--timeout`` seconds is killed and counted as hung.
* ``kill/resume``: one uninterrupted run on a dask LocalCluster (1 worker process, 2 threads) as the
  reference; then ``--cycles`` times: the same run in a fresh process, SIGKILLed (with its dask workers)
  once a random number of shards is done, then resumed to the end (``resume=True``); every file of the
  store (the manifest without its ``created`` and ``provenance``) is compared byte for byte with the
  reference's.

Prints a table and writes JSON (default ``benchmarks/results/trust_loops.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
N, D, H, C, K = 2048, 256, 1024, 100, 3  # the kill/resume store: 16 shards of 128 rows, batches of 32
SHARD_ROWS, BATCH, DELAY = 128, 32, 0.01
MARKERS = ".softtargets-shards"


# -- what the child processes run (imported by name in dask workers: "trust_loops:mlp") ----------------------


class Rows(Dataset):
    """``n`` seeded inputs float32 ``[d]``, labels ``i % 10``."""

    def __init__(self, n: int, d: int) -> None:
        self.x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], i % 10


def rows(n: int = N, d: int = D) -> Rows:
    return Rows(n, d)


class SlowMLP(nn.Module):
    """A seeded MLP ``[B, D] -> [B, C]`` that sleeps ``delay`` seconds per batch. At these widths 1 and 2
    torch threads give other float32 bits (~500 of its 614 400 float16 logits over the store differ)."""

    def __init__(self, seed: int, delay: float) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, C))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.net(x)


def mlp(seed: int = 0, delay: float = 0.0) -> nn.Module:
    return SlowMLP(seed, delay)


class LinearA(nn.Linear):
    """One of the hang loop's two linear teachers (distinct class names: distinct teacher names)."""


class LinearB(nn.Linear):
    """The other one."""


def child_hang(out: str) -> None:
    """One local run with DataLoader workers (the reported hang)."""
    from softtargets.precompute import precompute

    torch.manual_seed(0)
    precompute([LinearA(32, 10), LinearB(32, 10)], Rows(3000, 32), out, scheduler="local", num_workers=2,
               batch_size=256, shard_rows=1024, progress=False)


def child_dask(out: str, resume: bool) -> None:
    """The kill/resume store on a LocalCluster of one worker process (two threads)."""
    from softtargets.precompute import precompute

    teachers = [{"factory": "trust_loops:mlp", "kwargs": {"seed": k, "delay": DELAY}, "name": f"t{k}"}
                for k in range(K)]
    precompute(teachers, {"factory": "trust_loops:rows", "name": "rows"}, out, scheduler="dask", workers=1,
               shard_rows=SHARD_ROWS, batch_size=BATCH, num_workers=0, resume=resume, progress=False)


# -- the loops ------------------------------------------------------------------------------------------------


def start(*args: str, log: Path) -> subprocess.Popen:
    """This script as a child (``--child ...``) in a new process group, with this folder importable."""
    path = os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", *args], cwd=HERE,
                            env={**os.environ, "PYTHONPATH": path}, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The child's exit status, or None if it was still running after ``timeout`` s (then killed)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        kill_group(proc)


def hang_loop(runs: int, timeout: float, tmp: Path) -> dict[str, Any]:
    results = []
    for i in range(runs):
        t0 = time.perf_counter()
        rc = wait(start("hang", str(tmp / f"hang{i}.zarr"), log=tmp / f"hang{i}.log"), timeout)
        results.append({"rc": rc, "seconds": round(time.perf_counter() - t0, 2)})
        status = "HUNG" if rc is None else ("ok" if rc == 0 else f"failed rc={rc}")
        print(f"  hang run {i + 1}/{runs}: {status} ({results[-1]['seconds']} s)", flush=True)
        if rc not in (0, None):
            print((tmp / f"hang{i}.log").read_text()[-2000:])
    return {"runs": runs, "ok": sum(r["rc"] == 0 for r in results), "hung": sum(r["rc"] is None for r in results),
            "failed": sum(r["rc"] not in (0, None) for r in results), "timeout_s": timeout, "results": results}


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a finished store; the manifest without what differs per run (time, command line)."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    del manifest["created"], manifest["provenance"]
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    files.pop("README.md", None)  # the dataset card quotes the manifest's run details
    return files


def kill_resume_loop(cycles: int, timeout: float, tmp: Path, rng: random.Random) -> dict[str, Any]:
    ref = tmp / "reference.zarr"
    rc = wait(start("dask", str(ref), log=tmp / "reference.log"), timeout)
    if rc != 0:
        raise RuntimeError(f"the reference run failed (rc {rc}): {(tmp / 'reference.log').read_text()[-2000:]}")
    reference = store_files(ref)
    shards = N // SHARD_ROWS
    results = []
    for i in range(cycles):
        out, t0 = tmp / f"cycle{i}.zarr", time.perf_counter()
        kill_at = rng.randint(1, shards - 2)
        proc = start("dask", str(out), log=tmp / f"cycle{i}-run.log")
        deadline, killed = time.monotonic() + timeout, False
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list((out / MARKERS).glob("*.json"))) >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run, as a crash would
                killed = True
                break
            time.sleep(0.005)
        wait(proc, 30)
        done_at_kill = len(list((out / MARKERS).glob("*.json")))
        rc = wait(start("dask", str(out), "--resume", log=tmp / f"cycle{i}-resume.log"), timeout)
        got = store_files(out) if rc == 0 else {}
        differ = sorted(k for k in reference.keys() | got.keys() if reference.get(k) != got.get(k))
        results.append({"killed": killed, "shards_done_at_kill": done_at_kill, "resume_rc": rc,
                        "identical": rc == 0 and not differ, "differing_files": differ[:20],
                        "seconds": round(time.perf_counter() - t0, 2)})
        r = results[-1]
        print(f"  cycle {i + 1}/{cycles}: killed={killed} after {done_at_kill}/{shards} shards, resume rc={rc}, "
              f"identical={r['identical']}{'' if not differ else f' (differ: {differ[:4]})'} ({r['seconds']} s)",
              flush=True)
        if rc != 0:
            print((tmp / f"cycle{i}-resume.log").read_text()[-2000:])
        shutil.rmtree(out, ignore_errors=True)
    return {"cycles": cycles, "killed": sum(r["killed"] for r in results),
            "identical": sum(r["identical"] for r in results),
            "resume_failed": sum(r["resume_rc"] != 0 for r in results), "results": results}


FOREIGN = {  # what a folder that is not a store may hold: file name -> bytes
    "web app": {"manifest.json": b'{"name": "app", "start_url": "/", "icons": []}', "index.html": b"<html></html>"},
    "empty manifest": {"manifest.json": b"", "data.csv": b"a,b\n1,2\n"},
    "list manifest": {"manifest.json": b"[1, 2, 3]", "notes.txt": b"keep me"},
    "future format": {"manifest.json": b'{"format_version": 99, "layout": "zarr"}', "x.bin": b"\x00" * 64},
    "foreign marker": {".softtargets-pending.json": b'{"owner": "someone else"}', "y.txt": b"keep me too"},
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def overwrite_loop(runs: int, tmp: Path) -> dict[str, Any]:
    """Overwrites that must refuse folders that are not stores, and replace a store without following its links."""
    import numpy as np

    import softtargets as st
    from softtargets.cli import main as cli

    def store(path: Path) -> None:
        with st.create_targets(path, num_classes=10, num_samples=8) as w:
            w.write([f"k{i}" for i in range(8)], np.random.default_rng(0).normal(size=(8, 10)).astype("float32"))

    src = tmp / "src.zarr"
    store(src)
    kept, cases = 0, []
    kinds = list(FOREIGN)
    for i in range(runs):
        dst = tmp / f"overwrite-{i}"
        if i % 4 == 3:  # a real store linking out of itself
            outside = tmp / f"outside-{i}"
            outside.mkdir()
            (outside / "precious.txt").write_bytes(b"precious")
            store(dst)
            (dst / "link").symlink_to(outside, target_is_directory=True)
            ok = cli(["convert", str(src), str(dst), "--overwrite"]) == 0 and (outside / "precious.txt").exists()
            kept += ok
            cases.append({"case": "store with a link out", "kept": bool(ok)})
            continue
        kind = kinds[i % len(kinds)]
        dst.mkdir()
        for name, data in FOREIGN[kind].items():
            (dst / name).write_bytes(data)
        before = _snapshot(dst)
        refused = 0
        try:
            st.create_targets(dst, num_classes=10, overwrite=True)
        except FileExistsError:
            refused += 1
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            refused += cli(["convert", str(src), str(dst), "--overwrite"]) == 2
        ok = refused == 2 and _snapshot(dst) == before
        kept += ok
        cases.append({"case": kind, "kept": bool(ok)})
    return {"runs": runs, "kept": kept, "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overwrites", type=int, default=20, help="overwrites of folders that are not stores")
    parser.add_argument("--runs", type=int, default=20, help="local runs with DataLoader workers")
    parser.add_argument("--cycles", type=int, default=10, help="dask kill/resume cycles")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before a run counts as hung")
    parser.add_argument("--seed", type=int, default=0, help="chooses when each cycle is killed")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "trust_loops.json")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, out = args.child
        child_hang(out) if kind == "hang" else child_dask(out, args.resume)
        return

    from timing import write_report

    tmp = Path(tempfile.mkdtemp(prefix="trust-loops-"))
    try:
        t0 = time.perf_counter()
        overwrite = overwrite_loop(args.overwrites, tmp)
        overwrite["seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        hang = hang_loop(args.runs, args.timeout, tmp)
        hang["seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        resume = kill_resume_loop(args.cycles, args.timeout, tmp, random.Random(args.seed))
        resume["seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'loop':<36} {'runs':>5} {'ok':>4} {'hung':>5} {'failed':>7} {'identical':>10} {'seconds':>8}")
    print(f"{'overwrite of folders not stores':<36} {overwrite['runs']:>5} {overwrite['kept']:>4} {'':>5} "
          f"{overwrite['runs'] - overwrite['kept']:>7} {'':>10} {overwrite['seconds']:>8.1f}")
    print(f"{'local, 2 DataLoader workers':<36} {hang['runs']:>5} {hang['ok']:>4} {hang['hung']:>5} "
          f"{hang['failed']:>7} {'':>10} {hang['seconds']:>8.1f}")
    print(f"{'dask, SIGKILL mid-run + resume':<36} {resume['cycles']:>5} {'':>4} {'':>5} "
          f"{resume['resume_failed']:>7} {resume['identical']:>10} {resume['seconds']:>8.1f}")
    write_report(args.out, {"benchmark": "trust_loops", "overwrite": overwrite, "hang": hang, "kill_resume": resume,
                            "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
