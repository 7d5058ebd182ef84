"""Stage one on an existing dask cluster writing to S3, on loopback: a ``dask scheduler`` and two ``dask worker``
processes (each in its own working directory, without the driver's paths or credentials), a moto S3 server,
``softtargets precompute`` with storage options from the TOML, a worker killed mid-run; then ``verify`` and a
full ``st.stream`` epoch from ``s3://``, all equal to a local run. And the pre-flight: a missing module,
unreadable weights, credentials missing on the workers or everywhere are each refused in one line naming the
worker, before anything is created."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import softtargets as st
from softtargets.cli import main
from softtargets.errors import PreflightError
from tests.store_data import bits

pytest.importorskip("s3fs")
pytest.importorskip("moto")
distributed = pytest.importorskip("distributed")

BIN = Path(sys.executable).parent
SECRET = "s3cr3t-loopback-7f3a9c"  # must appear in no object of the bucket
ZOO = '''
import time
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Linear(nn.Module):
    def __init__(self, seed: int, delay: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(8, 5)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(5, 8, generator=g))
            self.lin.bias.copy_(torch.randn(5, generator=g))
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.lin(x)


def teacher(seed: int = 0, delay: float = 0.0) -> nn.Module:
    return Linear(seed, delay)


def data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.arange(n) % 5)
'''


def _die_with_parent() -> None:
    """In a child process (Linux): be killed when the test process ends, however it ends."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, ok, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up in {timeout} s")
        time.sleep(0.05)


class Loopback:
    """The moto server, the dask scheduler and its workers (subprocesses), and the folders the test uses."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.zoo = root / "zoo"  # the workers' PYTHONPATH: the teachers' and the transfer set's module
        self.zoo.mkdir()
        (self.zoo / "loopback_zoo.py").write_text(ZOO)
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        port = _free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.procs.append(subprocess.Popen([BIN / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           preexec_fn=_die_with_parent))
        sched_file = root / "scheduler.json"
        self.procs.append(subprocess.Popen(
            [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
             sched_file], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root, preexec_fn=_die_with_parent))
        _wait("the dask scheduler", sched_file.exists)
        _wait("the dask scheduler", lambda: "address" in sched_file.read_text())
        self.address = json.loads(sched_file.read_text())["address"]
        self.client = distributed.Client(self.address)
        for name in ("w0", "w1"):
            self.start_worker(name)
        self.client.wait_for_workers(2, timeout=60)
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                               aws_secret_access_key=SECRET, region_name="us-east-1")
        _wait("moto", self._moto_up)
        self.s3.create_bucket(Bucket="bucket")

    def _moto_up(self) -> bool:
        try:
            self.s3.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not listening yet
            return False

    def start_worker(self, name: str) -> None:
        home = self.root / name
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(PYTHONPATH=str(self.zoo), AWS_EC2_METADATA_DISABLED="true", HOME=str(home),
                   AWS_CONFIG_FILE=str(home / "none"), AWS_SHARED_CREDENTIALS_FILE=str(home / "none"),
                   OMP_NUM_THREADS="1")
        self.workers[name] = subprocess.Popen(
            [BIN / "dask", "worker", self.address, "--nthreads", "1", "--no-nanny", "--name", name,
             "--local-directory", home, "--no-dashboard"],
            cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=open(home / "log", "ab"),  # noqa: SIM115
            preexec_fn=_die_with_parent)

    def storage(self, secret: bool = True) -> dict:
        opts: dict = {"client_kwargs": {"endpoint_url": self.endpoint}}
        if secret:
            opts.update(key="testing", secret=SECRET)
        return opts

    def keys(self, prefix: str = "") -> list[str]:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket="bucket", Prefix=prefix).get("Contents", [])]

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        found = self.s3.list_objects_v2(Bucket="bucket", Prefix=prefix).get("Contents", [])
        return {o["Key"]: self.s3.get_object(Bucket="bucket", Key=o["Key"])["Body"].read() for o in found}

    def close(self) -> None:
        self.client.close()
        for p in [*self.workers.values(), *reversed(self.procs)]:
            p.kill()
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    lb = Loopback(tmp_path_factory.mktemp("loopback"))
    try:
        yield lb
    finally:
        lb.close()


@pytest.fixture(autouse=True)
def _fresh_filesystems(monkeypatch, loop):
    """No AWS_* variables in this process unless a test sets them; no s3fs instance kept from another test."""
    import s3fs

    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(loop.root / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(loop.root / "none"))
    monkeypatch.syspath_prepend(str(loop.zoo))
    s3fs.S3FileSystem.clear_instance_cache()


def _config(loop: Loopback, folder: Path, url: str, storage: dict | None, factory: str = "loopback_zoo:teacher",
            delay: float = 0.0, scheduler: str | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    teachers = "".join(f'[[teachers]]\nname = "t{i}"\nfactory = "{factory}"\nkwargs = {{ seed = {i}, delay = {delay} }}'
                       "\n\n" for i in range(2))
    table = ""
    if storage:
        table = "[storage]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in storage.items() if k != "client_kwargs")
        if "client_kwargs" in storage:
            table += f'client_kwargs = {{ endpoint_url = "{storage["client_kwargs"]["endpoint_url"]}" }}\n'
    text = textwrap.dedent(f'''
        batch_size = 8
        num_workers = 0

        [output]
        url = "{url}"
        shard_rows = 8

        [transfer_set]
        factory = "loopback_zoo:data"

        [cluster]
        scheduler = "{scheduler or loop.address}"
        retries = 1

        ''') + table + "\n" + teachers
    path = folder / "config.toml"
    path.write_text(text)
    return path


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_preflight_refuses_a_module_the_workers_cannot_import(loop, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"  # the driver imports from the config's folder; the workers cannot
    elsewhere.mkdir()
    (elsewhere / "elsewhere_zoo.py").write_text("from loopback_zoo import teacher\n")
    config = _config(loop, elsewhere, "s3://bucket/missing-module.zarr", loop.storage(),
                     factory="elsewhere_zoo:teacher")
    rc, _, err = _cli(capsys, "precompute", config, "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "2 of 2 dask workers" in err and "elsewhere_zoo" in err and "PYTHONPATH" in err
    assert err.count("worker tcp://127.0.0.1:") == 2 and socket.gethostname() in err
    assert loop.objects("missing-module") == {}


def test_preflight_refuses_unreadable_weights_and_ship_weights_sends_them(loop, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path the driver reads; each worker runs in a folder of its own
    import loopback_zoo

    torch.save(loopback_zoo.teacher(seed=7).state_dict(), "w.pt")
    teachers = [{"name": "t", "factory": "loopback_zoo:teacher", "kwargs": {"seed": 0}, "weights": "w.pt"}]
    dataset = {"factory": "loopback_zoo:data"}
    url = "s3://bucket/shipped.zarr"
    with pytest.raises(PreflightError, match=r"worker tcp://127\.0\.0\.1:\d+ on .*w\.pt.*ship_weights") as e:
        st.precompute(teachers, dataset, url, shard_rows=32, batch_size=16, num_workers=0, scheduler=loop.address,
                      storage_options=loop.storage(), progress=False)
    assert len(e.value.workers) == 2 and "\n" not in str(e.value)
    assert loop.objects("shipped") == {}
    m = st.precompute(teachers, dataset, url, shard_rows=32, batch_size=16, num_workers=0, scheduler=loop.address,
                      storage_options=loop.storage(), progress=False, ship_weights=True)
    local = st.precompute(teachers, dataset, tmp_path / "local.zarr", shard_rows=32, batch_size=16, num_workers=0,
                          scheduler="local", progress=False)
    assert m.teachers == local.teachers
    a = st.open_targets(url, storage_options=loop.storage())[:]
    b = st.open_targets(tmp_path / "local.zarr")[:]
    assert torch.equal(bits(a["logits"]), bits(b["logits"])) and a["key"] == b["key"]


def test_no_credentials_anywhere_is_one_line_and_creates_nothing(loop, tmp_path, capsys):
    config = _config(loop, tmp_path / "c", "s3://bucket/nocreds.zarr", loop.storage(secret=False))
    started = time.monotonic()
    rc, _, err = _cli(capsys, "precompute", config, "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot write s3://bucket/nocreds.zarr: no credentials" in err and "--storage-option" in err
    assert time.monotonic() - started < 20
    assert loop.objects("nocreds") == {}


def test_credentials_only_on_the_driver_are_refused_naming_the_workers(loop, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # the driver's own; the workers have none
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    config = _config(loop, tmp_path / "c", "s3://bucket/drivercreds.zarr", loop.storage(secret=False))
    rc, _, err = _cli(capsys, "precompute", config, "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.count("worker tcp://127.0.0.1:") == 2 and "no credentials" in err
    assert loop.objects("drivercreds") == {}


def test_precompute_to_s3_with_a_worker_killed_equals_a_local_run(loop, tmp_path, capsys):
    url = "s3://bucket/targets.zarr"
    config = _config(loop, tmp_path / "s3", url, loop.storage(), delay=0.05)
    local_config = _config(loop, tmp_path / "local", str(tmp_path / "local.zarr"), None, delay=0.0,
                           scheduler="local")
    assert _cli(capsys, "precompute", local_config, "--quiet")[0] == 0

    result: dict = {}

    def run() -> None:
        result["rc"] = main(["precompute", str(config), "--quiet", "--json"])

    driver = threading.Thread(target=run)
    driver.start()
    _wait("a first shard on S3", lambda: any("/logits/c/" in k for k in loop.keys("targets.zarr")) or
          not driver.is_alive(), timeout=60)
    assert driver.is_alive()
    loop.workers["w1"].kill()  # mid-run: its tasks go to w0
    driver.join(timeout=120)
    assert result.get("rc") == 0
    loop.workers["w1"].wait(timeout=30)
    assert SECRET.encode() not in b"".join(loop.objects("targets.zarr").values())

    opts = [f"--storage-option=client_kwargs.endpoint_url={loop.endpoint}", "--storage-option=key=testing",
            f"--storage-option=secret={SECRET}"]
    rc, out, err = _cli(capsys, "verify", url, "--no-progress", *opts)
    assert rc == 0, out + err
    remote = st.open_targets(url, storage_options=loop.storage())
    local = st.open_targets(tmp_path / "local.zarr")
    assert remote.manifest.teachers == local.manifest.teachers and remote.manifest.shards == local.manifest.shards
    got = list(st.stream(url, batch_size=16, seed=3, storage_options=loop.storage()))
    want = list(st.stream(local, batch_size=16, seed=3))
    assert len(got) == len(want) == 6
    for g, w in zip(got, want, strict=True):
        assert g["key"] == w["key"] and torch.equal(bits(g["teacher_logits"]), bits(w["teacher_logits"]))
