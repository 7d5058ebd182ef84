"""Crash and resume with real processes: `softtargets precompute` on a dask LocalCluster of 2 worker
processes, its driver killed with SIGKILL mid-run, then resumed while a worker process dies
mid-task; the finished store must equal an uninterrupted run's, byte for byte.

The teacher and dataset factories below are imported by path from the configs
("tests.precompute.test_crash_resume:slow_mlp"), in the CLI's process and in its dask workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from softtargets.cli.commands.precompute import load_config
from softtargets.precompute import precompute
from softtargets.store import open_targets
from softtargets.store.manifest import ManifestError

REPO = pathlib.Path(__file__).resolve().parents[2]
N, D, C, K = 512, 16, 10, 3
SHARD_ROWS, BATCH = 64, 32  # 8 shards of 2 batches


class SlowMLP(nn.Module):
    """A seeded MLP ``[B, 16] -> [B, 10]`` that sleeps ``delay`` seconds per batch (a slow teacher)."""

    def __init__(self, seed: int, delay: float) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.net(x)


def slow_mlp(seed: int = 0, delay: float = 0.0) -> nn.Module:
    return SlowMLP(seed, delay)


class Synthetic(Dataset):
    """Seeded inputs, labels ``i % 10``, keys ``k00000``...

    With ``crash_flag``: the first process to read row ``crash_row`` creates the flag file and
    dies on the spot (``os._exit``), as a worker killed mid-task would; later reads succeed.
    """

    def __init__(self, n: int, crash_flag: str | None = None, crash_row: int = -1) -> None:
        self.x = torch.randn(n, D, generator=torch.Generator().manual_seed(7))
        self.keys = [f"k{i:05d}" for i in range(n)]
        self.crash_flag, self.crash_row = crash_flag, crash_row

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.crash_row and self.crash_flag and not os.path.exists(self.crash_flag):
            pathlib.Path(self.crash_flag).touch()
            os._exit(1)
        return self.x[i], i % C


def synthetic(n: int = N, crash_flag: str | None = None, crash_row: int = -1) -> Synthetic:
    return Synthetic(n, crash_flag, crash_row)


def write_config(path: pathlib.Path, out: str, delay: float, dataset_kwargs: str = "") -> pathlib.Path:
    teachers = "".join(
        f'[[teachers]]\nname = "t{k}"\nfactory = "tests.precompute.test_crash_resume:slow_mlp"\n'
        f"kwargs = {{ seed = {k}, delay = {delay} }}\n\n" for k in range(K)
    )
    path.write_text(f"""batch_size = {BATCH}
num_workers = 0

[output]
url = "{out}"
content = "per_teacher"
shard_rows = {SHARD_ROWS}

[transfer_set]
factory = "tests.precompute.test_crash_resume:synthetic"
kwargs = {{ n = {N}{dataset_kwargs} }}
name = "synthetic"

[cluster]
scheduler = "dask"
workers = 2

{teachers}""")
    return path


def cli(config: pathlib.Path, *args: str, log: pathlib.Path) -> subprocess.Popen:
    """`softtargets precompute CONFIG` in a new process group (so the test can clean it up)."""
    script = pathlib.Path(sys.executable).parent / "softtargets"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "softtargets.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([*cmd, "precompute", str(config), "--quiet", *args], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: pathlib.Path, timeout: float = 120) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    assert rc == 0, log.read_text()[-3000:]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group this test started (dask workers, if any)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def data_files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "README.md")}


def manifest_sans_run(root: pathlib.Path) -> dict:
    d = json.loads((root / "manifest.json").read_text())
    del d["created"], d["provenance"]
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """An uninterrupted run of the same config (in this process, no dask, teachers without sleep)."""
    tmp = tmp_path_factory.mktemp("reference")
    config = load_config(write_config(tmp / "ref.toml", "ref.zarr", delay=0.0))
    precompute(**{**config, "scheduler": "local"}, progress=False)
    return tmp / "ref.zarr"


def check_same_as_reference(out: pathlib.Path, reference: pathlib.Path) -> None:
    assert data_files(out) == data_files(reference)
    assert manifest_sans_run(out) == manifest_sans_run(reference)
    keys = open_targets(out, verify="full").keys()
    assert keys == [f"k{i:05d}" for i in range(N)]


def test_driver_killed_mid_run_then_resumed_losing_a_worker(tmp_path, reference):
    out, markers = tmp_path / "out.zarr", tmp_path / "out.zarr" / ".softtargets-shards"
    proc = cli(write_config(tmp_path / "run.toml", "out.zarr", delay=0.05), log=tmp_path / "run1.log")
    try:
        deadline = time.monotonic() + 120
        while len(list(markers.glob("*.json"))) < 2:
            assert proc.poll() is None, "the run ended before it was killed: " + (tmp_path / "run1.log").read_text()
            assert time.monotonic() < deadline, "no shard finished in 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run; its dask workers notice and exit
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    done_before = sorted(int(p.stem) for p in markers.glob("*.json"))
    assert not (out / "manifest.json").exists() and 2 <= len(done_before) < N // SHARD_ROWS
    with pytest.raises(ManifestError, match="unfinished"):
        open_targets(out)

    # Without resume, the half-written store is refused and left as it is.
    with pytest.raises(FileExistsError, match="pass resume=True"):
        precompute(**{**load_config(tmp_path / "run.toml"), "scheduler": "local"}, progress=False)
    assert sorted(int(p.stem) for p in markers.glob("*.json")) == done_before

    # A finished shard damaged after the crash fails its checksum and is redone.
    logits_file = out / json.loads((markers / f"{done_before[0]:06d}.json").read_text())["files"][0]["path"]
    damaged = bytearray(logits_file.read_bytes())
    damaged[-100] ^= 0xFF
    logits_file.write_bytes(bytes(damaged))

    # Resume; a dask worker process dies in the middle of a shard it was not done with.
    todo = max(set(range(N // SHARD_ROWS)) - set(done_before))
    flag = tmp_path / "worker-died"
    config = write_config(tmp_path / "resume.toml", "out.zarr", delay=0.0,
                          dataset_kwargs=f', crash_flag = "{flag}", crash_row = {todo * SHARD_ROWS + 40}')
    finish(cli(config, "--resume", log=tmp_path / "run2.log"), tmp_path / "run2.log")
    assert flag.exists()  # the worker did die
    check_same_as_reference(out, reference)
