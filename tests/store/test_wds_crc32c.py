"""wds shard files record their crc32c: lazy readers check it instead of the sha256; ``full`` and
``softtargets verify`` check both; stores without it are still checked by sha256."""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c
import pytest

import softtargets as st
from tests.store_data import teacher_logits, write_store

N = 96


def _store(tmp_path: Path, streamed: bool) -> Path:
    root = tmp_path / "t.wds"
    kw = {"num_samples": N} if streamed else {}  # a known size: each tar is written as its rows come
    write_store(root, teacher_logits(N), layout="wds", shard_rows=32, block_rows=8, **kw)
    return root


def _edit(root: Path, shard: int, **fields: str | None) -> None:
    """Rewrite shard ``shard``'s file record in the manifest (None: remove the field)."""
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    f = m["shards"][shard]["files"][0]
    for k, v in fields.items():
        if v is None:
            f.pop(k, None)
        else:
            f[k] = v
    path.write_text(json.dumps(m))


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _refused_by_full_and_verify(root: Path, rel: str, why: str) -> None:
    """``verify="full"`` refuses the store naming ``rel`` and ``why``; ``softtargets verify`` finds that one problem."""
    with pytest.raises(st.ChecksumError, match=f"{rel}: {why}"):
        st.open_targets(root, verify="full")
    report = st.verify_store(root)
    assert [p.path for p in report.problems] == [f"{root}/{rel}"]
    assert why in report.problems[0].message


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_each_tar_records_the_crc32c_of_its_bytes(tmp_path, streamed):
    root = _store(tmp_path, streamed)
    m = st.open_targets(root).manifest
    assert len(m.shards) == 3
    for shard in m.shards:
        (f,) = shard.files
        data = (root / f.path).read_bytes()
        assert f.crc32c == f"{google_crc32c.value(data):08x}"
        assert len(data) == f.bytes


def test_lazy_checks_the_crc32c_not_the_sha256(tmp_path):
    root = _store(tmp_path, streamed=True)
    _edit(root, 1, sha256="0" * 64)  # a wrong sha256, the right crc32c
    store = st.open_targets(root, verify="lazy")
    assert store[40]["key"] == "sample-00040"  # lazy: crc32c only
    _refused_by_full_and_verify(root, "shard-000001.tar", "sha256 does not match")


def test_a_wrong_crc32c_is_refused_by_every_check(tmp_path):
    root = _store(tmp_path, streamed=False)
    _edit(root, 2, crc32c="00000000")  # the file matches its sha256, not the recorded crc32c
    store = st.open_targets(root, verify="lazy")
    assert store[0]["key"] == "sample-00000"  # shard 0 is untouched
    with pytest.raises(st.ChecksumError, match="shard-000002.tar: crc32c does not match") as e:
        store[70]
    assert e.value.expected == "00000000"
    _refused_by_full_and_verify(root, "shard-000002.tar", "crc32c does not match")


def test_a_flipped_byte_is_caught_by_the_crc32c(tmp_path):
    root = _store(tmp_path, streamed=True)
    m = st.open_targets(root).manifest
    _flip(root / m.shards[1].files[0].path, at=m.shards[1].files[0].bytes // 2)
    store = st.open_targets(root, verify="lazy")
    with pytest.raises(st.ChecksumError, match="shard-000001.tar: crc32c does not match"):
        store.rows(32, 64)
    assert not st.verify_store(root).ok


def test_a_store_without_crc32c_is_checked_by_sha256(tmp_path):
    root = _store(tmp_path, streamed=False)
    m = st.open_targets(root).manifest
    for shard in range(3):
        _edit(root, shard, crc32c=None)  # as stores written before files recorded it
    _flip(root / m.shards[0].files[0].path, at=m.shards[0].files[0].bytes // 2)
    store = st.open_targets(root, verify="lazy")
    assert store.manifest.shards[0].files[0].crc32c is None
    assert store[40]["key"] == "sample-00040"
    with pytest.raises(st.ChecksumError, match="shard-000000.tar: sha256 does not match"):
        store[3]
