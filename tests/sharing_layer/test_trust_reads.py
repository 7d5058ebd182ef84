"""What is checked is what is read: manifest paths, paths out of the store, ``verify="full"`` against ``"lazy"``,
and the data's shapes against the manifest's (both layouts, real stores forged on disk)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import softtargets as st
from softtargets.sharing.verify import verify_store

from ..sharing import data_file, make_store
from ..store_data import LAYOUTS

N = 64  # two shards of 32 rows, inner chunks / blocks of 8


@pytest.fixture(scope="module", params=LAYOUTS)
def sound(request, tmp_path_factory) -> Path:
    """A sound per-teacher float16 store of 2 shards (read-only: tests copy it)."""
    return make_store(tmp_path_factory.mktemp(request.param), request.param, n=N)


@pytest.fixture(scope="module")
def other(sound, tmp_path_factory) -> Path:
    """A store of the same layout and shape with other logits (seed 1): same keys, same file sizes."""
    layout = "zarr" if sound.suffix == ".zarr" else "wds"
    return make_store(tmp_path_factory.mktemp(f"other-{layout}"), layout, name="other", n=N, seed=1)


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / f"broken{src.suffix}"
    shutil.copytree(src, dst)
    return dst


def rel(store: Path, shard_id: int, part: str = "logits") -> str:
    return str(data_file(store, shard_id, part).relative_to(store))


def edit(store: Path, change: Any) -> dict[str, Any]:
    """Apply ``change(manifest dict)`` to ``store``'s manifest.json and write it back."""
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    return m


def set_path(store: Path, shard_id: int, old: str, new: str) -> None:
    """The manifest lists file ``old`` of shard ``shard_id`` as ``new`` (size and sha256 kept)."""
    def change(m: dict[str, Any]) -> None:
        f = next(f for f in m["shards"][shard_id]["files"] if f["path"] == old)
        f["path"] = new
    edit(store, change)


def rehash(store: Path, rel_path: str) -> None:
    """Record the current size and sha256 of ``rel_path`` in the manifest (a forger who rewrote the file)."""
    data = (store / rel_path).read_bytes()

    def change(m: dict[str, Any]) -> None:
        for s in m["shards"]:
            for f in s["files"]:
                if f["path"] == rel_path:
                    f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    edit(store, change)


# -- item 4: the manifest's path is the path read ------------------------------------------------------------


def test_manifest_pointing_at_an_untouched_copy_is_refused(sound, other, tmp_path, cli):
    """Shard 0's file kept as an untouched copy the manifest points at; the file readers read replaced by other
    (valid, same-sized) data. Refused at open naming both paths; verify names the file and exits 1."""
    bad = copy(sound, tmp_path)
    real = rel(bad, 0)
    kept = "copy-000000.tar" if bad.suffix == ".wds" else "logits/copy-0"
    shutil.copy(bad / real, bad / kept)
    shutil.copy(data_file(other, 0), bad / real)
    assert (bad / real).read_bytes() != (bad / kept).read_bytes()
    set_path(bad, 0, real, kept)
    with pytest.raises(st.StoreError, match="shard 0 lists files") as e:
        st.open_targets(bad)
    assert kept in str(e.value) and real in str(e.value)
    rc, out, _ = cli("verify", "--no-progress", bad)
    assert rc == 1 and f"BAD {bad}/{kept}: shard 0: listed where this layout reads '{real}'" in out, out


@pytest.mark.parametrize("verify", ["lazy", "full", "none"])
def test_sound_store_opens_with_every_check(sound, verify):
    """The checks at open pass a sound store, whatever the verify mode, and its values are read."""
    store = st.open_targets(sound, verify=verify)
    assert store[N - 1]["key"] == f"img/{N - 1:06d}.jpg" and store[0:N]["logits"].shape == (N, 3, 10)


# -- item 6: no path leaves the store ------------------------------------------------------------------------


UNSAFE = {
    "parent": ("../outside.bin", "a '..' component"),
    "absolute": ("/etc/passwd", "an absolute path"),
    "backslash": ("logits\\..\\..\\outside.bin", "a backslash"),
    "drive": ("C:/outside.bin", "an absolute path"),
    "dot": ("./shard.bin", "an empty or '.' component"),
}


@pytest.mark.parametrize("kind", list(UNSAFE))
def test_paths_out_of_the_store_refused_by_reader(sound, tmp_path, kind):
    """A manifest path out of the store (an exact copy of the shard file lies there) is refused at open."""
    bad = copy(sound, tmp_path)
    path, why = UNSAFE[kind]
    shutil.copy(data_file(bad, 0), tmp_path / "outside.bin")
    set_path(bad, 0, rel(bad, 0), path)
    with pytest.raises(st.StoreError, match="leaves the store") as e:
        st.open_targets(bad)
    assert repr(path) in str(e.value) and why in str(e.value) and "shard 0" in str(e.value)


def test_verify_refuses_paths_out_of_the_store_unread(sound, tmp_path, cli):
    """Two shards list paths out of the store: ``../outside.bin`` (a sound copy of the shard file, which the old
    verify read and passed) and an absolute path: both named, neither read, exit 1."""
    bad = copy(sound, tmp_path)
    shutil.copy(data_file(bad, 0), tmp_path / "outside.bin")
    set_path(bad, 0, rel(bad, 0), "../outside.bin")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for verify\n")
    set_path(bad, 1, rel(bad, 1), str(secret))
    rc, out, _ = cli("verify", "--no-progress", bad)
    assert rc == 1, out
    assert f"BAD {bad}/../outside.bin: shard 0: the path leaves the store (a '..' component); refused, not read" \
        in out, out
    assert "shard 1: the path leaves the store (an absolute path); refused, not read" in out, out
    report = verify_store(bad)
    assert report.files_checked == 0 and report.bytes_checked == 0  # both shards refused before a byte was read


def _link_out(bad: Path, tmp_path: Path) -> str:
    """Replace part of shard 1 by a link to an exact copy outside the store: wds, the tar itself; zarr, the
    folder ``logits/c/1`` holding the shard's logits file. Returns the link's relative path."""
    if bad.suffix == ".wds":
        link = rel(bad, 1)
        target = tmp_path / "outside.tar"
        shutil.copy(bad / link, target)
    else:
        link = "logits/c/1"
        target = tmp_path / "outside-dir"
        shutil.copytree(bad / link, target)
        shutil.rmtree(bad / link)
    (bad / link).unlink(missing_ok=True)
    os.symlink(target, bad / link)
    return link


def test_link_out_of_the_store_refused(sound, tmp_path, cli):
    """A symbolic link (to a file, or to a folder above it) leading out of the store: refused by the reader at
    open and by verify, though the bytes behind it are the right ones."""
    bad = copy(sound, tmp_path / "in")
    link = _link_out(bad, tmp_path)
    with pytest.raises(st.StoreError, match="a link out of the store") as e:
        st.open_targets(bad, verify="none")
    assert f"{bad}/{rel(bad, 1)}" in str(e.value)
    rc, out, _ = cli("verify", "--no-progress", bad)
    assert rc == 1 and f"BAD {bad}/{rel(bad, 1)}: shard 1: the path is a link out of the store" in out, (link, out)


def test_link_inside_the_store_is_read(sound, tmp_path, cli):
    """A link that stays inside the store (the shard file moved to a subfolder, linked from its place) is read."""
    bad = copy(sound, tmp_path)
    real = rel(bad, 1)
    (bad / "moved").mkdir()
    (bad / real).rename(bad / "moved" / "file")
    os.symlink(bad / "moved" / "file", bad / real)
    store = st.open_targets(bad, verify="full")
    assert store[40]["key"] == "img/000040.jpg"
    rc, out, _ = cli("verify", "--no-progress", bad)
    assert rc == 0, out


def test_manifest_link_out_of_the_store_refused(sound, tmp_path, cli):
    bad = copy(sound, tmp_path / "in")
    shutil.move(bad / "manifest.json", tmp_path / "manifest.json")
    os.symlink(tmp_path / "manifest.json", bad / "manifest.json")
    with pytest.raises(st.ManifestError, match="a link out of the store"):
        st.open_targets(bad)
    rc, out, _ = cli("verify", "--no-progress", bad)
    assert rc == 1 and f"BAD {bad}/manifest.json: a link out of the store" in out, out


# -- item 5: zarr "full" checks at least what "lazy" does ------------------------------------------------------


@pytest.fixture
def zarr_store(tmp_path) -> Path:
    return make_store(tmp_path, "zarr", n=N)


def test_zarr_full_refuses_a_flipped_bit_behind_a_rehashed_sha256(zarr_store, cli):
    """A flipped bit in shard 1's logits, the file's sha256 recomputed in the manifest: its inner chunk's crc32c
    fails. ``lazy`` refuses the rows on read; ``full`` refuses at open; verify exits 1."""
    logits = rel(zarr_store, 1)
    data = bytearray((zarr_store / logits).read_bytes())
    data[5] ^= 0x08  # inner chunk 0, rows 32-39
    (zarr_store / logits).write_bytes(bytes(data))
    rehash(zarr_store, logits)
    store = st.open_targets(zarr_store, verify="lazy")
    with pytest.raises(st.ChecksumError, match=r"inner chunk 0 \(rows 0-7 of shard 1\)"):
        store[33]
    with pytest.raises(st.ChecksumError, match=rf"{logits}: inner chunk 0 \(rows 0-7 of shard 1\)"):
        st.open_targets(zarr_store, verify="full")
    rc, out, _ = cli("verify", "--no-progress", zarr_store)
    assert rc == 1 and f"{logits}" in out, out


def test_zarr_full_checks_chunks_sha256(zarr_store):
    """A wrong chunks_sha256 beside a right sha256: refused by ``full`` at open, as ``lazy`` refuses it on read."""
    logits = rel(zarr_store, 0)

    def change(m: dict[str, Any]) -> None:
        m["shards"][0]["files"][0]["chunks_sha256"] = "0" * 64
    edit(zarr_store, change)
    with pytest.raises(st.ChecksumError, match=f"{logits}: chunk checksums or shard index do not match"):
        st.open_targets(zarr_store, verify="full")
    with pytest.raises(st.ChecksumError, match=f"{logits}: chunk checksums or shard index do not match"):
        st.open_targets(zarr_store)[3]


# -- item 7: the data's shapes are the manifest's ------------------------------------------------------------


WDS_LIES = {
    "classes": ({"num_classes": 12, "class_names": [f"class{i}" for i in range(12)]}, "float16[8, 3, 12]"),
    "teachers": ({"num_teachers": 2}, "float16[8, 2, 10]"),
    "dtype": ({"dtype": "float32"}, "float32[8, 3, 10]"),
    "block_rows": ({"block_rows": 16}, "float16[16, 3, 10]"),
}


@pytest.mark.parametrize("lie", list(WDS_LIES))
def test_wds_manifest_shape_lies_refused_on_first_read(tmp_path, lie):
    """A wds manifest whose C, K, dtype or block_rows is not the data's: the first read of a shard raises a
    StoreError naming the tar, the shape found and the shape expected (never serves [B, 3, 10] as C=12)."""
    store_dir = make_store(tmp_path, "wds", n=N)
    change, expected = WDS_LIES[lie]
    if lie == "teachers":
        change = {**change, "teachers": json.loads((store_dir / "manifest.json").read_text())["teachers"][:2]}
    edit(store_dir, lambda m: m.update(change))
    store = st.open_targets(store_dir)
    with pytest.raises(st.StoreError) as e:
        store[0:2]
    msg = str(e.value)
    assert f"{store_dir}/shard-000000.tar" in msg and "float16[8, 3, 10]" in msg and expected in msg, msg


def test_wds_sample_layout_shape_lie_refused(tmp_path):
    store_dir = make_store(tmp_path, "wds", n=N, sample_layout="sample", block_rows=None)
    edit(store_dir, lambda m: m.update(num_classes=12, class_names=[f"c{i}" for i in range(12)]))
    with pytest.raises(st.StoreError, match=r"shard-000000.tar: sample .* holds logits float16\[3, 10\].*"
                                            r"says float16\[3, 12\]"):
        st.open_targets(store_dir)[0]


def _huge(m: dict[str, Any], n: int) -> None:
    """num_samples ``n`` in two shards of ``n // 2`` rows: a consistent shard table, files unchanged."""
    m["num_samples"], m["shard_rows"] = n, n // 2
    for i, s in enumerate(m["shards"]):
        s["start"], s["rows"] = i * (n // 2), n // 2


def test_wds_huge_row_count_refused_at_open(tmp_path):
    """N = 10**15 with a consistent shard table: the tars' sizes cannot hold those rows; refused at open,
    before anything is sized from N."""
    store_dir = make_store(tmp_path, "wds", n=N)
    edit(store_dir, lambda m: _huge(m, 10**15))
    with pytest.raises(st.StoreError, match=r"shard-000000.tar: \d+ bytes cannot hold the 500000000000000 rows"):
        st.open_targets(store_dir, verify="none")


def test_zarr_huge_row_count_refused_at_open(tmp_path):
    """The same lie told by the manifest and every zarr.json (shape and shard shape): the logits files' sizes
    cannot hold the rows; refused at open."""
    store_dir = make_store(tmp_path, "zarr", n=N)
    n = 10**15
    edit(store_dir, lambda m: _huge(m, n))
    for name in ("logits", "labels", "keys"):
        meta_path = store_dir / name / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["shape"][0] = n
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = n // 2
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(st.StoreError, match=r"logits/c/0/0/0: \d+ bytes cannot hold the 500000000000000 rows"):
        st.open_targets(store_dir, verify="none")


@pytest.mark.parametrize(("array", "change", "words"), [
    ("logits", lambda meta: meta.update(data_type="float32"), "dtype float32; the manifest says .*dtype float16"),
    ("labels", lambda meta: meta["codecs"][0]["configuration"]["chunk_shape"].__setitem__(0, 4),
     "chunk rows 4; the manifest says chunk rows 8"),
    ("keys", lambda meta: meta["shape"].__setitem__(0, N + 8), f"shape \\({N + 8},\\); the manifest says shape"),
])
def test_zarr_array_metadata_checked_against_the_manifest(tmp_path, array, change, words):
    """Each array's zarr.json (dtype, inner chunk rows, shape) must agree with the manifest: refused at open."""
    store_dir = make_store(tmp_path, "zarr", n=N)
    meta_path = store_dir / array / "zarr.json"
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(st.StoreError, match=f"{array}/zarr.json: {array} array has {words}"):
        st.open_targets(store_dir, verify="none")


def test_zarr_metadata_link_out_of_the_store_refused(tmp_path, cli):
    """An array's zarr.json replaced by a link to a copy outside the store: refused before zarr reads it."""
    store_dir = make_store(tmp_path / "in", "zarr", n=N)
    shutil.move(store_dir / "logits" / "zarr.json", tmp_path / "zarr.json")
    os.symlink(tmp_path / "zarr.json", store_dir / "logits" / "zarr.json")
    with pytest.raises(st.StoreError, match=f"{store_dir}/logits/zarr.json: a link out of the store"):
        st.open_targets(store_dir)
    rc, out, _ = cli("verify", "--no-progress", store_dir)
    assert rc == 1 and f"BAD {store_dir}/logits/zarr.json: a link out of the store" in out, out
