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


def test_zarr_chunks_read_again_by_range_are_checked_against_the_first_read(tmp_path, monkeypatch):
    """A reader that holds little fetches only the inner chunks it needs once a file was read whole and checked:
    one request per run of adjacent chunks, each chunk checked against the crc32c the checked file gave."""
    monkeypatch.setattr(ZarrStore, "remote_cache_bytes", 2048)  # a logits shard file here: 4 x 8 x 3 x 10 x 4 B
    m = _write(tmp_path, "zarr", dtype="float32")
    local = st.open_targets(store_path(tmp_path, "zarr"))
    requests = Requests()
    with serve_directory(tmp_path, requests=requests) as base:
        store = st.open_targets(f"{base}/t.zarr")
        assert torch.equal(store[0:32]["logits"], local[0:32]["logits"])
        logits = f"/t.zarr/{m.shards[0].files[0].path}"
        # Whole and checked (with its shard's keys and labels, which push it out), then its 4 chunks in one range.
        assert requests.by_path("GET")[logits] == 2
        assert torch.equal(store[32:64]["logits"], local[32:64]["logits"])  # shard 1: shard 0 is let go
        requests.clear()
        assert torch.equal(store[8:24]["logits"], local[8:24]["logits"])  # chunks 1 and 2: adjacent, one range
        assert requests.by_path("GET").get(logits) == 1
        flip_data_byte(store_path(tmp_path, "zarr") / m.shards[0].files[0].path)  # changed behind the reader
        with pytest.raises(st.ChecksumError, match="inner chunk 0 .*crc32c") as e:
            store[0:8]
        assert f"{base}/t.zarr/{m.shards[0].files[0].path}" in str(e.value)


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
