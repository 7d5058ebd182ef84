"""What a writer may delete (only a recognisable store, nothing its links lead to, never the filesystem's root or
a folder holding the current or home folder), the block it chooses for a given shard, and the dataset card's
portability and hub metadata."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fsspec
import pytest
import torch
import yaml

import softtargets as st
from softtargets.cli import main
from softtargets.sharing.convert import convert_store
from tests.store_data import bits, keys, store_path, teacher_logits, write_store

WEB_APP = {"manifest.json": json.dumps({"name": "My App", "short_name": "app", "start_url": "/", "icons": []}),
           "index.html": "<html>years of work</html>"}


def _web_app(folder: Path) -> Path:
    """A folder that is not a store but holds a ``manifest.json`` (a web app's)."""
    folder.mkdir(parents=True)
    for name, text in WEB_APP.items():
        (folder / name).write_text(text)
    return folder


def _unchanged(folder: Path) -> bool:
    return {p.name: p.read_text() for p in folder.iterdir()} == WEB_APP


def _small_store(root: Path, layout: str = "zarr", n: int = 12) -> st.Manifest:
    return write_store(root, teacher_logits(n, seed=3), layout=layout, shard_rows=8, block_rows=4)


# -- overwrite deletes only stores ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_overwrite_refuses_a_folder_whose_manifest_is_not_a_store_manifest(tmp_path, layout):
    folder = _web_app(store_path(tmp_path, layout, "webapp"))
    with pytest.raises(FileExistsError, match="is not a softtargets store; refusing to delete it") as e:
        st.create_targets(folder, num_classes=10, layout=layout, overwrite=True)
    message = str(e.value)
    assert str(folder) in message and "format_version" in message and "\n" not in message
    assert _unchanged(folder)


def test_overwrite_refuses_a_foreign_manifest_on_a_memory_filesystem():
    fs = fsspec.filesystem("memory")
    url = "memory://trust-writer/webapp.zarr"
    fs.pipe_file(f"{url}/manifest.json", WEB_APP["manifest.json"].encode())
    fs.pipe_file(f"{url}/index.html", WEB_APP["index.html"].encode())
    try:
        with pytest.raises(FileExistsError, match="refusing to delete it"):
            st.create_targets(url, num_classes=10, overwrite=True)
        assert fs.cat_file(f"{url}/index.html") == WEB_APP["index.html"].encode()
    finally:
        fs.rm("memory://trust-writer", recursive=True)


def test_convert_overwrite_refuses_a_folder_with_a_foreign_manifest(tmp_path, capsys):
    src = tmp_path / "src.zarr"
    _small_store(src)
    dst = _web_app(tmp_path / "site.wds")
    rc = main(["convert", str(src), str(dst), "--overwrite", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to delete it" in err and str(dst) in err
    assert _unchanged(dst)


def test_overwrite_replaces_an_unfinished_store_but_not_a_pending_marker_that_is_not_ours(tmp_path):
    folder = tmp_path / "odd.zarr"
    folder.mkdir()
    (folder / ".softtargets-pending.json").write_text('{"note": "someone else\'s file"}')
    (folder / "data.bin").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="refusing to delete it"):
        st.create_targets(folder, num_classes=10, overwrite=True)
    assert (folder / "data.bin").read_bytes() == b"keep me"
    root = tmp_path / "crashed.zarr"
    w = st.create_targets(root, num_classes=10, num_teachers=3, num_samples=20, shard_rows=8, block_rows=4)
    w.write(keys(8), teacher_logits(8, seed=4))  # one shard done, never closed: its pending spec is ours
    x = teacher_logits(5, seed=5)
    write_store(root, x, layout="zarr", dtype="float32", shard_rows=8, block_rows=4, overwrite=True)
    got = st.open_targets(root, verify="full")[:]["logits"]
    assert torch.equal(bits(got), bits((x - x.mean(-1, keepdim=True)).float()))


def test_overwrite_through_a_link_empties_the_store_and_never_what_links_point_to(tmp_path):
    """A store reached through a symbolic link is emptied where it lies (the link stays); a link inside the
    store is removed, the folder it leads to is left whole."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not the store's")
    real = tmp_path / "disk" / "t.wds"
    _small_store(real, "wds")
    (real / "escape").symlink_to(outside, target_is_directory=True)
    link = tmp_path / "t.wds"
    link.symlink_to(real, target_is_directory=True)
    x = teacher_logits(5, seed=6)
    write_store(link, x, layout="wds", dtype="float32", shard_rows=8, block_rows=4, overwrite=True)
    assert link.is_symlink() and len(st.open_targets(link, verify="full")) == 5
    assert not (real / "escape").exists() and sorted(p.name for p in real.iterdir()) == [
        "README.md", "manifest.json", "shard-000000.tar"]
    assert (outside / "precious.txt").read_text() == "not the store's"


def test_overwrite_never_deletes_a_folder_holding_the_current_or_home_folder(tmp_path, monkeypatch):
    root = tmp_path / "t.zarr"
    _small_store(root)
    inside = root / "notes"
    inside.mkdir()
    monkeypatch.chdir(inside)
    with pytest.raises(FileExistsError, match="refusing to delete .*the current folder"):
        st.create_targets(root, num_classes=10, overwrite=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(inside))
    with pytest.raises(FileExistsError, match="refusing to delete .*the home folder"):
        st.create_targets(root, num_classes=10, overwrite=True)
    assert len(st.open_targets(root, verify="full")) == 12 and inside.is_dir()
    with pytest.raises(FileExistsError, match="refusing to delete /: it is the filesystem's root"):
        st.create_targets("/", num_classes=10, overwrite=True)


# -- create_targets: a default block divides the shard given -------------------------------------------------


@pytest.mark.parametrize(("layout", "shard_rows", "num_samples", "block_rows"), [
    ("zarr", 1024, None, 1024),  # the default block (16384 rows here) would not divide it
    ("wds", 1000, None, 1000),
    ("zarr", 96, 300, 96),  # a small store's default block is 512 rows
    ("zarr", 96, 40, 48),  # 40 rows: a default block of 64, and 48 is the largest divisor of 96 within it
])
def test_a_default_block_divides_the_shard_rows_given(tmp_path, layout, shard_rows, num_samples, block_rows):
    w = st.create_targets(store_path(tmp_path, layout), num_classes=10, content="geometric", layout=layout,
                          shard_rows=shard_rows, num_samples=num_samples)
    assert (w.spec.shard_rows, w.spec.block_rows) == (shard_rows, block_rows)
    n = num_samples or shard_rows + 7
    x = torch.randn(n, 10, generator=torch.Generator().manual_seed(7))
    w.write(keys(n), x)
    m = w.close()
    assert [s.rows for s in m.shards] == [min(shard_rows, n - i) for i in range(0, n, shard_rows)]
    got = st.open_targets(store_path(tmp_path, layout), verify="full")[:]
    assert got["key"] == keys(n) and torch.equal(bits(got["logits"]), bits((x - x.mean(-1, keepdim=True)).half()))


def test_only_an_explicit_block_that_does_not_divide_the_shard_is_refused(tmp_path):
    assert st.create_targets(tmp_path / "a.zarr", num_classes=10, shard_rows=1024).spec.block_rows == 1024
    with pytest.raises(ValueError, match="shard_rows=1024 must be a multiple of block_rows=2048"):
        st.create_targets(tmp_path / "b.zarr", num_classes=10, shard_rows=1024, block_rows=2048)
    assert not (tmp_path / "b.zarr").exists()


# -- the dataset card ----------------------------------------------------------------------------------------


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_the_card_names_no_absolute_path_of_its_producer(tmp_path, monkeypatch):
    from softtargets.store.card import URL_PLACEHOLDER

    src, dst = tmp_path / "src.zarr", tmp_path / "out" / "dst.wds"
    _small_store(src)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "venv" / "bin" / "softtargets"), "convert", str(src), str(dst),
                                      f"--keys={tmp_path / 'keys.txt'}", "--dtype", "float32"])
    convert_store(src, dst, dtype="float32", progress=False)
    card = (dst / "README.md").read_text()
    assert str(tmp_path) not in card
    assert (f"- Command: `softtargets convert ../../src.zarr {URL_PLACEHOLDER} --keys=../../keys.txt "
            "--dtype float32`") in card
    assert "- convert of `../../src.zarr` (manifest sha256" in card
    assert f'st.open_targets("{URL_PLACEHOLDER}")' in card and f"softtargets verify {URL_PLACEHOLDER}" in card
    assert f'URL = "{URL_PLACEHOLDER}"' in card


def test_the_card_resolves_relative_paths_of_the_command_against_the_store(tmp_path, monkeypatch):
    from softtargets.store.card import URL_PLACEHOLDER

    _small_store(tmp_path / "src.zarr")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["softtargets", "convert", "src.zarr", "copies/dst.zarr", "org/model"])
    convert_store("src.zarr", "copies/dst.zarr", progress=False)
    card = (tmp_path / "copies" / "dst.zarr" / "README.md").read_text()
    assert f"- Command: `softtargets convert ../../src.zarr {URL_PLACEHOLDER} org/model`" in card


def test_the_card_carries_hub_front_matter(tmp_path):
    root = tmp_path / "t.zarr"
    w = st.create_targets(root, num_classes=10, num_teachers=3, transfer_set={"name": "cifar10", "fingerprint": "f"})
    w.write(keys(1200), teacher_logits(1200, seed=8))
    w.close()
    meta = _front_matter((root / "README.md").read_text())
    assert meta["size_categories"] == ["1K<n<10K"] and meta["license"] == "unknown"
    assert meta["task_categories"] == ["other"] and "cifar10" in meta["pretty_name"]
    assert {"knowledge-distillation", "soft-targets", "zarr", "per-teacher"} <= set(meta["tags"])


def test_size_categories_are_the_hubs_buckets():
    from softtargets.store.card import size_category

    cases = {0: "n<1K", 999: "n<1K", 1000: "1K<n<10K", 99_999: "10K<n<100K", 10**6: "1M<n<10M",
             10**9: "1B<n<10B", 10**12 - 1: "100B<n<1T", 10**12: "n>1T"}
    assert {n: size_category(n) for n in cases} == cases
