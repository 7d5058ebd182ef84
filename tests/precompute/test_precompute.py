"""Tests of stage one (softtargets.precompute): real teachers, real stores, a real dask LocalCluster.

Most tests share one in-process LocalCluster of 2 workers (threads: dask's scheduling, task
keys, retries and results are the same as with processes, minus the process start-up);
test_crash_resume.py runs the CLI with process workers.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster
from torch import nn
from torch.utils.data import Dataset

from softtargets.errors import PreflightError
from softtargets.math.temperature import reduce_teachers
from softtargets.precompute import NonFiniteError, precompute
from softtargets.precompute.transfer import TransferSet
from softtargets.store import create_targets, open_targets
from softtargets.store.encoding import encode_logits
from softtargets.store.manifest import ManifestError

N, D, C = 300, 16, 10
SHARD, BATCH = 64, 32  # 5 shards, the last one of 44 rows; batches of 32 inside each shard


class Synthetic(Dataset):
    """``N`` seeded inputs float32 [D], labels ``i % C`` (or -1 for odd rows when ``unlabeled_odd``),
    keys ``s0000``...; rows in ``poison`` get a huge first feature (a NaN trigger for :class:`NaNOn`)."""

    def __init__(self, n: int = N, poison: tuple[int, ...] = (), keys: list[str] | None = None,
                 unlabeled_odd: bool = False) -> None:
        self.x = torch.randn(n, D, generator=torch.Generator().manual_seed(1))
        for i in poison:
            self.x[i, 0] = 1e3
        self.keys = keys or [f"s{i:04d}" for i in range(n)]
        self.unlabeled_odd = unlabeled_odd
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads.append(i)
        return self.x[i], (None if self.unlabeled_odd and i % 2 else i % C)


def mlp(seed: int, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, classes))


class NaNOn(nn.Module):
    """An MLP whose logits are NaN for rows with a huge first feature."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.where(x[:, :1] > 500, torch.full_like(out, float("nan")), out)


class Spiky(nn.Module):
    """An MLP with a logit of 1e5 (90 000 once zero-meaned: beyond float16) in class 3 of rows whose first
    feature is above 1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        out[:, 3] = torch.where(x[:, 0] > 1, 1e5, out[:, 3])
        return out


def _open_files_under(folder) -> list[str]:
    """Files under ``folder`` that this process holds open (Linux; elsewhere none are found)."""
    found = []
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def unseeded_linear() -> nn.Module:
    """A factory that draws new weights every call (not reproducible across processes)."""
    return nn.Linear(D, C)


def ensemble(k: int = 3) -> list[dict]:
    return [{"name": f"t{i}", "module": mlp(i)} for i in range(k)]


def direct(teachers: list[dict], ds: Synthetic, content: str, temperature: float | None, dtype: str,
           batch: int = BATCH) -> np.ndarray:
    """What the teachers give when run directly, batch by batch from each shard's first row, then stored."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(ds), SHARD):
            for lo in range(start, min(start + SHARD, len(ds)), batch):
                x = ds.x[lo:min(lo + batch, start + SHARD, len(ds))]
                per_teacher = torch.stack([t["module"].eval()(x).float() for t in teachers], dim=1)
                out.append(reduce_teachers(per_teacher, content, temperature or 1.0))
    return encode_logits(torch.cat(out), dtype)[0]


def data_files(url) -> dict[str, bytes]:
    """Every file of a store except the manifest and its card, by relative path."""
    root = url
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "README.md")}


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as c:
        yield c


def run(teachers, ds, out, scheduler, **kw):
    """precompute with this file's shard and batch sizes; ``scheduler``: the cluster's client or "local". On the
    CPU by default: the tests compare bits with :func:`direct`, which runs the teachers on the CPU."""
    kw = {"shard_rows": SHARD, "batch_size": BATCH, "num_workers": 0, "progress": False, "device": "cpu", **kw}
    return precompute(teachers, ds, out, scheduler=scheduler, **kw)


# ---------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(("content", "temperature", "dtype"), [
    ("per_teacher", None, "float16"), ("geometric", None, "float32"), ("arithmetic", 4.0, "bfloat16"),
])
def test_store_holds_what_the_teachers_give(tmp_path, client, content, temperature, dtype):
    teachers, ds = ensemble(), Synthetic(unlabeled_odd=True)
    m = run(teachers, ds, tmp_path / "t.zarr", client, content=content, temperature=temperature, dtype=dtype)
    store = open_targets(tmp_path / "t.zarr", verify="full")
    rows = store[:]
    want = direct(teachers, ds, content, temperature, dtype)
    got = rows["logits"]
    got = got.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else got.numpy()
    assert got.shape == ((N, 3, C) if content == "per_teacher" else (N, C))
    np.testing.assert_array_equal(got, want)
    assert rows["key"] == ds.keys
    assert rows["label"].tolist() == [-1 if i % 2 else i % C for i in range(N)]
    assert m.num_shards == 5 and [s.rows for s in m.shards] == [64, 64, 64, 64, 44]
    assert [t["name"] for t in m.teachers] == ["t0", "t1", "t2"] and all(len(t["sha256"]) == 64 for t in m.teachers)
    assert m.transfer_set["name"] == "Synthetic" and m.temperature == temperature
    assert m.extra["precompute"] == {"batch_size": BATCH, "autocast": None, "nonfinite": "error"}


def test_batches_reach_the_writer_in_groups_that_split_shards(tmp_path):
    """Batches of 8: 8 a shard, handed to the writer in groups of 4 (half the queue); the last shard's 44
    rows end in a group of 2 batches, the second of 4 rows. The store is what the teachers give."""
    teachers, ds = ensemble(2), Synthetic()
    m = run(teachers, ds, tmp_path / "g.zarr", "local", batch_size=8, content="geometric", dtype="float32")
    want = direct(teachers, ds, "geometric", None, "float32", batch=8)
    np.testing.assert_array_equal(open_targets(tmp_path / "g.zarr", verify="full")[:]["logits"].numpy(), want)
    assert [s.rows for s in m.shards] == [64, 64, 64, 64, 44]


def test_shard_files_streamed_batch_by_batch_equal_whole_writes(tmp_path):
    """Inner chunks of 16 rows: the local engine writes each shard's files (logits, labels, keys) as its
    batches come (the last shard: 2 full chunks and one of 12 rows, padded); the same rows written whole by
    ``write_shard`` give the same bytes, and a full verify of the streamed store passes."""
    teachers, ds = ensemble(2), Synthetic()
    run(teachers, ds, tmp_path / "s.zarr", "local", block_rows=16)
    writer = create_targets(tmp_path / "w.zarr", num_classes=C, num_teachers=2, num_samples=N, shard_rows=SHARD,
                            block_rows=16)
    want = direct(teachers, ds, "per_teacher", None, "float16")
    for sid in range(writer.spec.num_shards):
        lo, hi = writer.spec.shard_range(sid)
        writer.write_shard(sid, np.array(ds.keys[lo:hi]), want[lo:hi], np.arange(lo, hi) % C, encoded=True)
    streamed = open_targets(tmp_path / "s.zarr", verify="full")
    assert streamed.manifest.shards[-1].rows == 44
    np.testing.assert_array_equal(streamed[:]["logits"].numpy(), want)
    def shard_files(url):
        return {p: b for p, b in data_files(url).items() if p.split("/")[0] in ("logits", "labels", "keys")
                and "/c" in p}

    assert len(shard_files(tmp_path / "s.zarr")) == 15
    assert shard_files(tmp_path / "s.zarr") == shard_files(tmp_path / "w.zarr")
    assert not [p for p in (tmp_path / "s.zarr").rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("sample_layout", ["block", "sample"])
def test_tar_shards_streamed_batch_by_batch_equal_whole_writes(tmp_path, sample_layout):
    """WebDataset shards written as batches come (batches of 24, blocks of 16 rows: blocks end inside
    batches; the last shard's 44 rows end in a partial block), with inputs packed in the sample layout:
    the same tar bytes as ``write_shard`` of the same rows, and a full verify passes."""
    teachers, ds = ensemble(2), Synthetic()
    packed = sample_layout == "sample"
    run(teachers, ds, tmp_path / "s.wds", "local", batch_size=24, block_rows=None if packed else 16,
        pack_inputs=packed)
    spec = open_targets(tmp_path / "s.wds", verify="full").manifest
    assert spec.sample_layout == sample_layout
    writer = create_targets(tmp_path / "w.wds", num_classes=C, num_teachers=2, num_samples=N, shard_rows=SHARD,
                            block_rows=spec.block_rows, sample_layout=spec.sample_layout,
                            inputs=spec.inputs or None)
    want = direct(teachers, ds, "per_teacher", None, "float16", batch=24)
    for sid in range(writer.spec.num_shards):
        lo, hi = writer.spec.shard_range(sid)
        inputs = [{"input.npy": ds.x[i].numpy()} for i in range(lo, hi)] if packed else None
        writer.write_shard(sid, np.array(ds.keys[lo:hi]), want[lo:hi], np.arange(lo, hi) % C, inputs, encoded=True)
    tars = {p: b for p, b in data_files(tmp_path / "s.wds").items() if p.endswith(".tar")}
    assert len(tars) == 5 and tars == {p: b for p, b in data_files(tmp_path / "w.wds").items() if p.endswith(".tar")}
    assert not [p for p in (tmp_path / "s.wds").rglob("*") if ".tmp-" in p.name]


def test_values_clipped_in_streamed_files_are_counted(tmp_path):
    """overflow="clip": streamed Zarr (chunks of 16 rows) and WebDataset stores count, per shard, the rows
    whose spike was clipped, and hold the same values. No file is left open."""
    teachers, ds = [{"name": "spiky", "module": Spiky()}], Synthetic()
    streamed = run(teachers, ds, tmp_path / "s.zarr", "local", block_rows=16, overflow="clip")
    tars = run(teachers, ds, tmp_path / "w.wds", "local", overflow="clip")
    assert not _open_files_under(tmp_path)
    spikes = (ds.x[:, 0] > 1).reshape(-1)
    want = [int(spikes[lo:lo + SHARD].sum()) for lo in range(0, N, SHARD)]
    assert [s.clipped for s in streamed.shards] == [s.clipped for s in tars.shards] == want and sum(want) > 5
    assert streamed.clipped_values == tars.clipped_values == sum(want)
    logits = open_targets(tmp_path / "s.zarr", verify="full")[:]["logits"]
    np.testing.assert_array_equal(logits.numpy(), open_targets(tmp_path / "w.wds")[:]["logits"].numpy())
    assert (logits[spikes, 0, 3] == 65504).all() and logits.abs().max() == 65504


def test_local_engine_equals_dask_bitwise_and_wds_packs_inputs(tmp_path, client):
    teachers, ds = ensemble(2), Synthetic()
    run(teachers, ds, tmp_path / "dask.zarr", client, content="geometric")
    m = run(teachers, ds, tmp_path / "local.zarr", "local", content="geometric", num_workers=2)
    assert data_files(tmp_path / "dask.zarr") == data_files(tmp_path / "local.zarr")
    assert m.num_samples == N
    # WebDataset, one row per tar sample, inputs packed beside the targets.
    m = run(teachers, ds, tmp_path / "t.wds", client, content="geometric", pack_inputs=True)
    store = open_targets(tmp_path / "t.wds")
    assert m.layout == "wds" and m.sample_layout == "sample" and len(store.shard_urls) == 5
    for i in (0, 63, 64, 299):
        np.testing.assert_array_equal(store.read_inputs(i)["input.npy"], ds.x[i].numpy())
    np.testing.assert_array_equal(store[:]["logits"].numpy(),
                                  open_targets(tmp_path / "dask.zarr")[:]["logits"].numpy())


# ---------------------------------------------------------------------------------------------------
# Refusals: nothing half-written looks complete


def test_class_count_mismatch_is_refused_before_writing(tmp_path, client):
    teachers = [{"name": "ten", "module": mlp(0)}, {"name": "seven", "module": mlp(1, classes=7)}]
    with pytest.raises(ValueError, match=r"disagree on the number of classes: 'ten': 10, 'seven': 7"):
        run(teachers, Synthetic(), tmp_path / "t.zarr", client)
    assert not (tmp_path / "t.zarr").exists()


def test_duplicate_keys_are_refused_before_writing(tmp_path, client):
    keys = [f"s{i:04d}" for i in range(N)]
    keys[200] = keys[7]
    with pytest.raises(ValueError, match=r"'s0007' at indices \[7, 200\]"):
        run(ensemble(1), Synthetic(keys=keys), tmp_path / "t.zarr", client)
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("content", ["per_teacher", "geometric"])
def test_nan_logits_stop_the_run_naming_teacher_and_keys(tmp_path, client, content):
    teachers = [*ensemble(2), {"name": "bad", "module": NaNOn()}]
    with pytest.raises(NonFiniteError, match=r"teacher 'bad' on 2 samples, keys \['s0070', 's0071'\]"):
        run(teachers, Synthetic(poison=(70, 71)), tmp_path / "t.zarr", client, retries=2, content=content)
    with pytest.raises(ManifestError, match="unfinished"):
        open_targets(tmp_path / "t.zarr")
    shard1 = tmp_path / "t.zarr" / ".softtargets-shards" / "000001.json"
    assert not shard1.exists()  # the shard holding rows 64..127 never counts as done


def test_nan_logits_stored_as_uniform_when_asked(tmp_path, client):
    teachers = [*ensemble(2), {"name": "bad", "module": NaNOn()}]
    ds = Synthetic(poison=(70, 71))
    m = run(teachers, ds, tmp_path / "t.zarr", client, nonfinite="uniform")
    assert m.extra["nonfinite"] == {"policy": "uniform", "rows": {"s0070": ["bad"], "s0071": ["bad"]}}
    logits = open_targets(tmp_path / "t.zarr")[:]["logits"].float()
    assert torch.equal(logits[70:72, 2], torch.zeros(2, C))  # zero-meaned zeros: a uniform distribution
    assert torch.isfinite(logits).all() and logits[72, 2].abs().sum() > 0


def test_existing_output_is_refused_and_left_alone(tmp_path, client):
    out = tmp_path / "t.zarr"
    run(ensemble(1), Synthetic(), out, client)
    before = data_files(out), (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="pass resume=True .* or overwrite=True"):
        run(ensemble(2), Synthetic(), out, client)
    assert (data_files(out), (out / "manifest.json").read_bytes()) == before
    with pytest.raises(FileExistsError, match="finished store"):
        run(ensemble(1), Synthetic(), out, client, resume=True)
    m = run(ensemble(2), Synthetic(), out, client, overwrite=True)
    assert m.num_teachers == 2 and open_targets(out).manifest.num_teachers == 2


def test_unreproducible_factory_is_refused_on_the_worker(tmp_path, client):
    spec = [{"name": "random", "factory": "tests.precompute.test_precompute:unseeded_linear"}]
    with pytest.raises(PreflightError, match="other weights .* factory is not deterministic"):  # every worker
        run(spec, Synthetic(), tmp_path / "t.zarr", client)
    assert not (tmp_path / "t.zarr").exists()


def test_fp16_autocast_is_refused_on_cpu_and_bf16_runs(tmp_path, client):
    with pytest.raises(ValueError, match="autocast='fp16' needs a CUDA device"):
        run(ensemble(1), Synthetic(), tmp_path / "a.zarr", "local", autocast="fp16", device="cpu")
    assert not (tmp_path / "a.zarr").exists()
    m = run(ensemble(1), Synthetic(), tmp_path / "b.zarr", "local", autocast="bf16", dtype="float32")
    assert m.extra["precompute"]["autocast"] == "bf16"
    bf16 = open_targets(tmp_path / "b.zarr")[:]["logits"]
    exact = torch.from_numpy(direct(ensemble(1), Synthetic(), "per_teacher", None, "float32"))
    assert not torch.equal(bf16, exact) and torch.allclose(bf16, exact, atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [None, "bf16", "fp16"])
def test_cuda_run_matches_the_cpu_and_leaves_the_teachers_where_they_were(tmp_path, autocast):
    teachers, ds = ensemble(), Synthetic()
    m = run(teachers, ds, tmp_path / "g.zarr", "local", device="cuda", autocast=autocast, content="per_teacher",
            dtype="float32")
    assert all(p.device.type == "cpu" for t in teachers for p in t["module"].parameters())
    assert m.extra["precompute"]["autocast"] == autocast
    got = open_targets(tmp_path / "g.zarr", verify="full")[:]["logits"]
    want = torch.from_numpy(direct(teachers, ds, "per_teacher", None, "float32"))
    tol = {None: 1e-5, "bf16": 0.1, "fp16": 1e-2}[autocast]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------------
# Resume (in this process; kill -9 of real processes: test_crash_resume.py)


class FailsAt(Synthetic):
    """Raises on reading row ``fail_at`` (a crash in the middle of a run)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise OSError(f"disk gone at row {i}")
        return super().__getitem__(i)


def test_resume_redoes_only_missing_shards_and_matches_a_clean_run(tmp_path):
    teachers = ensemble(2)
    precompute(teachers, Synthetic(), tmp_path / "clean.zarr", scheduler="local", shard_rows=SHARD,
               batch_size=BATCH, num_workers=0, progress=False)
    out = tmp_path / "t.zarr"
    with pytest.raises(OSError, match="disk gone at row 200"):
        precompute(teachers, TransferSet(FailsAt(200), name="Synthetic"), out, scheduler="local",
                   shard_rows=SHARD, batch_size=BATCH, num_workers=0, progress=False)
    done = sorted(p.name for p in (out / ".softtargets-shards").glob("*.json"))
    assert done == ["000000.json", "000001.json", "000002.json"]
    with pytest.raises(ValueError, match="batch_size: stored 32, now 16"):
        precompute(teachers, Synthetic(), out, scheduler="local", shard_rows=SHARD, batch_size=16,
                   num_workers=0, progress=False, resume=True)
    ds = Synthetic()
    m = precompute(teachers, ds, out, scheduler="local", shard_rows=SHARD, batch_size=BATCH, num_workers=0,
                   progress=False, resume=True)
    # shards 0-2 were kept, not recomputed (rows 0 and 1 are read once to probe the class count)
    assert sorted(set(ds.reads) - {0, 1}) == list(range(192, N))
    assert data_files(out) == data_files(tmp_path / "clean.zarr")
    clean = json.loads((tmp_path / "clean.zarr" / "manifest.json").read_text())
    resumed = json.loads((out / "manifest.json").read_text())
    for d in (clean, resumed):
        del d["created"], d["provenance"]
    assert resumed == clean and m.num_samples == N


class ThreadCounting(nn.Module):
    """An MLP that records torch's thread count at each forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(3)
        self.threads: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        return self.net(x)


def test_teachers_keep_the_callers_torch_threads(tmp_path):
    """The writer thread runs its own torch ops on one thread; the teachers keep the caller's count, during the
    run and after it."""
    before = torch.get_num_threads()
    teacher = ThreadCounting()
    try:
        torch.set_num_threads(3)
        run([{"name": "t", "module": teacher}], Synthetic(), tmp_path / "t.zarr", "local")
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert after == 3
    assert len(teacher.threads) > N // BATCH and set(teacher.threads) == {3}  # the probe, then every batch
