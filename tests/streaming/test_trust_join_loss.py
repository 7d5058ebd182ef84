"""Recipes that never unpickle, joins that check they join the right dataset, a KD loss reported as KL."""

from __future__ import annotations

import io
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import softtargets as st
from softtargets.math.losses import DistillationLoss, distillation_loss, kd_loss
from softtargets.streaming import JoinMismatchError
from softtargets.streaming.joined import with_targets

from ..sharing import C, K, N, all_rows, labels, make_store, sample_keys

README = Path(__file__).resolve().parents[2] / "README.md"

# -- the README's plain-webdataset recipe reads arrays, never pickles -----------------------------------------


def readme_recipe(name: str) -> str:
    """The python block after ``<!-- recipe: NAME -->`` in the README."""
    found = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", README.read_text(), flags=re.S)
    assert found, f"README.md has no block marked <!-- recipe: {name} -->"
    return found.group(1)


def run_recipe(code: str) -> list[tuple]:
    """Run the recipe (its loop last) as written, recording what each pass of the loop body read."""
    seen: list[tuple] = []
    exec(code + "    seen.append((logits, labels, keys, index))\n", {"seen": seen})  # noqa: S102 - the recipe
    return seen


class Payload:
    """Unpickling it creates ``path``: a stand-in for code a hostile store would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def hostile_shards(root: Path, marker: Path, *, in_logits: bool) -> None:
    """Four block-layout shards whose blocks carry pickles (``.pyd``/``.pkl`` members beside the arrays, or an
    object array as ``logits.npy``) that create ``marker`` when unpickled."""
    evil = pickle.dumps(Payload(marker))
    members = {
        "logits.npy": npy_bytes(np.array([Payload(marker)], dtype=object) if in_logits else np.zeros((2, C))),
        "labels.npy": npy_bytes(np.array([1, 2])), "keys.npy": npy_bytes(np.array(["a", "b"])),
        "index.npy": npy_bytes(np.array([0, 1])), "extra.pyd": evil, "extra.pkl": evil,
    }
    root.mkdir()
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"000000.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for i in range(1, 4):
        shutil.copy(root / "shard-000000.tar", root / f"shard-{i:06d}.tar")


def test_readme_webdataset_recipe_reads_a_real_store(tmp_path, monkeypatch):
    path = make_store(tmp_path, "wds", name="targets", shard_rows=40, block_rows=8)  # 4 shards
    store = st.open_targets(path)
    assert len(store.manifest.shards) == 4
    monkeypatch.chdir(tmp_path)
    seen = run_recipe(readme_recipe("plain-webdataset"))
    assert len(seen) == 3 * 5 + 4  # blocks of 8 rows: 5 per 40-row shard, 4 in the last (30 rows)
    logits, stored_labels, keys, index = (np.concatenate(part) for part in zip(*seen, strict=True))
    rows = all_rows(store)
    assert index.tolist() == list(range(N)) and keys.tolist() == rows["key"]
    assert stored_labels.tolist() == rows["label"].tolist() == labels(N).tolist()
    assert logits.dtype == np.float16 and logits.shape == (N, K, C)
    assert np.array_equal(logits, rows["logits"].numpy())


@pytest.mark.parametrize("in_logits", [False, True], ids=["pickle-members", "object-array"])
def test_readme_webdataset_recipe_never_unpickles(tmp_path, monkeypatch, in_logits):
    import webdataset as wds

    marker = tmp_path / "ran.txt"
    hostile_shards(tmp_path / "targets.wds", marker, in_logits=in_logits)
    monkeypatch.chdir(tmp_path)
    code = readme_recipe("plain-webdataset")
    if in_logits:
        with pytest.raises(ValueError, match="allow_pickle=False"):
            run_recipe(code)
    else:
        seen = run_recipe(code)
        assert len(seen) == 4 and seen[0][2].tolist() == ["a", "b"]  # the arrays read; the pickles ignored
    assert not marker.exists()
    shard = tmp_path / "targets.wds/shard-000000.tar"
    if in_logits:  # the payload is live: an unguarded np.load runs it
        with tarfile.open(shard) as tar:
            np.load(io.BytesIO(tar.extractfile("000000.logits.npy").read()), allow_pickle=True)
    else:  # the payload is live: webdataset's .decode() runs it
        next(iter(wds.WebDataset(str(shard), shardshuffle=False).decode()))
    assert marker.exists()


def test_dataset_card_webdataset_recipe_never_unpickles(tmp_path):
    from softtargets.store.card import URL_PLACEHOLDER

    path = make_store(tmp_path, "wds", name="targets", shard_rows=40, block_rows=8)  # 4 shards, as hostile_shards
    text = (path / "README.md").read_text().replace(URL_PLACEHOLDER, str(path))
    (code,) = re.findall(r"```python\n(.*?)```", text.split("## Read it without softtargets", 1)[1], flags=re.S)
    seen: list[dict] = []
    exec(code.replace("    x = ", "    seen.append(dict(locals()))\n    x = "), {"seen": seen})  # noqa: S102
    assert np.concatenate([s["index"] for s in seen]).tolist() == list(range(N))
    marker = tmp_path / "ran.txt"
    shutil.rmtree(path)
    hostile_shards(path, marker, in_logits=False)
    seen.clear()
    exec(code.replace("    x = ", "    seen.append(dict(locals()))\n    x = "), {"seen": seen})  # noqa: S102
    assert len(seen) == 4 and not marker.exists()


def test_softtargets_wds_reader_never_unpickles(tmp_path):
    from softtargets.store.wds_layout import npy_load, npy_view

    marker = tmp_path / "ran.txt"
    evil = pickle.dumps(Payload(marker))
    path = tmp_path / "packed.wds"
    writer = st.create_targets(path, num_classes=C, content="geometric", layout="wds", sample_layout="sample",
                               inputs={"input.npy": "float32 [2]", "extra.pyd": "a pickle"})
    writer.write([f"r{i}" for i in range(8)], torch.randn(8, C), torch.arange(8) % C,
                 inputs=[{"input.npy": np.full(2, i, np.float32), "extra.pyd": evil} for i in range(8)])
    writer.close()
    store = st.open_targets(path)
    assert store.read_inputs(3)["extra.pyd"] == evil and store.read_inputs(3)["input.npy"].tolist() == [3.0, 3.0]
    batch = next(iter(st.stream(path, batch_size=8, shuffle=False)))
    assert batch["extra.pyd"] == [evil] * 8 and batch["input"][:, 0].tolist() == list(range(8))
    hostile = npy_bytes(np.array([Payload(marker)], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        npy_view(np.frombuffer(hostile, np.uint8))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        npy_load(hostile)
    assert not marker.exists()


# -- the KD loss: KL by default, CE by name --------------------------------------------------------------


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
def test_kd_loss_is_zero_when_the_student_matches_the_geometric_teacher(rule):
    v = torch.randn(16, 3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    z = v.mean(1)  # the geometric ensemble's logits (for K = 1 also the arithmetic one's)
    for t in (1.0, 4.0, 20.0):
        assert kd_loss(z, v, t).item() == pytest.approx(0.0, abs=1e-12)
        assert kd_loss(z.float(), v.float(), t).item() == pytest.approx(0.0, abs=1e-5)
        assert kd_loss(z, v[:, :1], t, rule).item() != pytest.approx(0.0, abs=1e-3)  # a different target
        assert kd_loss(v[:, 0], v[:, :1], t, rule).item() == pytest.approx(0.0, abs=1e-12)
        assert kd_loss(z, v, t, form="ce").item() > 1.0  # CE adds the target's entropy, times T^2
    assert distillation_loss(z, v, torch.full((16,), -1), 4.0, 0.5).item() == pytest.approx(0.0, abs=1e-12)
    assert DistillationLoss(4.0, alpha=1.0)(z, v).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
@pytest.mark.parametrize("t", [0.5, 2.0, 10.0])
def test_kd_loss_equals_kldivloss_times_t2_and_has_the_ce_gradient(rule, t):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 40, generator=g, dtype=torch.float64) * 3
    v = torch.randn(32, 5, 40, generator=g, dtype=torch.float64) * 3
    if rule == "geometric":
        target = torch.log_softmax(v.mean(1) / t, -1)
    else:  # the arithmetic mixture of the K tempered distributions, exactly
        target = torch.log(torch.softmax(v / t, -1).mean(1))
    expected = nn.KLDivLoss(reduction="batchmean", log_target=True)(torch.log_softmax(z / t, -1), target) * t * t
    torch.testing.assert_close(kd_loss(z, v, t, rule), expected, rtol=1e-12, atol=1e-12)

    def grad(form):
        zz = z.clone().requires_grad_(True)
        kd_loss(zz, v, t, rule, form=form).backward()
        return zz.grad

    torch.testing.assert_close(grad("kl"), grad("ce"), rtol=0, atol=1e-14)
    entropy = -(target.exp() * target).sum(-1).mean() * t * t
    torch.testing.assert_close(kd_loss(z, v, t, rule, form="ce"), expected + entropy, rtol=1e-12, atol=1e-12)


def test_kd_loss_form_is_checked_and_kl_ignores_zero_probability_classes():
    z = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown loss form 'js'.*'kl'"):
        kd_loss(z, z, 1.0, form="js")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown loss form"):
        DistillationLoss(2.0, form="mse")  # type: ignore[arg-type]
    v = torch.tensor([[0.0, 0.0, -2000.0, -2000.0]] * 2, dtype=torch.float64)  # p = (1/2, 1/2, 0, 0) exactly
    zz = z.clone().requires_grad_(True)
    loss = kd_loss(zz, v, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(2.0))))  # KL((.5, .5, 0, 0) || uniform)
    assert torch.isfinite(zz.grad).all()


# -- joins check the dataset's labels against the store's ---------------------------------------------------


@pytest.fixture(scope="module", params=["zarr", "wds"])
def labelled_store(request, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("join-check"), request.param)


class Rows(Dataset):
    """The transfer set in ``order``: item ``i`` is ``(x, y)`` of sample ``order[i]`` (x carries the number)."""

    def __init__(self, order: np.ndarray, y: np.ndarray | None = None):
        self.order = order
        self.y = labels(N).numpy() if y is None else y
        self.keys = [sample_keys(N)[j] for j in order]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        j = int(self.order[i])
        return torch.tensor([float(j)]), int(self.y[j])


def expected_mismatch(rows: np.ndarray, order: np.ndarray) -> tuple[int, int, list[str]]:
    """(mismatched, compared, first keys) of joining ``Rows(order)`` by index on store ``rows``."""
    y = labels(N).numpy()
    stored, given = y[rows], y[order[rows]]
    both = (stored >= 0) & (given >= 0)
    bad = np.flatnonzero(both & (stored != given))
    return len(bad), int(both.sum()), [sample_keys(N)[r] for r in rows[bad[:3]]]


def test_with_targets_refuses_a_reversed_dataset_and_names_what_disagreed(labelled_store):
    store = st.open_targets(labelled_store)
    reverse = np.arange(N)[::-1].copy()
    joined = with_targets(Rows(reverse), store, by="index")
    rows = np.arange(40)
    with pytest.raises(JoinMismatchError) as caught:
        joined.__getitems__(rows.tolist())
    mismatched, compared, first = expected_mismatch(rows, reverse)
    assert 0 < mismatched == compared < 40  # every row labelled in both disagrees; the unlabelled are not counted
    e = caught.value
    assert (e.mismatched, e.compared, e.keys) == (mismatched, compared, first)
    assert f"{mismatched} of {compared} labelled rows" in str(e) and repr(first[0]) in str(e)
    assert "check_join=False" in str(e) and "\n" not in str(e)
    y = labels(N).numpy()
    assert y[0] < 0 <= y[N - 1]
    assert joined[0][1] == y[N - 1]  # the store does not label row 0: nothing to compare, served
    with pytest.raises(JoinMismatchError, match="1 of 1 labelled rows"):
        joined[1]
    loose = with_targets(Rows(reverse), store, by="index", check_join=False)
    x, yy, v = loose[3]
    assert int(x[0]) == N - 4 and yy == y[N - 4] and torch.equal(v, store[3]["logits"])


def test_with_targets_accepts_the_transfer_set_and_skips_unlabelled_rows(labelled_store):
    store = st.open_targets(labelled_store)
    y = labels(N).numpy()
    relabelled = y.copy()
    relabelled[y < 0] = 5  # the dataset labels rows the store holds as unlabelled: nothing to compare
    for dataset in (Rows(np.arange(N)), Rows(np.arange(N), relabelled)):
        joined = with_targets(dataset, store, by="index")
        batch = joined.__getitems__(list(range(N)))
        assert [int(x[0]) for x, _, _ in batch] == list(range(N))
    shuffled = np.random.default_rng(0).permutation(N)
    joined = with_targets(Rows(shuffled), store, by="key")  # the same samples in another order, joined by key
    assert [b[1] for b in joined.__getitems__(list(range(N)))] == y[shuffled].tolist()
    other = np.where(y >= 0, (y + 1) % C, y)  # the same keys with other labels: another dataset
    with pytest.raises(JoinMismatchError, match=r"\d+ of \d+ labelled rows read have other labels"):
        with_targets(Rows(shuffled, other), store, by="key").__getitems__(list(range(N)))
    unlabelled = [torch.zeros(2)] * N  # items without a label: nothing to check against
    assert len(with_targets(unlabelled, store, by="index").__getitems__(list(range(N)))) == N


def test_stream_refuses_a_reversed_dataset(labelled_store):
    # (In DataLoader workers the same error reaches the caller, as JoinMismatchError with this message; not run
    # here: a worker that raised takes torch's 5 s join timeout to end.)
    reverse = np.arange(N)[::-1].copy()
    ds = st.stream(labelled_store, batch_size=30, shuffle=False, dataset=Rows(reverse), by="index")
    with pytest.raises(JoinMismatchError, match=r"labelled rows read have other labels.*check_join=False"):
        list(ds.loader())
    with pytest.raises(JoinMismatchError) as caught:
        next(iter(ds))
    assert (caught.value.mismatched, caught.value.compared, caught.value.keys) == expected_mismatch(
        np.arange(30), reverse)
    ok = st.stream(labelled_store, batch_size=30, shuffle=True, seed=2, dataset=Rows(np.arange(N)), by="index")
    batches = list(ok.loader())
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(N))
    assert all(torch.equal(b["input"][:, 0].long(), b["index"]) for b in batches)
    loose = st.stream(labelled_store, batch_size=30, shuffle=False, dataset=Rows(reverse), check_join=False)
    assert next(iter(loose))["input"][:, 0].long().tolist() == list(range(N - 1, N - 31, -1))


def test_stream_checks_a_tensor_dataset_label_column(labelled_store):
    y = labels(N)
    x = torch.arange(N, dtype=torch.float32)[:, None]
    right = st.stream(labelled_store, batch_size=50, shuffle=False, dataset=TensorDataset(x, y))
    assert [b["input"][0, 0].item() for b in right] == [0.0, 50.0, 100.0]
    wrong = st.stream(labelled_store, batch_size=50, shuffle=False, dataset=TensorDataset(x.flip(0), y.flip(0)))
    with pytest.raises(JoinMismatchError, match="check_join=False"):
        next(iter(wrong))
    floats = st.stream(labelled_store, batch_size=50, shuffle=False, dataset=TensorDataset(x, y.flip(0).float()))
    assert len(list(floats)) == 3  # a float second tensor is not a label column: not compared
