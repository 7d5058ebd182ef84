"""The files a store keeps at fixed paths beside its rows: ``verify`` checks a sequence store's ``sequences/*.npy``
(sizes, sha256, offsets that cut the rows) and a hidden store's output head ``head/*.npy``; ``convert`` carries a
sequence store's files, ``merge`` and ``subset`` refuse sequence stores."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import softtargets as st
from softtargets.precompute.sequences import precompute_sequences


def flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture
def lm_store(tmp_path):
    torch.manual_seed(0)
    seqs = [(f"s{i}", np.arange(i + 2) % 30) for i in range(5)]
    precompute_sequences([nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30))], seqs, tmp_path / "lm.zarr",
                         vocab_size=30)
    return tmp_path / "lm.zarr"


@pytest.mark.parametrize("name", ["tokens", "offsets", "keys"])
def test_a_changed_sequence_file_is_reported(lm_store, name):
    assert st.verify_store(lm_store).ok
    flip(lm_store / "sequences" / f"{name}.npy")
    report = st.verify_store(lm_store)
    assert not report.ok and report.bad_files == [str(lm_store / "sequences" / f"{name}.npy")]
    assert "sha256 does not match" in str(report)


def test_a_missing_sequence_file_and_offsets_that_do_not_cut_the_rows(lm_store):
    (lm_store / "sequences" / "keys.npy").unlink()
    assert "keys.npy" in str(st.verify_store(lm_store)) and not st.verify_store(lm_store).ok
    lm = lm_store.parent / "lm2.zarr"
    seqs = [(f"s{i}", np.arange(i + 2) % 30) for i in range(5)]
    precompute_sequences([nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 30))], seqs, lm, vocab_size=30)
    buf = io.BytesIO()  # offsets rewritten (and re-recorded): the file matches the manifest, its contents do not
    np.save(buf, np.array([0, 2, 5, 9, 14, 19], dtype=np.int64))
    (lm / "sequences" / "offsets.npy").write_bytes(buf.getvalue())
    m = json.loads((lm / "manifest.json").read_text())
    rec = next(f for f in m["sequences"]["files"] if f["path"] == "sequences/offsets.npy")
    rec.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    (lm / "manifest.json").write_text(json.dumps(m))
    report = st.verify_store(lm)
    assert not report.ok and "offsets do not cut the store's 20 rows into 5 non-empty sequences" in str(report)


def test_a_changed_output_head_is_reported(tmp_path):
    torch.manual_seed(0)
    teachers = [nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 12))]
    ds = TensorDataset(torch.randn(20, 4), torch.zeros(20, dtype=torch.long))
    url = tmp_path / "h.zarr"
    st.precompute(teachers, ds, url, content="geometric", compact=st.CompactSpec("hidden", head="2"), progress=False,
                  num_workers=0)
    assert st.verify_store(url).ok
    flip(url / "head" / "bias.npy")
    report = st.verify_store(url)
    assert not report.ok and report.bad_files == [str(url / "head" / "bias.npy")]


@pytest.mark.parametrize("kw", [{"layout": "wds"}, {"dtype": "float32"},
                                {"compact": st.CompactSpec("topk", k=4, temperatures=(1.0, 2.0))}])
def test_convert_keeps_a_sequence_store_whole_and_merge_subset_refuse_it(lm_store, kw):
    dst = lm_store.parent / ("out.wds" if kw.get("layout") == "wds" else "out.zarr")
    st.convert_store(lm_store, dst, **kw)
    src, out = st.open_sequences(lm_store), st.open_sequences(dst)
    assert out.keys() == src.keys() and np.array_equal(out.offsets, src.offsets)
    for i in range(len(src)):
        assert torch.equal(out[i]["input_ids"], src[i]["input_ids"]) and torch.equal(out[i]["label"], src[i]["label"])
    assert st.verify_store(dst).ok
    with pytest.raises(ValueError, match="is a sequence store"):
        st.subset_store(lm_store, lm_store.parent / "sub.zarr", keys=["s0/0"])
    with pytest.raises(ValueError, match="merge does not take sequence stores"):
        st.merge_stores([lm_store, dst], lm_store.parent / "m.zarr")
