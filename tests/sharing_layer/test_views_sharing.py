"""``convert``, ``merge`` and ``subset`` of views stores: convert carries the views (parameter files cut at the new
shards), subset by sample keys keeps every view of each sample with its parameters, merge interleaves views stores
view by view; row ranges, view keys and mixed or differing views are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import softtargets as st
from softtargets.math.augment import RandomView
from softtargets.math.compact import CompactSpec
from softtargets.store.views import ViewParams, views_of

N, D, C, V = 40, 64, 10, 3
AUG = RandomView(flip=0.5, degrees=20, translate=0.1, shape=(1, 8, 8), param_dtype="float16")


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(4)
    return torch.utils.data.TensorDataset(torch.rand(N, D, generator=g), torch.arange(N) % C)


@pytest.fixture(scope="module")
def views_store(tmp_path_factory) -> str:
    torch.manual_seed(0)
    teachers = [nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)) for _ in range(2)]
    url = tmp_path_factory.mktemp("views") / "v.zarr"
    st.precompute(teachers, dataset(), url, views=V, augment=AUG, seed=5, content="per_teacher", shard_rows=32,
                  progress=False, num_workers=0)
    return str(url)


def _same_views(src: st.TargetStore, dst: st.TargetStore, rows: np.ndarray, samples: int) -> None:
    """``dst`` declares ``src``'s views over ``samples`` samples, and its row ``j`` is ``src``'s row ``rows[j]``:
    key, label, logits and parameters."""
    a, b = views_of(src.manifest), views_of(dst.manifest)
    assert b is not None and (b.count, b.seed, b.params, b.augment) == (a.count, a.seed, a.params, a.augment)
    assert b.samples == samples and len(b.files) == dst.manifest.num_shards
    assert st.verify_store(dst.url).ok
    want, got = src.take(rows), dst[:]
    assert got["key"] == want["key"] and torch.equal(got["label"], want["label"])
    assert torch.equal(got["logits"].float(), want["logits"].float())
    assert (ViewParams(dst).rows(np.arange(len(rows))) == ViewParams(src).rows(rows)).all()


def test_convert_carries_the_views_across_layouts_and_shard_sizes(views_store, tmp_path):
    src = st.open_targets(views_store)
    dst = tmp_path / "c.wds"
    st.convert_store(views_store, dst, shard_rows=48, block_rows=16, progress=False)
    out = st.open_targets(dst)
    assert [s.rows for s in out.manifest.shards] == [48, 48, 24]  # the parameter files are cut anew
    _same_views(src, out, np.arange(N * V), N)
    ds = dataset()
    epochs = []
    for url in (views_store, dst):  # an epoch of the copy is that of the source (in another order: other units)
        s = st.stream(url, batch_size=8, seed=2, dataset=ds, replay=AUG.replay)
        s.set_epoch(1)
        epochs.append({int(i): (x, lg) for b in s for i, x, lg in zip(b["sample"], b["input"], b["teacher_logits"],
                                                                      strict=True)})
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
    for i in range(N):
        assert torch.equal(epochs[0][i][0], epochs[1][i][0]) and torch.equal(epochs[0][i][1], epochs[1][i][1])


def test_convert_to_a_reduced_or_compact_content_carries_the_views(views_store, tmp_path):
    src = st.open_targets(views_store)
    st.convert_store(views_store, tmp_path / "g.zarr", content="geometric", progress=False)
    reduced = st.open_targets(tmp_path / "g.zarr")
    assert reduced.manifest.content == "geometric"
    assert (ViewParams(reduced).rows(np.arange(N * V)) == ViewParams(src).rows(np.arange(N * V))).all()
    st.convert_store(views_store, tmp_path / "t.zarr", compact=CompactSpec("topk", k=4), content="geometric",
                     progress=False)
    compact = st.open_targets(tmp_path / "t.zarr")
    assert views_of(compact.manifest).samples == N and st.verify_store(compact.url).ok
    assert (ViewParams(compact).rows(np.arange(N * V)) == ViewParams(src).rows(np.arange(N * V))).all()


def test_subset_by_sample_keys_keeps_every_view_of_each_sample(views_store, tmp_path):
    src = st.open_targets(views_store)
    picked = [17, 3, 39, 5, 30]  # any order; rows keep the source's (view-major) order
    st.subset_store(views_store, tmp_path / "s.wds", keys=[str(i) for i in picked], progress=False)
    out = st.open_targets(tmp_path / "s.wds")
    order = sorted(picked)
    rows = np.array([v * N + i for v in range(V) for i in order])
    _same_views(src, out, rows, len(picked))
    assert out.keys()[:len(picked)] == [f"{i}#0" for i in order]
    sub = torch.utils.data.TensorDataset(dataset().tensors[0][order], dataset().tensors[1][order])
    b = next(iter(st.stream(out, batch_size=len(picked), shuffle=False, dataset=sub, replay=AUG.replay)))
    assert torch.equal(b["input"], AUG.replay(sub.tensors[0][b["sample"]], ViewParams(src).take(rows[b["index"]])))


def test_subset_refuses_view_keys_and_row_ranges(views_store, tmp_path):
    with pytest.raises(ValueError, match=r"not sample keys .* not view keys like '3#1'"):
        st.subset_store(views_store, tmp_path / "a.zarr", keys=["3#1", "4"], progress=False)
    with pytest.raises(ValueError, match="subset it by sample keys"):
        st.subset_store(views_store, tmp_path / "b.zarr", row_range=(0, N), progress=False)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_merge_interleaves_views_stores_view_by_view(views_store, tmp_path):
    src = st.open_targets(views_store)
    odd, even = [str(i) for i in range(1, N, 2)], [str(i) for i in range(0, N, 2)]
    st.subset_store(views_store, tmp_path / "odd.zarr", keys=odd, shard_rows=16, progress=False)
    st.subset_store(views_store, tmp_path / "even.wds", keys=even, progress=False)
    st.merge_stores([tmp_path / "odd.zarr", tmp_path / "even.wds"], tmp_path / "m.wds", shard_rows=24,
                    progress=False)
    merged = st.open_targets(tmp_path / "m.wds")
    samples = [int(k) for k in odd + even]  # view v of the odd samples, of the even ones, then view v + 1
    rows = np.array([v * N + i for v in range(V) for i in samples])
    _same_views(src, merged, rows, N)
    assert merged.keys()[N:N + 2] == ["1#1", "3#1"]


def test_merge_refuses_a_views_store_with_a_plain_one_or_other_views(views_store, tmp_path, cli):
    plain = tmp_path / "plain.zarr"
    st.precompute([nn.Linear(D, C)], torch.utils.data.TensorDataset(torch.rand(4, D)), plain, progress=False,
                  num_workers=0)
    rc, out, err = cli("merge", views_store, plain, tmp_path / "m.zarr")
    assert rc != 0 and "cannot merge views stores with stores of one target per sample" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.zarr").exists()
    other = tmp_path / "other.zarr"
    st.precompute([nn.Linear(D, C)], torch.utils.data.TensorDataset(torch.rand(4, D)), other, views=2,
                  augment=AUG, seed=5, progress=False, num_workers=0)
    with pytest.raises(ValueError, match="views differ in count: .* has 3, .* has 2"):
        st.merge_stores([views_store, other], tmp_path / "n.zarr", progress=False)
