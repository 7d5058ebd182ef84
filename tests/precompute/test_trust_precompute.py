"""Stage one never hangs, runs teachers with the configured torch threads, and picks a user-friendly engine.

- Local precomputes whose DataLoader workers fork while the store is being prepared finish every time
  (a helper thread running a subprocess while workers forked used to wait forever on the child's pipe).
- Teachers run with the configured thread count even from a thread that inherited 1 (1 and 2 threads
  give other bits), on the local and the dask engine.
- ``scheduler=None`` runs in this process with at most one GPU; a LocalCluster asked for from a script's
  unguarded top-level code is refused with one line, before any store exists.

The scripts below run in fresh interpreters (subprocesses): a fork race, a process-wide thread setting
and a script's ``__main__`` are each a property of a whole process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import softtargets
from softtargets.precompute import precompute
from softtargets.store import open_targets

SOURCE = Path(softtargets.__file__).resolve().parents[1]  # the scripts import the package this test imported
D, C = 8, 5

# A custom map-style Dataset, two nn.Linear teachers, DataLoader workers, scheduler="local": the reported hang.
# Each repetition clears the platform module's caches, so every run is a first run of a fresh process
# (a cached platform string was the only thing that kept later runs in one process from racing).
HANG_SCRIPT = """
import platform, sys, time
import torch
from torch import nn
from torch.utils.data import Dataset
import softtargets as st

class TeacherA(nn.Linear):
    pass

class TeacherB(nn.Linear):
    pass

class Rows(Dataset):
    def __init__(self, n):
        self.x = torch.randn(n, 32, generator=torch.Generator().manual_seed(0))
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], i % 10

if __name__ == "__main__":
    out, reps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    teachers, data = [TeacherA(32, 10), TeacherB(32, 10)], Rows(3000)
    for r in range(reps):
        platform._platform_cache.clear()
        platform._uname_cache = None
        st.precompute(teachers, data, f"{out}/t{r}.zarr", scheduler="local", num_workers=2, batch_size=256,
                      shard_rows=1024, progress=False)
        print("done", r, flush=True)
"""

# Teachers that record torch.get_num_threads() in their forward pass, started from a thread that inherited 1.
THREADS_SCRIPT = """
import sys, threading
import torch
from torch import nn
from softtargets.precompute import precompute

SEEN = []

class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 5)
    def forward(self, x):
        if len(x) == 16:  # a batch (not the probe that finds C)
            SEEN.append(torch.get_num_threads())
        return self.net(x)

def inherit_one():
    setter = threading.Thread(target=torch.set_num_threads, args=(1,))  # threads started later inherit 1
    setter.start()
    setter.join()

if __name__ == "__main__":
    out, engine = sys.argv[1], sys.argv[2]
    print("configured", torch.get_num_threads())
    data = torch.utils.data.TensorDataset(torch.randn(96, 8), torch.arange(96) % 5)
    kw = dict(shard_rows=32, batch_size=16, num_workers=0, progress=False)
    if engine == "local":
        inherit_one()
        seen_by_caller = []
        def call():
            seen_by_caller.append(torch.get_num_threads())
            precompute([Counting()], data, out, scheduler="local", **kw)
        t = threading.Thread(target=call)
        t.start()
        t.join()
        print("caller", seen_by_caller[0])
    else:
        from distributed import Client, LocalCluster
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \\
                Client(cluster) as client:
            inherit_one()  # the worker's task threads start later, with 1
            precompute([Counting()], data, out, scheduler=client, **kw)
    print("teachers", sorted(set(SEEN)), len(SEEN))
"""

UNGUARDED_PRECOMPUTE = """
import torch
from torch import nn
import softtargets as st

torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(40, 8), torch.arange(40) % 5)
st.precompute([nn.Linear(8, 5)], data, "{out}", scheduler="dask", workers=1, num_workers=0, progress=False)
print("finished")
"""


def python(script: Path, *args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``script`` run by this interpreter, importing the softtargets this test imported."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=script.parent)


# -- item 2: no hang while DataLoader workers fork -------------------------------------------------------------


def test_local_precompute_with_dataloader_workers_finishes_every_time(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG_SCRIPT)
    reps = 10
    try:
        done = python(script, str(tmp_path), str(reps), timeout=60)
    except subprocess.TimeoutExpired as e:
        finished = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"precompute hung after {finished.count('done')} of {reps} runs")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done") == reps
    store = open_targets(tmp_path / f"t{reps - 1}.zarr", verify="full")
    assert len(store) == 3000 and store.manifest.provenance["platform"].startswith(os.uname().sysname)


# -- item 3: teachers run with the configured thread count ----------------------------------------------------


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_teachers_run_with_the_configured_threads_from_a_thread_that_inherited_one(tmp_path, engine):
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    done = python(script, str(tmp_path / "t.zarr"), engine, timeout=120, env={"OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    if lines["configured"] == "1":
        pytest.skip("torch runs 1 thread here: nothing to tell apart")
    if engine == "local":
        assert lines["caller"] == "1"  # the calling thread did inherit 1
    assert lines["teachers"] == f"[{lines['configured']}] 6"  # 96 rows in batches of 16, each on the configured count


def test_torch_threads_of_the_calling_thread_are_left_as_they_were(tmp_path):
    before = torch.get_num_threads()
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, D), torch.arange(40) % C)
    precompute([nn.Linear(D, C)], data, tmp_path / "t.zarr", scheduler="local", num_workers=0, progress=False)
    assert torch.get_num_threads() == before


# -- item 11: the default engine and the unguarded-script error -----------------------------------------------


class PidTeacher(nn.Module):
    """A linear teacher that records the process id of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Linear(D, C)
        self.pids: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pids.append(os.getpid())
        return self.net(x)


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="with several GPUs the default is a LocalCluster")
def test_default_scheduler_runs_in_this_process_without_dask(tmp_path):
    from distributed import default_client

    teacher = PidTeacher()
    data = torch.utils.data.TensorDataset(torch.randn(64, D), torch.arange(64) % C)
    m = precompute([teacher], data, tmp_path / "t.zarr", shard_rows=32, batch_size=16, num_workers=0, progress=False)
    assert m.num_samples == 64
    assert teacher.pids == [os.getpid()] * 5  # the probe that finds C, then every batch, in this process
    with pytest.raises(ValueError, match="No clients found"):
        default_client()


def test_scheduler_names():
    from softtargets.precompute.cluster import resolve_scheduler

    assert resolve_scheduler(None) == ("local" if torch.cuda.device_count() <= 1 else "dask")
    assert resolve_scheduler("local") == "local" and resolve_scheduler("dask") == "dask"
    assert resolve_scheduler("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"
    with pytest.raises(ValueError, match="must not be empty"):
        resolve_scheduler("")


def test_local_cluster_from_an_unguarded_script_is_refused_in_one_line_before_the_store(tmp_path):
    out = tmp_path / "t.zarr"
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_PRECOMPUTE.format(out=out))
    done = python(script, timeout=120)
    assert done.returncode == 1 and "finished" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: a dask LocalCluster's worker processes import ")
    assert 'put that code under `if __name__ == "__main__":`' in last and "line 8" in last
    assert "Nanny" not in done.stderr
    assert not out.exists()  # nothing to refuse on the rerun


GUARD_CASES = {
    "guarded": ('from softtargets.precompute.cluster import check_main_guard\n'
                'def main():\n    check_main_guard()\n\nif "__main__" == __name__:\n    main()\n'
                '    print("ok")\n'),
    "unguarded_function": ('from softtargets.precompute.cluster import check_main_guard\n'
                           'def main():\n    check_main_guard()\n\nmain()\nprint("ok")\n'),
}


@pytest.mark.parametrize("case", sorted(GUARD_CASES))
def test_main_guard_check_tells_guarded_from_unguarded_calls(tmp_path, case):
    script = tmp_path / f"{case}.py"
    script.write_text(GUARD_CASES[case])
    done = python(script, timeout=60)
    if case.startswith("guarded"):
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    else:
        assert done.returncode == 1 and "would rerun line 5" in done.stderr, done.stderr[-2000:]


def test_python_dash_m_cli_may_start_a_local_cluster(tmp_path):
    """``python -m softtargets.cli`` (no console script) is guarded: the LocalCluster check lets it through to the
    next step, here a teacher module that does not exist."""
    config = tmp_path / "run.toml"
    config.write_text('[output]\nurl = "out.zarr"\n\n[transfer_set]\nwebdataset = "in-{000..000}.tar"\n\n'
                      '[cluster]\nscheduler = "dask"\n\n[[teachers]]\nfactory = "no_such_module_st:net"\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "softtargets.cli", "precompute", str(config)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "no_such_module_st" in done.stderr and "LocalCluster" not in done.stderr, done.stderr
    assert not (tmp_path / "out.zarr").exists()
