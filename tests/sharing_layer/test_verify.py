"""``softtargets verify`` and the reader's refusals on real broken stores (both layouts)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import softtargets as st
from softtargets.cli import main
from softtargets.sharing.unique_keys import KeyChecker, hash_keys
from softtargets.sharing.verify import verify_store

from ..sharing import data_file, edit_manifest, flip_byte, make_store, sample_keys, truncate

LAYOUTS = ("zarr", "wds")


@pytest.fixture(scope="module", params=LAYOUTS)
def sound(request, tmp_path_factory):
    """A sound per-teacher store of 150 rows in 5 shards (read-only: tests copy it before breaking it)."""
    return make_store(tmp_path_factory.mktemp(request.param), request.param)


def copy(src, tmp_path, name="broken"):
    dst = tmp_path / f"{name}{src.suffix}"
    shutil.copytree(src, dst)
    return dst


def run_verify(capsys, *args):
    rc = main(["verify", "--no-progress", *map(str, args)])
    return rc, capsys.readouterr().out


def test_sound_store_passes(sound, capsys):
    rc, out = run_verify(capsys, sound)
    assert rc == 0, out
    assert out.startswith("OK ") and "150 samples in 5 shards" in out
    report = verify_store(sound)
    assert report.ok and report.rows_checked == 150 and report.files_checked == (15 if sound.suffix == ".zarr" else 5)


def test_every_broken_file_is_named(sound, tmp_path, capsys):
    """A flipped byte, a missing shard and a truncated shard in one store: all three named, exit 1."""
    bad = copy(sound, tmp_path)
    flipped, missing, cut = data_file(bad, 0), data_file(bad, 2), data_file(bad, 3)
    flip_byte(flipped)
    missing.unlink()
    truncate(cut)
    rc, out = run_verify(capsys, bad)
    assert rc == 1
    lines = {line for line in out.splitlines() if line.startswith("BAD ")}
    rel = lambda p: str(p.relative_to(bad))  # noqa: E731
    assert any(rel(flipped) in x and "sha256 does not match" in x for x in lines), out
    assert any(rel(missing) in x and "missing" in x for x in lines), out
    assert any(rel(cut) in x and "truncated" in x for x in lines), out
    report = verify_store(bad)
    assert sorted(report.bad_files) == sorted(f"{bad}/{rel(p)}" for p in (flipped, missing, cut))
    assert report.rows_checked == 150 - 3 * 32  # keys of the two sound shards (32 + 22 rows) were still checked


def test_truncated_tar_and_zarr_shard_refused_by_reader(sound, tmp_path):
    bad = copy(sound, tmp_path)
    truncate(data_file(bad, 1))
    with pytest.raises(st.StoreError, match=str(data_file(bad, 1).relative_to(bad)) + ".*truncated"):
        st.open_targets(bad)


def test_missing_shard_refused_by_reader(sound, tmp_path):
    bad = copy(sound, tmp_path)
    data_file(bad, 4).unlink()
    with pytest.raises(st.StoreError, match=str(data_file(bad, 4).relative_to(bad)) + ".*missing"):
        st.open_targets(bad)


def test_flipped_byte_refused_on_first_read(sound, tmp_path):
    bad = copy(sound, tmp_path)
    flip_byte(data_file(bad, 2))
    store = st.open_targets(bad)  # lazy: sizes are fine, so opening succeeds
    assert store[0]["key"] == "img/000000.jpg"  # shard 0 is sound
    with pytest.raises(st.ChecksumError, match=str(data_file(bad, 2).relative_to(bad))):
        store[64:96]  # shard 2's rows (zarr checks the inner chunks it reads; wds the whole tar)
    with pytest.raises(st.ChecksumError):
        st.open_targets(bad, verify="full")


def test_wrong_chunks_sha256_named(tmp_path, capsys):
    """A zarr file whose sha256 is right but whose recorded chunks_sha256 is not: lazy readers refuse it, and
    so does verify."""
    bad = make_store(tmp_path, "zarr")
    d = json.loads((bad / "manifest.json").read_text())
    d["shards"][3]["files"][0]["chunks_sha256"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(d))
    rel = d["shards"][3]["files"][0]["path"]
    rc, out = run_verify(capsys, bad)
    assert rc == 1 and f"BAD {bad}/{rel}: chunk checksums or shard index do not match" in out
    with pytest.raises(st.ChecksumError, match=rel):
        st.open_targets(bad)[100]


def test_manifest_lying_about_rows(sound, tmp_path, capsys):
    """num_samples and the last shard's rows both lowered by 5: the data hold 5 rows more."""
    bad = copy(sound, tmp_path)
    edit_manifest(bad, num_samples=145, last_rows_delta=-5)
    rc, out = run_verify(capsys, bad)
    assert rc == 1
    if sound.suffix == ".zarr":
        assert "manifest.json: num_samples=145 makes logits (145, 3, 10), but logits/zarr.json has shape (150, 3, 10)" \
            in out
        with pytest.raises(st.StoreError, match="shape"):
            st.open_targets(bad)
    else:
        assert f"BAD {bad}/shard-000004.tar: shard 4: holds 22 rows, the manifest says 17" in out
        store = st.open_targets(bad)
        with pytest.raises(st.StoreError, match="shard-000004.tar.*holds 22 rows, the manifest says 17"):
            store[140]


@pytest.mark.parametrize("edit", [{"num_samples": 140}, {"last_rows_delta": -5}])
def test_manifest_with_inconsistent_row_counts(sound, tmp_path, capsys, edit):
    """Only one of num_samples / the shard table edited: refused at open, and named by verify."""
    bad = copy(sound, tmp_path)
    edit_manifest(bad, **edit)
    rc, out = run_verify(capsys, bad)
    assert rc == 1
    assert f"BAD {bad}/manifest.json: shards hold" in out
    with pytest.raises(st.StoreError, match="manifest.json: inconsistent row counts"):
        st.open_targets(bad)


@pytest.mark.parametrize("text, why", [("{not json", "not valid JSON"), (None, "unknown format_version 4")])
def test_bad_manifest_named(sound, tmp_path, capsys, text, why):
    bad = copy(sound, tmp_path)
    if text is None:
        edit_manifest(bad, format_version=4)
    else:
        (bad / "manifest.json").write_text(text)
    rc, out = run_verify(capsys, bad)
    assert rc == 1 and f"BAD {bad}/manifest.json: " in out and why in out


def test_json_report(sound, tmp_path, capsys):
    bad = copy(sound, tmp_path)
    flip_byte(data_file(bad, 1))
    rc = main(["verify", "--json", "--no-progress", str(bad)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and report["ok"] is False
    assert report["bad_files"] == [f"{bad}/{data_file(bad, 1).relative_to(bad)}"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_duplicate_keys_across_shards(tmp_path, capsys, layout):
    """Shards written by separate tasks may repeat a key (each task sees only its shard): verify finds it."""
    path = tmp_path / f"dup.{layout}"
    w = st.create_targets(path, num_classes=4, content="geometric", layout=layout, num_samples=40, shard_rows=16,
                          block_rows=8, dtype="float32")
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    names = sample_keys(40)
    names[37] = names[3]  # shard 2 repeats a key of shard 0
    for sid in range(3):
        lo, hi = sid * 16, min(40, sid * 16 + 16)
        w.write_shard(sid, names[lo:hi], x[lo:hi])
    w.finalize()
    rc, out = run_verify(capsys, path)
    assert rc == 1
    assert "duplicate key 'img/000003.jpg' at row 3" in out and "row 37" in out, out
    report = verify_store(path)
    assert len(report.problems) == 1


def test_key_checker_partitions_on_disk_agree_with_counting(tmp_path):
    """Forced spills into 8 partitions (tiny buffers): the duplicates found are exactly the repeated keys."""
    rng = np.random.default_rng(1)
    keys = np.array([f"k{int(v)}" for v in rng.integers(0, 3000, size=2000)])
    uniq, counts = np.unique(keys, return_counts=True)
    truth = {k: np.flatnonzero(keys == k).tolist() for k in uniq[counts > 1]}
    checker = KeyChecker(len(keys), partition_bytes=4096, buffer_bytes=1600, tmpdir=str(tmp_path))
    assert checker.bits == 3
    for lo in range(0, len(keys), 300):
        checker.add(keys[lo:lo + 300], lo)
    assert len(list(tmp_path.glob("softtargets-keys-*/*.bin"))) == 8
    found = checker.duplicates(lambda rows: keys[rows].tolist(), limit=10_000)
    checker.close()
    assert {k: sorted(v) for k, v in found.groups.items()} == truth and found.unconfirmed == 0
    assert not list(tmp_path.iterdir())  # partition files removed


def test_hash_keys_ignores_array_width():
    """Equal keys hash equally whatever the numpy string width they arrive in."""
    a = hash_keys(np.array(["ab", "abcdef"]))
    b = hash_keys(["ab"])
    assert a[0] == b[0] and a[1] != a[0]
    assert len(set(hash_keys([f"{i}" for i in range(10_000)]).tolist())) == 10_000
