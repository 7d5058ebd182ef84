"""Stage one with specialists and hints: arrays beside the logits, their manifest records, plain zarr and plain
webdataset reading them, verify and the lazy reader catching damage, bad specs refused, stage two yielding them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from torch import nn

import softtargets as st
from softtargets.math.specialists import active_specialists, combine_specialists, dustbin_corrected, membership
from tests.sharing import flip_byte

N, D_IN, C = 100, 8, 6
SUBSETS = [[1, 4], [2, 3, 5]]


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(N, D_IN, generator=g), torch.randint(0, C, (N,), generator=g))


def _net(out: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 12), nn.ReLU(), nn.Linear(12, out)).eval()


def _make(tmp_path: Path, layout: str, **kw: object) -> tuple[Path, nn.Module, list[nn.Module]]:
    gen = _net(C, 0)
    specs = [_net(len(s) + 1, 10 + i) for i, s in enumerate(SUBSETS)]
    out = tmp_path / f"t.{'zarr' if layout == 'zarr' else 'wds'}"
    st.precompute(
        [{"name": "gen", "module": gen},
         {"name": "s0", "module": specs[0], "classes": SUBSETS[0], "oversample": 3.0},
         {"name": "s1", "module": specs[1], "classes": SUBSETS[1]}],
        _data(), out, layout=layout, shard_rows=32, block_rows=8, batch_size=20, num_workers=0, progress=False,
        hints={"mid": "gen:1"}, specialist_top=2, **kw)
    return out, gen, specs


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_specialists_and_hints_are_stored_beside_the_logits(tmp_path: Path, layout: str) -> None:
    out, gen, specs = _make(tmp_path, layout)
    store = st.open_targets(out)
    m = store.manifest
    assert m.format_version == 3 and m.num_teachers == 1 and m.logits_shape == (N, 1, C)
    x = _data().tensors[0]
    # hints: the ReLU's output, float16 [N, 12]
    hint = st.read_array(store, "hint/mid")
    assert hint.dtype == np.float16 and hint.shape == (N, 12)
    with torch.no_grad():
        want_hint = gen[1](gen[0](x)).numpy()
        g_logits = gen(x)
    assert np.allclose(hint.astype(np.float32), want_hint, atol=2e-3, rtol=1e-3)
    assert m.hints == {"mid": {**m.hints["mid"], "teacher": "gen", "module": "1", "array": "hint/mid",
                               "shape": [N, 12], "dtype": "float16"}}
    # specialists: own widths, the class maps and the dustbin correction recorded; logits corrected
    recs = {r["name"]: r for r in m.specialists["teachers"]}
    assert recs["s0"]["classes"] == [1, 4] and recs["s0"]["oversample"] == 3.0 and recs["s1"]["oversample"] is None
    s0 = st.read_array(store, "specialist/s0")
    with torch.no_grad():
        raw0, raw1 = specs[0](x), specs[1](x)
    assert s0.shape == (N, 3) and np.allclose(s0, dustbin_corrected(raw0, 3.0).numpy(), atol=1e-5)
    assert np.allclose(st.read_array(store, "specialist/s1"), raw1.numpy(), atol=1e-5)
    # eq. 5's q: recomputed here from the generalist and the specialists, independently of the store
    pg = torch.softmax(store.take(np.arange(N))["logits"].float().double()[:, 0], -1)
    member = membership(SUBSETS, C)
    active = active_specialists(pg, member, 2)
    probs = [torch.softmax(dustbin_corrected(raw0, 3.0).double(), -1), torch.softmax(raw1.double(), -1)]
    ref = combine_specialists(pg, probs, member, active, tol=1e-9)
    log_q = st.read_array(store, "combined")
    assert log_q.shape == (N, C)
    assert np.allclose(np.exp(log_q).sum(1), 1, atol=1e-5)
    assert np.allclose(log_q, ref.log_q.numpy(), atol=2e-3)
    assert m.specialists["combined"]["max_residual"] < m.specialists["combined"]["tol"]
    assert m.specialists["top"] == 2 and bool(active.any()) and not bool(active.all())
    del g_logits
    assert st.verify_store(out).ok


def test_class_maps_round_trip_through_the_manifest(tmp_path: Path) -> None:
    out, _, _ = _make(tmp_path, "zarr")
    text = (out / "manifest.json").read_text()
    d = json.loads(text)
    m = st.Manifest.from_json(text)
    assert [t["classes"] for t in m.specialists["teachers"]] == SUBSETS
    assert m.to_dict()["specialists"] == d["specialists"] and m.to_dict()["hints"] == d["hints"]
    assert st.Manifest.from_dict(m.to_dict()).to_json() == m.to_json()


def test_a_store_without_the_features_has_no_new_fields(tmp_path: Path) -> None:
    out = tmp_path / "plain.zarr"
    st.precompute([_net(C, 0)], _data(), out, shard_rows=32, block_rows=8, num_workers=0, progress=False)
    d = json.loads((out / "manifest.json").read_text())
    assert "hints" not in d and "specialists" not in d and d["format_version"] == 3


def test_arrays_read_with_plain_zarr_and_plain_webdataset(tmp_path: Path) -> None:
    z, _, _ = _make(tmp_path / "z", "zarr")
    w, _, _ = _make(tmp_path / "w", "wds")
    want = st.read_array(z, "hint/mid")
    g = zarr.open_group(str(z), mode="r")
    assert np.array_equal(g["hint/mid"][:], want)
    assert np.array_equal(g["combined"][:], st.read_array(z, "combined"))
    rows, index = [], []
    for sample in wds.WebDataset(str(w / "hint-mid-{000000..000003}.tar"), shardshuffle=False):
        rows.append(np.load(io.BytesIO(sample["hint.npy"]), allow_pickle=False))
        index.append(np.load(io.BytesIO(sample["index.npy"]), allow_pickle=False))
    assert np.array_equal(np.concatenate(index), np.arange(N))
    assert np.array_equal(np.concatenate(rows), st.read_array(w, "hint/mid"))
    assert np.array_equal(np.concatenate(rows), want)


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_a_damaged_array_file_is_named_by_verify_and_refused_on_read(tmp_path: Path, layout: str) -> None:
    out, _, _ = _make(tmp_path, layout)
    rel = st.open_targets(out).manifest.hints["mid"]["files"][1]["path"]
    flip_byte(out / rel, 40)
    report = st.verify_store(out)
    assert not report.ok and any(rel in p for p in report.bad_files)
    with pytest.raises(st.ChecksumError, match="hint/mid"):
        st.read_array(out, "hint/mid", [40])
    assert st.read_array(out, "hint/mid", [3]).shape == (1, 12)  # other shards still read
    with pytest.raises(KeyError, match="no array 'hint/nope'"):
        st.read_array(out, "hint/nope")


def test_bad_specialist_specs_are_refused(tmp_path: Path) -> None:
    gen = {"name": "gen", "module": _net(C, 0)}
    kw = {"num_workers": 0, "progress": False, "shard_rows": 32, "block_rows": 8}
    with pytest.raises(ValueError, match=r"specialist 's0': unknown class 6; class ids lie in \[0, 6\)"):
        st.precompute([gen, {"name": "s0", "module": _net(3, 1), "classes": [1, 6]}], _data(), tmp_path / "a.zarr",
                      **kw)
    with pytest.raises(ValueError, match=r"specialist 's0' has 4 outputs; its 2 classes need 3 "):
        st.precompute([gen, {"name": "s0", "module": _net(4, 1), "classes": [1, 2]}], _data(), tmp_path / "b.zarr",
                      **kw)
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        st.precompute([gen, {"name": "s0", "module": _net(3, 1), "classes": ["cat", "dog"]}], _data(),
                      tmp_path / "c.zarr", class_names=[f"c{i}" for i in range(C)], **kw)
    with pytest.raises(ValueError, match="oversample must be a number > 0"):
        st.precompute([gen, {"name": "s0", "module": _net(3, 1), "classes": [0, 1], "oversample": -2}], _data(),
                      tmp_path / "d.zarr", **kw)
    with pytest.raises(ValueError, match="no module 'body' in Sequential"):
        st.precompute([gen], _data(), tmp_path / "e.zarr", hints=["gen:body"], **kw)


def test_stream_yields_the_arrays_with_each_batch(tmp_path: Path) -> None:
    out, _, _ = _make(tmp_path, "zarr")
    ds = st.stream(out, batch_size=16, seed=1, arrays=["hint/mid", "combined"])
    hint, log_q = st.read_array(out, "hint/mid"), st.read_array(out, "combined")
    seen = 0
    for batch in ds.loader(num_workers=2):
        idx = batch["index"].numpy()
        assert batch["hint/mid"].dtype == torch.float16
        assert np.array_equal(batch["hint/mid"].numpy(), hint[idx])
        assert np.array_equal(batch["combined"].numpy(), log_q[idx])
        seen += len(idx)
    assert seen >= N
    with pytest.raises(KeyError, match="no array 'hint/x'"):
        st.stream(out, batch_size=16, arrays=["hint/x"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_specialists_and_hints_on_the_device_match_the_cpu(tmp_path: Path) -> None:
    cpu, _, _ = _make(tmp_path / "cpu", "zarr", device="cpu")
    gpu, gen, specs = _make(tmp_path / "gpu", "zarr", device="cuda")
    assert next(gen.parameters()).device.type == "cpu"  # the caller's modules are put back
    assert next(specs[0].parameters()).device.type == "cpu"
    for name in ("hint/mid", "specialist/s0", "specialist/s1", "combined"):
        a, b = st.read_array(cpu, name).astype(np.float32), st.read_array(gpu, name).astype(np.float32)
        assert np.allclose(a, b, atol=2e-3), name
    assert st.open_targets(gpu).manifest.specialists["combined"]["max_residual"] < 1e-6
