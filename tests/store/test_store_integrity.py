"""Integrity of stores on disk: no pickle anywhere; refusal of missing, invalid or corrupt
manifests and shards, with the offending file named; ``verify="lazy"`` vs ``"full"``."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import softtargets as st
from softtargets.store.manifest import schema
from tests.store_data import LAYOUTS, bits, flip_data_byte, store_path, teacher_logits, write_store

N = 40  # shard_rows 16 -> shards of 16, 16, 8
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pyd", ".pth", ".pt", ".joblib")


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- no pickle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_zarr_store_holds_no_pickle(tmp_path, dtype):
    root = store_path(tmp_path, "zarr")
    write_store(root, teacher_logits(N), layout="zarr", dtype=dtype, shard_rows=16, block_rows=8)
    files = _all_files(root)
    assert {p.name for p in files} >= {"manifest.json", "README.md", "zarr.json"}
    for p in files:
        assert not p.name.endswith(PICKLE_SUFFIXES), p
        if p.name.endswith(".json"):
            text = p.read_text()
            json.loads(text)
            assert "pickle" not in text.lower(), p  # no pickle codec on any array (keys use vlen-utf8)


@pytest.mark.parametrize("sample_layout", ["block", "sample"])
def test_wds_store_holds_no_pickle_and_every_npy_loads_without_it(tmp_path, sample_layout):
    root = store_path(tmp_path, "wds")
    x = teacher_logits(N)
    inputs = {"input.npy": "the image, uint8 [4, 4]", "meta.txt": "its source"} if sample_layout == "sample" else None
    w = st.create_targets(root, num_classes=10, num_teachers=3, layout="wds", sample_layout=sample_layout,
                          inputs=inputs, shard_rows=16, block_rows=8 if sample_layout == "block" else None)
    packed = [{"input.npy": np.full((4, 4), i, np.uint8), "meta.txt": f"row {i}"} for i in range(N)]
    w.write([f"k{i}" for i in range(N)], x, inputs=packed if inputs else None)
    w.close()
    npy = 0
    for p in _all_files(root):
        assert p.suffix in (".tar", ".json", ".md"), p
        if p.suffix != ".tar":
            continue
        with tarfile.open(p) as tar:
            for info in tar:
                assert not info.name.endswith(PICKLE_SUFFIXES), (p, info.name)
                assert info.isfile() and info.mtime == 0 and not info.pax_headers, (p, info.name)
                if info.name.endswith(".npy"):
                    arr = np.load(io.BytesIO(tar.extractfile(info).read()), allow_pickle=False)
                    assert arr.dtype.kind in "fiuU", (info.name, arr.dtype)
                    npy += 1
    assert npy == (N // 8 * 4 if sample_layout == "block" else N * 2)  # block: 4 arrays per 8-row block
    if sample_layout == "sample":
        store = st.open_targets(root)
        got = store.read_inputs(21)
        assert got["meta.txt"] == b"row 21" and np.array_equal(got["input.npy"], np.full((4, 4), 21, np.uint8))


def test_wds_shards_are_reproducible_bytes(tmp_path):
    x = teacher_logits(N)
    a = write_store(tmp_path / "a.wds", x, layout="wds", shard_rows=16, block_rows=8)
    b = write_store(tmp_path / "b.wds", x, layout="wds", shard_rows=16, block_rows=8)
    assert [f.sha256 for s in a.shards for f in s.files] == [f.sha256 for s in b.shards for f in s.files]


# -- refusals -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=LAYOUTS)
def pristine(request, tmp_path_factory) -> tuple[Path, str]:
    """A good store of 3 shards; tests corrupt copies of it."""
    layout = request.param
    root = store_path(tmp_path_factory.mktemp(f"pristine-{layout}"), layout)
    write_store(root, teacher_logits(N), layout=layout, dtype="float16", shard_rows=16, block_rows=8)
    return root, layout


@pytest.fixture
def damaged(pristine, tmp_path) -> tuple[Path, st.Manifest]:
    root, layout = pristine
    copy = store_path(tmp_path, layout)
    shutil.copytree(root, copy)
    return copy, st.open_targets(copy, verify="none").manifest


def _shard_file(root: Path, m: st.Manifest, shard: int) -> tuple[Path, str]:
    rel = m.shards[shard].files[0].path  # wds: the tar; zarr: the logits shard
    return root / rel, f"{root}/{rel}"


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_missing_manifest(damaged, verify):
    root, _ = damaged
    (root / "manifest.json").unlink()
    with pytest.raises(st.ManifestError, match="missing") as e:
        st.open_targets(root, verify=verify)
    assert f"{root}/manifest.json" in str(e.value)


def test_manifest_schema_is_a_valid_json_schema():
    """Readers do not check the schema itself (50 ms a process); this does."""
    jsonschema.validators.validator_for(schema()).check_schema(schema())


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m.update(num_classes="ten"), r"schema-invalid at num_classes"),
        (lambda m: m.pop("shards"), r"schema-invalid.*'shards' is a required property"),
        (lambda m: m.update(dtype="float8"), r"schema-invalid at dtype"),
        (lambda m: m.update(format_version=4), r"unknown format_version 4"),
        (lambda m: m.pop("format_version"), r"unknown format_version None"),
    ],
    ids=["wrong-type", "missing-field", "bad-enum", "future-version", "no-version"],
)
def test_invalid_manifest(damaged, edit, words):
    root, _ = damaged
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(st.ManifestError, match=words) as e:
        st.open_targets(root, verify="none")
    assert f"{root}/manifest.json" in str(e.value)


def test_manifest_that_is_not_json(damaged):
    root, _ = damaged
    (root / "manifest.json").write_text('{"format_version": 1, ')
    with pytest.raises(st.ManifestError, match="not valid JSON") as e:
        st.open_targets(root)
    assert f"{root}/manifest.json" in str(e.value)


def test_checksum_mismatch_lazy_fails_on_first_read_of_that_shard(damaged):
    root, m = damaged
    path, where = _shard_file(root, m, 1)
    flip_data_byte(path)
    store = st.open_targets(root, verify="lazy")  # sizes match: opening succeeds
    assert len(store[0:16]["key"]) == 16  # shard 0 is intact and readable
    assert store[39]["key"] == "sample-00039"  # so is shard 2
    why = "inner chunk 0 .* does not match its crc32c" if m.layout == "zarr" else "crc32c does not match"
    for read in (lambda: store[20], lambda: store.rows(16, 32), lambda: store.probs([17], 2.0)):
        with pytest.raises(st.ChecksumError, match=why) as e:
            read()
        assert where in str(e.value)


@pytest.fixture
def zarr_damaged(tmp_path) -> tuple[Path, st.Manifest]:
    """A zarr store of 3 shards (16 rows, inner chunks of 8), for tests that corrupt it."""
    root = tmp_path / "t.zarr"
    return root, write_store(root, teacher_logits(N), layout="zarr", dtype="float16", shard_rows=16, block_rows=8)


def test_zarr_lazy_checks_the_chunks_it_reads(zarr_damaged):
    """Format 2, lazily: a flipped byte in inner chunk 1 of shard 1 (rows 24-31) fails the reads of those rows
    only; each file's chunk checksums and index are matched against the manifest before any of its rows."""
    root, m = zarr_damaged
    path, where = _shard_file(root, m, 1)
    assert m.shards[1].files[0].chunks_sha256 is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 10] ^= 0x40  # inner chunk 1 of 2 (the index is 36 bytes)
    path.write_bytes(bytes(data))
    store = st.open_targets(root)
    assert store[16:24]["key"] == [f"sample-{i:05d}" for i in range(16, 24)]  # chunk 0 checks out
    with pytest.raises(st.ChecksumError, match=r"inner chunk 1 \(rows 8-15 of shard 1\)") as e:
        store[27]
    assert where in str(e.value)
    with pytest.raises(st.ChecksumError, match="sha256 does not match"):
        st.open_targets(root, verify="full")


def test_zarr_shard_file_swapped_for_another_refused_lazily(zarr_damaged):
    """A sound shard file of another shard, same size, is refused by its chunk checksums before a row is read."""
    root, m = zarr_damaged
    (a, _), (b, where) = _shard_file(root, m, 0), _shard_file(root, m, 1)
    b.write_bytes(a.read_bytes())
    store = st.open_targets(root)
    with pytest.raises(st.ChecksumError, match="chunk checksums or shard index do not match the manifest") as e:
        store[20]
    assert where in str(e.value)


def test_zarr_format_1_manifest_checked_by_sha256(zarr_damaged):
    """A manifest without chunks_sha256 (format 1) makes the lazy reader hash each shard's files whole."""
    root, m = zarr_damaged
    d = json.loads((root / "manifest.json").read_text())
    d["format_version"] = 1
    for shard in d["shards"]:
        for f in shard["files"]:
            f.pop("chunks_sha256")
    (root / "manifest.json").write_text(json.dumps(d))
    path, where = _shard_file(root, m, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 10] ^= 0x40  # inner chunk 1
    path.write_bytes(bytes(data))
    store = st.open_targets(root)
    assert store.manifest.format_version == 1
    with pytest.raises(st.ChecksumError, match="sha256 does not match") as e:
        store[16]  # chunk 0: the whole file is hashed first
    assert where in str(e.value)


def test_checksum_mismatch_full_fails_at_open(damaged):
    root, m = damaged
    path, where = _shard_file(root, m, 2)
    flip_data_byte(path)
    with pytest.raises(st.ChecksumError, match="sha256 does not match") as e:
        st.open_targets(root, verify="full")
    assert where in str(e.value)


def test_flipped_byte_changes_the_values_read_unchecked(pristine, damaged):
    root, m = damaged
    path, _ = _shard_file(root, m, 1)
    flip_data_byte(path)
    good = st.open_targets(pristine[0], verify="none")[16:32]["logits"]
    bad = st.open_targets(root, verify="none")[16:32]["logits"]
    assert (bits(good) != bits(bad)).sum() == 1  # exactly the one value the flipped byte belongs to


@pytest.mark.parametrize("verify", ["lazy", "full"])
def test_missing_shard_file(damaged, verify):
    root, m = damaged
    path, where = _shard_file(root, m, 1)
    path.unlink()
    with pytest.raises(st.StoreError, match="missing") as e:
        st.open_targets(root, verify=verify)  # a listable filesystem: sizes are checked at open
    assert where in str(e.value) and "shard 1" in str(e.value)


@pytest.mark.parametrize("verify", ["lazy", "full", "none"])
def test_truncated_shard_file(damaged, verify):
    root, m = damaged
    path, where = _shard_file(root, m, 2)
    size = path.stat().st_size
    os.truncate(path, size - 100)
    with pytest.raises(st.StoreError, match=f"{size - 100} bytes, the manifest says {size}.*truncated") as e:
        st.open_targets(root, verify=verify)
    assert where in str(e.value)
