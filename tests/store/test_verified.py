"""Files checked once per machine (store/verified.py): a record skips hashing an unchanged file, and any change to
the file (a flipped byte, even with its mtime put back) makes the reader check it again and refuse it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import softtargets as st
from softtargets.errors import ChecksumError
from softtargets.store import verified
from softtargets.store.verified import is_verified, record_verified
from tests.store_data import LAYOUTS, store_path, teacher_logits, write_store


def _age(root: Path, seconds: float = 60.0) -> None:
    """Set every file's times ``seconds`` into the past (records are only written for settled files)."""
    t = time.time() - seconds
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (t, t))


def _shard_paths(store: st.TargetStore) -> list[str]:
    return [store._local_path(f.path) for s in store.shards for f in s.files]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_checked_file_is_recorded_and_skipped_then_a_change_is_caught(tmp_path: Path, layout: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTTARGETS_VERIFY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "SETTLE_NS", 20_000_000)  # 20 ms instead of 2 s, slept below
    url = store_path(tmp_path, layout)
    write_store(url, teacher_logits(40, k=1).squeeze(1).float(), layout=layout, dtype="float16", shard_rows=16,
                block_rows=8, content="geometric")
    _age(url)
    time.sleep(0.05)  # utime changed the files' ctime: let it settle
    store = st.open_targets(url)
    digests = {store._local_path(f.path): f.sha256 for s in store.shards for f in s.files}
    assert not any(is_verified(p, d) for p, d in digests.items())
    first = store[:]["logits"]
    assert [p for p, d in digests.items() if not is_verified(p, d)] == []  # read whole: checked, recorded

    again = st.open_targets(url)
    assert (again[:]["logits"] == first).all()
    assert again._verified == set(range(len(again.shards)))
    if layout == "zarr":
        assert not again._unchecked  # no chunk left to check: the records stood for the files

    # Flip a byte of shard 1's logits file and put its mtime back: ctime still changes, the record lapses.
    target = _shard_paths(again)[3 if layout == "zarr" else 1]
    time.sleep(0.05)  # past the clock tick of the records (a change within it is what SETTLE_NS guards)
    st_before = os.stat(target)
    with open(target, "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0x40]))
    os.utime(target, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert not is_verified(target, digests[target])
    with pytest.raises((ChecksumError, st.StoreError)):
        st.open_targets(url)[:]


def test_a_fresh_file_is_not_recorded_and_records_can_be_turned_off(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 10)
    folder = str(tmp_path / "cache")
    assert not record_verified(str(p), "d", folder)  # changed just now: within a timestamp's granularity
    monkeypatch.setattr(verified, "SETTLE_NS", 20_000_000)
    time.sleep(0.05)
    assert record_verified(str(p), "d", folder) and is_verified(str(p), "d", folder)
    assert not is_verified(str(p), "other digest", folder)
    monkeypatch.setenv("SOFTTARGETS_VERIFY_CACHE", "off")
    assert not record_verified(str(p), "d") and not is_verified(str(p), "d")
