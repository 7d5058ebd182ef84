"""Stage one with views: the teachers run on V augmented views of each sample; the store holds each view's targets
and parameters, and replaying the parameters rebuilds the input the teachers saw."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

import softtargets as st
from softtargets.math.augment import RandomView
from softtargets.store.views import ViewParams, params_file, split_view_key, view_generator, view_seed, views_of

N, D, C, V = 40, 64, 10, 4


def teachers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C)) for _ in range(2)]


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.rand(N, D, generator=g), torch.arange(N) % C)


AUG = RandomView(scale=(0.6, 1.0), ratio=(0.8, 1.25), flip=0.5, degrees=15, translate=0.1, shape=(1, 8, 8))


def tree_bytes(root: pathlib.Path) -> dict[str, str]:
    """Relative path -> sha256 of every data file (the manifest and card carry times; compared apart)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "README.md")}


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_replayed_views_give_the_stored_logits_for_every_view_of_a_shard(tmp_path, layout):
    ts, ds = teachers(), dataset()
    url = tmp_path / f"v.{layout}"
    m = st.precompute(ts, ds, url, views=V, augment=AUG, seed=5, layout=layout, shard_rows=32, progress=False,
                      num_workers=0)
    assert m.num_samples == N * V and m.format_version == 3
    assert m.views is not None and m.views["count"] == V and m.views["samples"] == N
    assert [p["name"] for p in m.views["params"]] == ["crop_x", "crop_y", "crop_w", "crop_h", "flip", "angle",
                                                      "tx", "ty"]
    assert {p["name"]: p["dtype"] for p in m.views["params"]}["flip"] == "uint8"
    store = st.open_targets(url)
    params = ViewParams(store)
    for shard in store.shards:  # every view of every shard
        rows = np.arange(shard.start, shard.stop)
        got = store.take(rows)
        sample, view = rows % N, rows // N
        assert [split_view_key(k) for k in got["key"]] == [(str(i), int(v)) for i, v in zip(sample, view, strict=True)]
        p = params.take(rows)
        x = AUG.replay(ds.tensors[0][sample], p)
        with torch.no_grad():
            ref = torch.stack([t(x) for t in ts], dim=1)
        ref = ref - ref.mean(-1, keepdim=True)
        torch.testing.assert_close(got["logits"].float(), ref, atol=1e-2, rtol=1e-3)  # float16 storage
        # and the view is the one augment drew from the generator seeded by (seed, key, view)
        for i, v, xr in zip(sample[:3], view[:3], x[:3], strict=True):
            x1, p1 = AUG(ds.tensors[0][i], view_generator(5, str(i), int(v)))
            assert torch.equal(x1, xr)
            assert all(float(p[k][list(sample).index(i)]) == float(p1[k]) for k in p1)
    # different views of a sample are different inputs; the same view on another call is the same
    a, _ = AUG(ds.tensors[0][0], view_generator(5, "0", 0))
    b, _ = AUG(ds.tensors[0][0], view_generator(5, "0", 1))
    assert not torch.equal(a, b)


def test_view_seed_is_a_stated_stable_hash():
    digest = hashlib.sha256(b"softtargets.view\x007\x00img/001\x003").digest()
    assert view_seed(7, "img/001", 3) == int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    assert view_seed(7, "img/001", 3) == 3936333206187100123  # a constant: the same on every machine and run


def test_params_files_are_plain_npy_listed_in_the_manifest(tmp_path):
    url = tmp_path / "v.zarr"
    st.precompute(teachers(), dataset(), url, views=2, augment=AUG, layout="zarr", shard_rows=32, progress=False,
                  num_workers=0)
    manifest = json.loads((url / "manifest.json").read_text())
    files = manifest["views"]["files"]
    assert [f["path"] for f in files] == [params_file(i) for i in range(len(manifest["shards"]))]
    arr = np.load(url / files[0]["path"], allow_pickle=False)
    assert arr.dtype.names == ("crop_x", "crop_y", "crop_w", "crop_h", "flip", "angle", "tx", "ty")
    assert arr.shape == (32,) and set(np.unique(arr["flip"])) <= {0, 1}
    assert (arr["crop_w"] > 0).all() and (arr["crop_w"] <= 1).all()
    # a flipped byte in a parameter file is refused on read
    path = url / files[1]["path"]
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(st.ChecksumError, match="params-000001.npy"):
        ViewParams(st.open_targets(url)).take([40])


class Fails:
    """RandomView that raises on view 1 of sample 30 while ``armed`` (a run that dies mid-way)."""

    def __init__(self) -> None:
        self.armed = True
        self.param_dtypes = AUG.param_dtypes

    def __call__(self, x, rng):
        out = AUG(x, rng)
        if self.armed and torch.equal(x, dataset().tensors[0][30]) and rng.initial_seed() == view_seed(0, "30", 1):
            raise RuntimeError("killed")
        return out


def test_a_run_killed_mid_way_resumes_to_the_same_bytes(tmp_path):
    whole, broken = tmp_path / "whole.wds", tmp_path / "broken.wds"
    st.precompute(teachers(), dataset(), whole, views=V, augment=AUG, shard_rows=16, progress=False,
                  num_workers=0)
    fails = Fails()
    with pytest.raises(RuntimeError, match="killed"):
        st.precompute(teachers(), dataset(), broken, views=V, augment=fails, shard_rows=16, progress=False,
                      num_workers=0)
    assert not (broken / "manifest.json").exists()
    assert len(list(broken.glob("shard-*.tar"))) == 4  # rows 0..63 done: view 1 of sample 30 is row 70
    fails.armed = False
    with pytest.raises(ValueError, match="views"):  # another number of views would give other shards
        st.precompute(teachers(), dataset(), broken, views=V + 1, augment=fails, shard_rows=16, progress=False,
                      num_workers=0, resume=True)
    m = st.precompute(teachers(), dataset(), broken, views=V, augment=fails, shard_rows=16, progress=False,
                      num_workers=0, resume=True)
    assert tree_bytes(whole) == tree_bytes(broken)
    assert views_of(m) is not None and m.views == json.loads((whole / "manifest.json").read_text())["views"] | {
        "augment": m.views["augment"]}


def test_views_need_an_augmentation_that_states_its_parameters(tmp_path):
    with pytest.raises(ValueError, match="augment=fn"):
        st.precompute(teachers(), dataset(), tmp_path / "a.zarr", views=2, progress=False)
    with pytest.raises(ValueError, match="with views=V"):
        st.precompute(teachers(), dataset(), tmp_path / "b.zarr", augment=AUG, progress=False)

    def inexact(x, rng):
        return x, {"angle": 0.1}  # 0.1 is no float32: replay would rebuild another view
    with pytest.raises(ValueError, match="not exactly a float32"):
        st.precompute(teachers(), dataset(), tmp_path / "c.zarr", views=2, augment=inexact, progress=False,
                      num_workers=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_precomputed_on_cuda_replay_to_the_stored_logits(tmp_path):
    ts, ds = teachers(), dataset()
    url = tmp_path / "cuda.zarr"
    st.precompute(ts, ds, url, views=V, augment=AUG, seed=5, shard_rows=32, progress=False, num_workers=0,
                  device="cuda")
    store = st.open_targets(url)
    rows = np.arange(N * V)
    x = AUG.replay(ds.tensors[0][rows % N], ViewParams(store).take(rows))
    with torch.no_grad():
        ref = torch.stack([t.cpu()(x) for t in ts], dim=1)
    torch.testing.assert_close(store.take(rows)["logits"].float(), ref - ref.mean(-1, keepdim=True), atol=1e-2,
                               rtol=1e-3)


def test_views_with_a_compact_content_hold_each_replayed_views_records(tmp_path):
    ts, ds = teachers(), dataset()
    spec = st.CompactSpec("topk", k=3, temperatures=(1.0, 2.0, 4.0))
    m = st.precompute(ts, ds, tmp_path / "vc.zarr", views=V, augment=AUG, seed=5, content="geometric", compact=spec,
                      shard_rows=32, progress=False, num_workers=0)
    assert m.views["count"] == V and m.compact["kind"] == "topk" and st.verify_store(tmp_path / "vc.zarr").ok
    store = st.open_targets(tmp_path / "vc.zarr")
    rows = np.arange(m.num_samples)
    x = AUG.replay(ds.tensors[0][rows % N], ViewParams(store).take(rows))
    with torch.no_grad():
        mean = torch.stack([t(x) for t in ts], 1).mean(1)
    fields = store.compact_fields(rows)
    assert torch.equal(fields["ids"], mean.topk(3, -1).indices)  # each view's own top ids
    for t in (1.0, 4.0):
        assert abs(float(st.topk_kd_loss(mean, fields, st.CompactSpec.from_dict(m.compact), t))) < 1e-4
