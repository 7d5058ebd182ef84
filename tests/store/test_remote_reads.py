"""Reading a remote store (loopback HTTP, counting requests): each object downloaded once per epoch with the
default checks, ranges merged and fetched together, values equal to a local read, corruption still found."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch

import softtargets as st
from softtargets.store.remote import RemoteFiles
from softtargets.store.zarr_layout import ZarrStore
from softtargets.store.zarr_shards import crc32c
from tests.http_server import Requests, serve_directory
from tests.store_data import LAYOUTS, bits, flip_data_byte, keys, store_path, suffix, teacher_logits, write_store

N = 200


def _epoch(store: st.TargetStore, **kw) -> list[dict]:
    return list(st.stream(store, batch_size=16, buffer_size=64, seed=3, **kw))


def _write(root, layout: str, dtype: str = "float16") -> st.Manifest:
    return write_store(store_path(root, layout), teacher_logits(N, seed=5), layout=layout, dtype=dtype,
                       labels=torch.arange(N) % 7, shard_rows=32, block_rows=8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_epoch_downloads_each_object_once_and_equals_a_local_read(tmp_path, layout):
    m = _write(tmp_path, layout)
    requests = Requests()
    with serve_directory(tmp_path, requests=requests) as base:
        remote = st.open_targets(f"{base}/t.{suffix(layout)}")  # verify="lazy": each file checked on first read
        assert remote.remote and not st.open_targets(store_path(tmp_path, layout)).remote
        requests.clear()
        got = _epoch(remote)
        want = _epoch(st.open_targets(store_path(tmp_path, layout)))
        fetched = requests.by_path("GET")
        assert requests.count("HEAD") == 0
        files = {f"/t.{suffix(layout)}/{f.path}" for s in m.shards for f in s.files}
        assert fetched == dict.fromkeys(files, 1)  # every shard file once, whole: nothing else, nothing twice
        requests.clear()
        assert [b["key"] for b in _epoch(remote)] == [b["key"] for b in got]  # a second epoch: all held
        assert requests.count("GET") == 0
    assert len(got) == len(want) == N // 16 + 1
    for a, b in zip(got, want, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(bits(a["teacher_logits"]), bits(b["teacher_logits"]))
    assert sorted(k for b in got for k in b["key"]) == keys(N)


def _chunk(path, i: int, change: bool, rehash: bool) -> None:
    """Inner chunk ``i`` of an uncompressed float32 logits shard file of 8 rows x 3 x 10 per chunk: a byte of its
    data changed (``change``) and its crc32c trailer written again to match (``rehash``)."""
    size = 8 * 3 * 10 * 4
    blob = bytearray(path.read_bytes())
    at = i * (size + 4)
    if change:
        blob[at + 5] ^= 0x40
    if rehash:
        blob[at + size:at + size + 4] = crc32c(np.frombuffer(bytes(blob[at:at + size]), np.uint8))
    path.write_bytes(bytes(blob))


def test_a_zarr_store_too_big_to_hold_is_checked_by_chunk_index_and_trailers(tmp_path, monkeypatch):
    """A reader that cannot hold the store checks each shard file by its index and crc32c trailers (the manifest's
    chunks_sha256), never fetching it whole, then fetches only the inner chunks it reads, each checked."""
    monkeypatch.setattr(ZarrStore, "remote_cache_bytes", 4096)  # the store: ~30 kB
    m = _write(tmp_path, "zarr", dtype="float32")
    local = st.open_targets(store_path(tmp_path, "zarr"))
    rel = m.shards[0].files[0].path
    requests = Requests()
    with serve_directory(tmp_path, requests=requests) as base:
        store = st.open_targets(f"{base}/t.zarr")
        got = store[8:24]
        assert torch.equal(got["logits"], local[8:24]["logits"]) and got["key"] == keys(24)[8:]
        size = m.shards[0].files[0].bytes
        asked = requests.ranges(f"/t.zarr/{rel}")
        # The index; then the four trailers, merged into one range (chunks this small lie within the 1 MiB gap),
        # which holds chunks 1-2 too: never the whole file.
        assert asked == [f"bytes={size - 68}-{size - 1}", f"bytes=960-{size - 69}"]
        assert got_epoch_equals_local(store, local)

        _chunk(store_path(tmp_path, "zarr") / rel, 0, change=True, rehash=False)  # a flipped bit: its crc32c
        with pytest.raises(st.ChecksumError, match="inner chunk 0 .*crc32c") as e:
            st.open_targets(f"{base}/t.zarr")[0:8]
        assert f"{base}/t.zarr/{rel}" in str(e.value)
        _chunk(store_path(tmp_path, "zarr") / rel, 0, change=False, rehash=True)  # and its crc32c rewritten
        with pytest.raises(st.ChecksumError, match="chunk checksums or shard index do not match the manifest"):
            st.open_targets(f"{base}/t.zarr")[20:24]  # caught before any row of the file is read


def got_epoch_equals_local(remote: st.TargetStore, local: st.TargetStore) -> bool:
    a, b = _epoch(remote), _epoch(local)
    return all(x["key"] == y["key"] and torch.equal(x["teacher_logits"], y["teacher_logits"]) for x, y in
               zip(a, b, strict=True))


def test_zarr_chunks_read_again_by_range_are_checked_against_the_first_read(tmp_path, monkeypatch):
    """A store that can be held is fetched whole, a file at a time, once checked; a file let go (here: held bytes
    too few for two) is read again by inner chunk, each checked against the crc32c kept from the checked file."""
    m = _write(tmp_path, "zarr", dtype="float32")
    local = st.open_targets(store_path(tmp_path, "zarr"))
    rel = m.shards[0].files[0].path
    requests = Requests()
    with serve_directory(tmp_path, requests=requests) as base:
        store = st.open_targets(f"{base}/t.zarr")
        assert torch.equal(store[0:32]["logits"], local[0:32]["logits"])
        assert requests.ranges(f"/t.zarr/{rel}") == [f"bytes=0-{m.shards[0].files[0].bytes - 1}"]  # whole, once
        store._remote.capacity = 3000  # now it holds less than a logits file: reads go by chunk
        assert torch.equal(store[32:64]["logits"], local[32:64]["logits"])  # shard 1: shard 0 is let go
        requests.clear()
        assert torch.equal(store[8:24]["logits"], local[8:24]["logits"])  # chunks 1 and 2: adjacent, one range
        assert requests.ranges(f"/t.zarr/{rel}") == [f"bytes={964}-{3 * 964 - 1}"]
        _chunk(store_path(tmp_path, "zarr") / rel, 0, change=True, rehash=True)  # changed behind the reader
        with pytest.raises(st.ChecksumError, match="inner chunk 0 .*crc32c") as e:
            store[0:8]
        assert f"{base}/t.zarr/{rel}" in str(e.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_corrupt_remote_object_stops_the_stream(tmp_path, layout):
    m = _write(tmp_path, layout)
    rel = m.shards[3].files[0].path
    flip_data_byte(store_path(tmp_path, layout) / rel)
    with serve_directory(tmp_path) as base:
        url = f"{base}/t.{suffix(layout)}"
        with pytest.raises(st.ChecksumError, match="sha256|crc32c") as e:
            _epoch(st.open_targets(url))
        assert f"{url}/{rel}" in str(e.value)
        assert len(_epoch(st.open_targets(url, verify="none"))) == N // 16 + 1  # unchecked: read as it is


def test_ranges_merged_per_file_and_fetched_once(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    (tmp_path / "a.bin").write_bytes(data.tobytes())
    (tmp_path / "b.bin").write_bytes(data[:1000].tobytes())
    requests = Requests()
    with serve_directory(tmp_path, requests=requests) as base:
        fs, root = fsspec.core.url_to_fs(base)
        files = RemoteFiles(fs, root.rstrip("/"), gap=1 << 20)
        wanted = [("a.bin", 0, 100), ("a.bin", 200, 300), ("a.bin", 3_000_000, 3_000_010), ("b.bin", 0, 1000)]
        got = files.get(wanted)
        assert requests.by_path("GET") == {"/a.bin": 2, "/b.bin": 1}  # 0-300 merged; 3 MB away: its own
        assert files.requests == 3
        for (rel, a, b), blob in zip(wanted, got, strict=True):
            assert blob.tobytes() == (data if rel == "a.bin" else data[:1000])[a:b].tobytes()
        assert files.get([("a.bin", 50, 250)])[0].tobytes() == data[50:250].tobytes()  # held: no request
        assert requests.count("GET") == 3
        with pytest.raises(FileNotFoundError):
            files.get([("c.bin", 0, 10)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dataloader_workers_read_a_remote_store(tmp_path, layout):
    _write(tmp_path, layout)
    with serve_directory(tmp_path) as base:
        remote = st.open_targets(f"{base}/t.{suffix(layout)}")
        remote[0:8]  # the parent has used its filesystem before the workers fork
        stream = st.stream(remote, batch_size=16, buffer_size=64, seed=3)
        got = list(stream.loader(num_workers=2))
    assert sorted(k for b in got for k in b["key"]) == keys(N)
