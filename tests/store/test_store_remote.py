"""Stores behind URLs: ``http://`` (a loopback server honouring Range), ``memory://``, ``file://``."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
import torch

import softtargets as st
from tests.http_server import serve_directory
from tests.store_data import LAYOUTS, bits, flip_data_byte, keys, store_path, suffix, teacher_logits, write_store

N = 40


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Both layouts written locally, served over loopback HTTP: ``(base_url, root, local stores)``."""
    root = tmp_path_factory.mktemp("served")
    x = teacher_logits(N, seed=11)
    for layout in LAYOUTS:
        write_store(store_path(root, layout), x, layout=layout, dtype="float16", labels=torch.arange(N) % 10,
                    shard_rows=16, block_rows=8)
    with serve_directory(root) as base:
        yield base, root, {layout: st.open_targets(store_path(root, layout), verify="full") for layout in LAYOUTS}


def _assert_same(remote: st.TargetStore, local: st.TargetStore) -> None:
    a, b = remote[:], local[:]
    assert torch.equal(bits(a["logits"]), bits(b["logits"]))
    assert a["key"] == b["key"] == keys(N)
    assert torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_http_reads_equal_local(served, layout, verify):
    base, _, local = served
    url = f"{base}/t.{suffix(layout)}"
    remote = st.open_targets(url, verify=verify)
    assert remote.manifest.to_dict() == local[layout].manifest.to_dict()
    _assert_same(remote, local[layout])
    got = remote.take([39, 0, 17, 17, -1])
    assert got["index"].tolist() == [39, 0, 17, 17, 39]
    assert torch.equal(bits(got["logits"]), bits(local[layout].take([39, 0, 17, 17, 39])["logits"]))
    assert remote["sample-00021"]["index"] == 21
    np.testing.assert_array_equal(remote.probs([3, 30], 4.0).numpy(), local[layout].probs([3, 30], 4.0).numpy())


def test_http_wds_shard_urls_point_at_the_server(served):
    base, _, _ = served
    remote = st.open_targets(f"{base}/t.wds")
    assert remote.shard_urls == [f"{base}/t.wds/shard-{i:06d}.tar" for i in range(3)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_http_lazy_finds_a_missing_shard_on_first_read(tmp_path, layout):
    """Over HTTP nothing can be listed at open: a lazily checked store fails when it reaches the shard."""
    root = store_path(tmp_path, layout)
    m = write_store(root, teacher_logits(N), layout=layout, dtype="float16", shard_rows=16, block_rows=8)
    rel = m.shards[1].files[0].path
    (root / rel).unlink()
    with serve_directory(tmp_path) as base:
        url = f"{base}/t.{suffix(layout)}"
        with pytest.raises(st.StoreError, match="missing") as e:
            st.open_targets(url, verify="full")
        assert f"{url}/{rel}" in str(e.value)
        store = st.open_targets(url, verify="lazy")
        assert store[0:16]["key"] == keys(16)
        with pytest.raises(st.StoreError, match="missing") as e:
            store[20]
        assert f"{url}/{rel}" in str(e.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_http_lazy_finds_a_corrupt_shard_on_first_read(tmp_path, layout):
    root = store_path(tmp_path, layout)
    m = write_store(root, teacher_logits(N), layout=layout, dtype="float32", shard_rows=16, block_rows=8)
    rel = m.shards[2].files[0].path
    flip_data_byte(root / rel)
    with serve_directory(tmp_path) as base:
        url = f"{base}/t.{suffix(layout)}"
        store = st.open_targets(url, verify="lazy")
        assert len(store[0:32]["key"]) == 32
        with pytest.raises(st.ChecksumError, match="sha256|crc32c") as e:  # wds: sha256; zarr: the chunk's crc32c
            store[35]
        assert f"{url}/{rel}" in str(e.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_url_write_and_read(layout):
    url = f"memory://softtargets-test-{uuid.uuid4().hex}/t.{suffix(layout)}"
    x = teacher_logits(N, seed=12)
    fs = fsspec.filesystem("memory")
    try:
        m = write_store(url, x, layout=layout, dtype="bfloat16", batches=[5, 30, 5], shard_rows=16, block_rows=8)
        assert m.num_samples == N and len(m.shards) == 3
        store = st.open_targets(url, verify="full")
        got = store[:]
        want = (x - x.mean(dim=-1, keepdim=True)).to(torch.bfloat16)
        assert torch.equal(bits(got["logits"]), bits(want)) and got["key"] == keys(N)
        rel = m.shards[1].files[0].path
        fs.rm(f"{url}/{rel}")
        with pytest.raises(st.StoreError, match="missing") as e:
            st.open_targets(url)  # the memory filesystem lists: sizes are checked at open
        assert f"{url}/{rel}" in str(e.value)
    finally:
        fs.rm(url.split("/t.")[0], recursive=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_file_url_reads_a_local_store(tmp_path, layout):
    root = store_path(tmp_path, layout)
    x = teacher_logits(N, seed=13)
    write_store(root, x, layout=layout, dtype="float32", shard_rows=16, block_rows=8)
    store = st.open_targets(f"file://{root}", verify="full")
    _assert_same(store, st.open_targets(root))
    written = store_path(tmp_path, layout, "via-url")
    write_store(f"file://{written}", x, layout=layout, dtype="float32", shard_rows=16, block_rows=8)
    _assert_same(st.open_targets(written), store)
