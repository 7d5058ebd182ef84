"""Reading local stores without copies: zarr shard files decoded by softtargets.store.zarr_shards
(uncompressed logits viewed in place), wds tar members viewed in place; what they give equals what
zarr and tarfile give; views never leak into what callers may write; reused window buffers never
overwrite a batch still held."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch
import zarr

import softtargets as st
from softtargets.streaming import stream
from tests.store_data import LAYOUTS, bits, flip_data_byte, keys, store_path, teacher_logits, write_store

N, SHARD, BLOCK = 83, 32, 8  # the last shard holds 19 rows: its last inner chunk is partial


def _owner(a: np.ndarray) -> object:
    """What finally holds an array's memory (an mmap for a view of a mapped file)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def _zarr_reference(root) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(root), mode="r")
    return {name: group[name][:] for name in ("logits", "labels", "keys")}


@pytest.mark.parametrize("compressor", ["none", "zstd"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("per_teacher", [True, False])
def test_zarr_direct_reads_equal_zarr(tmp_path, compressor, dtype, per_teacher):
    x = teacher_logits(N, seed=31)
    if not per_teacher:
        x = x.mean(dim=1)
    root = tmp_path / "t.zarr"
    write_store(root, x, layout="zarr", dtype=dtype, labels=torch.arange(N) % 7 - 1, compressor=compressor,
                shard_rows=SHARD, block_rows=BLOCK, content="per_teacher" if per_teacher else "geometric")
    ref = _zarr_reference(root)
    store = st.open_targets(root, verify="full")
    got = store[:]
    stored = got["logits"].view(torch.int16).numpy() if dtype == "bfloat16" else got["logits"].numpy()
    assert stored.tobytes() == ref["logits"].tobytes()
    assert got["label"].numpy().tolist() == ref["labels"].tolist() == [i % 7 - 1 for i in range(N)]
    assert got["key"] == [str(k) for k in ref["keys"]] == keys(N)
    # Uncompressed rows inside one inner chunk are read-only views of the mapped file; zstd ones are decoded
    # into new bytes; rows over several chunks are joined (a crc32c ends each chunk).
    block = store.read_block(2, 9, 15)
    assert isinstance(_owner(block["logits"]), mmap.mmap) == (compressor == "none")
    assert not block["logits"].flags.writeable or compressor == "zstd"
    assert block["logits"].tobytes() == ref["logits"][73:79].tobytes() and block["key"].tolist() == keys(6, 73)
    across = store.read_block(2, 3, 17)
    assert not isinstance(_owner(across["logits"]), mmap.mmap)
    assert across["logits"].tobytes() == ref["logits"][67:81].tobytes() and across["key"].tolist() == keys(14, 67)
    # What callers get is theirs to change.
    before = store[60:70]["logits"].clone()
    store[60:70]["logits"].add_(1)
    store.take([61, 62])["logits"].add_(1)
    assert torch.equal(bits(store[60:70]["logits"]), bits(before))


@pytest.mark.parametrize("array", ["logits", "keys"])
def test_zarr_damaged_shard_index_is_an_error_not_garbage(tmp_path, array):
    """With verify="none" nothing hashes the file: a damaged index must still fail, never be read as data."""
    root = tmp_path / "t.zarr"
    write_store(root, teacher_logits(N, seed=32), layout="zarr", dtype="float16", shard_rows=SHARD, block_rows=BLOCK)
    shard_file = root / array / "c" / "1" if array == "keys" else root / array / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[-10] ^= 0x40  # inside the index (the last 4 bytes are its crc32c)
    shard_file.write_bytes(bytes(data))
    store = st.open_targets(root, verify="none")
    assert store[0:32]["key"] == keys(32)  # shard 0 is intact
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        store[32:64]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_are_read_only_and_batches_are_copies(tmp_path, layout):
    root = store_path(tmp_path, layout)
    x = teacher_logits(N, seed=33)
    write_store(root, x, layout=layout, dtype="float16", shard_rows=SHARD, block_rows=BLOCK)
    store = st.open_targets(root)
    block = store.read_block(0, 0, BLOCK)
    assert not block["logits"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        block["logits"][0] = 0
    batch = next(iter(stream(store, batch_size=16, seed=1)))
    batch["teacher_logits"].zero_()  # a batch is its own memory: the store's files are untouched
    assert torch.equal(bits(st.open_targets(root, verify="full")[:]["logits"]), bits(store[:]["logits"]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_held_batches_keep_their_rows_across_window_reuse(tmp_path, layout):
    """Window buffers are reused only when no batch of theirs is alive: holding every batch of two
    epochs (many windows) must leave each batch holding exactly its rows."""
    root = store_path(tmp_path, layout)
    write_store(root, teacher_logits(N, seed=34), layout=layout, dtype="float16", shard_rows=SHARD, block_rows=BLOCK)
    store = st.open_targets(root)
    truth = store[:]["logits"]
    ds = stream(store, batch_size=8, buffer_size=16, seed=2)  # a window of two batches: many windows an epoch
    held = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        held += list(ds.loader(num_workers=0))
    assert len(held) == 2 * ds.batches_per_epoch
    for b in held:
        assert torch.equal(bits(b["teacher_logits"]), bits(truth[b["index"]]))
    # Dropping batches as they come (the usual loop) reads the same rows.
    dropped = [(b["index"].clone(), b["teacher_logits"].clone()) for b in ds.loader(num_workers=0)]
    assert all(torch.equal(bits(t), bits(truth[i])) for i, t in dropped)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stream_over_a_damaged_shard_fails_with_its_checksum(tmp_path, layout):
    """A window's shards are hashed together on threads (in the stream's read-ahead thread): a damaged one
    still stops the epoch with the file named, before any of its rows is handed out."""
    root = store_path(tmp_path, layout)
    m = write_store(root, teacher_logits(N, seed=35), layout=layout, dtype="float16", shard_rows=SHARD,
                    block_rows=BLOCK)
    flip_data_byte(root / m.shards[1].files[0].path)
    ds = stream(st.open_targets(root), batch_size=8, seed=3)  # one window holds every row
    received = []
    with pytest.raises(st.ChecksumError, match=m.shards[1].files[0].path):
        for batch in ds.loader(num_workers=0):
            received.append(batch)
    assert received == []
