"""Stores are plain formats: plain ``zarr.open_group`` and plain ``webdataset.WebDataset`` read
the same logits, labels and keys that softtargets reads (bfloat16 as uint16 bits)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr

import softtargets as st
from softtargets.store.wds_layout import npy_bytes
from tests.store_data import DTYPES, TORCH_DTYPE, bits, keys, store_path, teacher_logits, write_store

N = 40


def _as_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _expected(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)).to(TORCH_DTYPE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_zarr_reads_the_store(tmp_path, dtype):
    x = teacher_logits(N)
    labels = torch.arange(N) % 7
    root = store_path(tmp_path, "zarr")
    write_store(root, x, layout="zarr", dtype=dtype, labels=labels, shard_rows=16, block_rows=8)
    g = zarr.open_group(str(root), mode="r")
    assert g.attrs["softtargets"]["dtype"] == dtype
    raw = g["logits"][:]
    assert raw.dtype == (np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
    plain = _as_torch(raw, dtype)
    ours = st.open_targets(root)[:]
    assert torch.equal(bits(plain), bits(ours["logits"]))
    assert torch.equal(bits(plain), bits(_expected(x, dtype)))
    assert g["labels"][:].tolist() == labels.tolist() == ours["label"].tolist()
    assert g["keys"][:].tolist() == keys(N) == ours["key"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_webdataset_reads_block_shards(tmp_path, dtype):
    x = teacher_logits(N)
    labels = torch.arange(N) % 7
    root = store_path(tmp_path, "wds")
    write_store(root, x, layout="wds", dtype=dtype, labels=labels, shard_rows=16, block_rows=8)
    store = st.open_targets(root)
    urls = store.shard_urls
    assert len(urls) == 3
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == N // 8  # one tar sample per block of 8 rows
    plain = _as_torch(np.concatenate([s["logits.npy"] for s in samples]), dtype)
    assert torch.equal(bits(plain), bits(store[:]["logits"]))
    assert torch.equal(bits(plain), bits(_expected(x, dtype)))
    assert np.concatenate([s["labels.npy"] for s in samples]).tolist() == labels.tolist()
    assert np.concatenate([s["keys.npy"] for s in samples]).tolist() == keys(N)
    assert np.concatenate([s["index.npy"] for s in samples]).tolist() == list(range(N))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_plain_webdataset_reads_sample_shards(tmp_path, dtype):
    x = teacher_logits(N)
    labels = torch.arange(N) % 7
    root = store_path(tmp_path, "wds")
    write_store(root, x, layout="wds", dtype=dtype, labels=labels, shard_rows=16, block_rows=None,
                sample_layout="sample")
    store = st.open_targets(root)
    samples = list(wds.WebDataset(store.shard_urls, shardshuffle=False).decode())
    assert len(samples) == N
    plain = _as_torch(np.stack([s["logits.npy"] for s in samples]), dtype)
    assert plain.shape == (N, 3, 10)
    assert torch.equal(bits(plain), bits(store[:]["logits"]))
    assert torch.equal(bits(plain), bits(_expected(x, dtype)))
    assert [s["label.cls"] for s in samples] == labels.tolist()
    assert [s["key.txt"] for s in samples] == keys(N)
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in range(N)]


@pytest.mark.parametrize("arr", [
    np.arange(24, dtype=np.float16).reshape(2, 3, 4), np.arange(5), np.array(["k-1", "clé"]),
    np.zeros((0, 3), np.float32), np.arange(12, dtype=np.uint16).reshape(3, 4)[:, ::2],
], ids=["float16", "int64", "unicode", "empty", "strided"])
def test_npy_members_are_the_bytes_numpy_saves(arr):
    saved = io.BytesIO()
    np.save(saved, arr, allow_pickle=False)
    assert npy_bytes(arr) == saved.getvalue()
    with pytest.raises(ValueError, match="object arrays"):
        npy_bytes(np.array([{"a": 1}], dtype=object))
