"""Writer and index behaviours: uneven batches across shards, key lookup, take, overwrite
rules, unfinished stores and resuming them, shard tasks from attached writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import softtargets as st
from tests.store_data import LAYOUTS, bits, flip_data_byte, keys, store_path, teacher_logits, write_store

N = 70
SHARD, BLOCK = 16, 4


def _zm(x: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)).to(dtype)


@pytest.fixture(scope="module", params=LAYOUTS)
def uneven(request, tmp_path_factory):
    """A store written in batches that straddle shard and block boundaries."""
    layout = request.param
    x = teacher_logits(N, seed=21)
    root = store_path(tmp_path_factory.mktemp(layout), layout)
    m = write_store(root, x, layout=layout, dtype="float16", labels=torch.arange(N) % 10,
                    batches=[1, 7, 0, 30, 13, 17, 2], shard_rows=SHARD, block_rows=BLOCK)
    return st.open_targets(root, verify="full"), m, x


def test_uneven_batches_make_whole_shards(uneven):
    store, m, x = uneven
    assert m.num_samples == N and len(store) == N
    assert [(s.id, s.start, s.rows) for s in m.shards] == [(0, 0, 16), (1, 16, 16), (2, 32, 16), (3, 48, 16),
                                                            (4, 64, 6)]
    assert [s.labeled for s in m.shards] == [16, 16, 16, 16, 6] and m.has_labels
    got = store[:]
    assert torch.equal(bits(got["logits"]), bits(_zm(x)))
    assert got["key"] == keys(N) and got["label"].tolist() == [i % 10 for i in range(N)]
    # iteration: one dict per shard, in order, rows read across block boundaries inside each
    parts = list(store)
    assert [len(p["key"]) for p in parts] == [16, 16, 16, 16, 6]
    assert torch.equal(bits(torch.cat([p["logits"] for p in parts])), bits(_zm(x)))
    # a range crossing two shard boundaries and starting mid-block
    r = store.rows(13, 35)
    assert r["index"].tolist() == list(range(13, 35)) and torch.equal(bits(r["logits"]), bits(_zm(x)[13:35]))
    assert store.rows(60, 500)["index"].tolist() == list(range(60, 70))
    assert store.rows(5, 5)["logits"].shape == (0, 3, 10)
    assert [store.shard_of(i) for i in (0, 15, 16, 63, 64, 69)] == [0, 0, 1, 3, 4, 4]


def test_key_lookup(uneven):
    store, _, x = uneven
    row = store["sample-00033"]
    assert row["index"] == 33 and row["key"] == "sample-00033" and row["label"] == 3
    assert torch.equal(bits(row["logits"]), bits(_zm(x)[33]))
    assert store.index_of("sample-00069") == 69
    assert store.keys() == keys(N)
    with pytest.raises(KeyError, match="no sample with key 'sample-99999'"):
        store["sample-99999"]


def test_take_with_repeats_negatives_and_out_of_range(uneven):
    store, _, x = uneven
    want = _zm(x)
    idx = [65, 3, 3, -1, 0, 17, -70, 40]
    norm = [65, 3, 3, 69, 0, 17, 0, 40]
    for got in (store.take(idx), store[idx], store[torch.tensor(idx)], store[np.array(idx)]):
        assert got["index"].tolist() == norm
        assert got["key"] == [f"sample-{i:05d}" for i in norm]
        assert torch.equal(bits(got["logits"]), bits(want[norm]))
        assert got["label"].tolist() == [i % 10 for i in norm]
    assert store.take([])["logits"].shape == (0, 3, 10)
    assert store[-1]["index"] == 69 and store[::17]["index"].tolist() == [0, 17, 34, 51, 68]
    for bad in ([70], [0, -71], [10**9]):
        with pytest.raises(IndexError, match="out of range for a store of 70 samples"):
            store.take(bad)
    with pytest.raises(IndexError, match="index 70 out of range"):
        store[70]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_existing_output_and_overwrite(tmp_path, layout):
    root = store_path(tmp_path, layout)
    write_store(root, teacher_logits(20, seed=1), layout=layout, dtype="float32", shard_rows=SHARD, block_rows=BLOCK)
    with pytest.raises(FileExistsError, match="finished store; pass overwrite=True") as e:
        st.create_targets(root, num_classes=10, num_teachers=3, layout=layout)
    assert str(root) in str(e.value)
    assert len(st.open_targets(root)) == 20  # untouched
    x = teacher_logits(9, seed=2)
    write_store(root, x, layout=layout, dtype="float32", shard_rows=SHARD, block_rows=BLOCK, overwrite=True)
    store = st.open_targets(root, verify="full")
    assert len(store) == 9 and torch.equal(bits(store[:]["logits"]), bits(_zm(x, torch.float32)))
    # the old store's second shard is gone, not left beside the new one
    shards = root.iterdir() if layout == "wds" else (root / "labels" / "c").iterdir()
    assert sorted(p.name for p in shards if p.name not in ("manifest.json", "README.md")) == (
        ["shard-000000.tar"] if layout == "wds" else ["0"])


def test_overwrite_refuses_to_delete_a_folder_that_is_not_a_store(tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="exists; choose a new path or pass overwrite=True"):
        st.create_targets(folder, num_classes=10, layout="zarr")
    with pytest.raises(FileExistsError, match="is not a softtargets store; refusing to delete it") as e:
        st.create_targets(folder, num_classes=10, layout="zarr", overwrite=True)
    assert str(folder) in str(e.value)
    assert (folder / "thesis.tex").read_text() == "years of work"
    # an empty folder is fine to write into
    (tmp_path / "empty").mkdir()
    write_store(tmp_path / "empty", teacher_logits(4), layout="zarr", shard_rows=SHARD, block_rows=BLOCK)
    assert len(st.open_targets(tmp_path / "empty")) == 4


def _crash_after(root, layout: str, x: torch.Tensor, rows: int, **kw) -> st.TargetWriter:
    """Write ``rows`` rows of a store sized for all of ``x``, and never close it (a crashed run)."""
    w = st.create_targets(root, num_classes=10, num_teachers=3, layout=layout, dtype="float16", num_samples=len(x),
                          shard_rows=SHARD, block_rows=BLOCK, **kw)
    w.write(keys(rows), x[:rows])
    return w


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unfinished_store_is_refused_then_resumed(tmp_path, layout):
    root = store_path(tmp_path, layout)
    x = teacher_logits(N, seed=22)
    _crash_after(root, layout, x, 40)  # shards 0 and 1 complete; 8 rows lost in the buffer
    with pytest.raises(st.ManifestError, match="unfinished") as e:
        st.open_targets(root)
    assert f"{root}/manifest.json" in str(e.value)
    with pytest.raises(FileExistsError, match="unfinished store.*resume"):
        st.create_targets(root, num_classes=10, num_teachers=3, layout=layout, dtype="float16", num_samples=N,
                          shard_rows=SHARD, block_rows=BLOCK)
    with pytest.raises(ValueError, match=r"cannot resume.*dtype: stored 'float16', now 'float32'"):
        st.create_targets(root, num_classes=10, num_teachers=3, layout=layout, dtype="float32", num_samples=N,
                          shard_rows=SHARD, block_rows=BLOCK, resume=True)
    w = st.create_targets(root, num_classes=10, num_teachers=3, layout=layout, dtype="float16", num_samples=N,
                          shard_rows=SHARD, block_rows=BLOCK, resume=True)
    done = w.completed_shards()
    assert sorted(done) == [0, 1] and done[1].start == 16 and done[1].rows == 16
    with pytest.raises(st.StoreError, match=r"shards \[2, 3, 4\] of 5 were never written"):
        w.finalize()
    for sid in range(5):
        if sid not in done:
            lo, hi = sid * SHARD, min(N, (sid + 1) * SHARD)
            w.write_shard(sid, keys(hi - lo, lo), x[lo:hi])
    m = w.finalize()
    assert m.num_samples == N and [s.rows for s in m.shards] == [16, 16, 16, 16, 6]
    store = st.open_targets(root, verify="full")
    assert store[:]["key"] == keys(N) and torch.equal(bits(store[:]["logits"]), bits(_zm(x)))
    assert not (root / ".softtargets-pending.json").exists() and not (root / ".softtargets-shards").exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resumed_writer_appends_after_the_completed_shards(tmp_path, layout):
    root = store_path(tmp_path, layout)
    x = teacher_logits(N, seed=25)
    _crash_after(root, layout, x, 40)  # shards 0 and 1 complete; rows 32-39 lost in the buffer
    w = st.create_targets(root, num_classes=10, num_teachers=3, layout=layout, dtype="float16", num_samples=N,
                          shard_rows=SHARD, block_rows=BLOCK, resume=True)
    assert w.rows_done == 32
    with pytest.raises(ValueError, match=r"duplicate sample keys: \['sample-00030', 'sample-00031'\]"):
        w.write(keys(4, 30), x[30:34])  # two of these rows are in the store already
    w.write(keys(N - 32, 32), x[32:])
    m = w.close()
    ref = write_store(store_path(tmp_path, layout, "ref"), x, layout=layout, dtype="float16", num_samples=N,
                      shard_rows=SHARD, block_rows=BLOCK)
    assert [f.sha256 for s in m.shards for f in s.files] == [f.sha256 for s in ref.shards for f in s.files]
    assert st.open_targets(root, verify="full")[:]["key"] == keys(N)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_redoes_a_shard_whose_files_were_damaged(tmp_path, layout):
    root = store_path(tmp_path, layout)
    x = teacher_logits(48, seed=23)
    w = _crash_after(root, layout, x, 48)  # all three shards written; the writer never closed
    flip_data_byte(root / w._records[1].files[0].path)
    resumed = st.create_targets(root, num_classes=10, num_teachers=3, layout=layout, dtype="float16",
                                num_samples=48, shard_rows=SHARD, block_rows=BLOCK, resume=True)
    assert sorted(resumed.completed_shards()) == [0, 2]
    assert sorted(resumed.completed_shards(verify=False)) == [0, 1, 2]
    # What writers killed mid-write leave: zarr's temporary chunk file and ours (wds shards, markers).
    first = root / w._records[0].files[0].path
    leftovers = [first.with_name(first.name + ".0123456789abcdef0123456789abcdef.partial"),
                 first.with_name(first.name + ".tmp-0123456789ab")]
    for path in leftovers:
        path.write_bytes(b"half")
    resumed.write_shard(1, keys(16, 16), x[16:32])
    resumed.finalize()
    assert torch.equal(bits(st.open_targets(root, verify="full")[:]["logits"]), bits(_zm(x)))
    assert not any(path.exists() for path in leftovers) and first.exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attached_writers_write_shards_in_any_order(tmp_path, layout):
    root = store_path(tmp_path, layout)
    x = teacher_logits(N, seed=24)
    coordinator = st.create_targets(root, num_classes=10, num_teachers=3, layout=layout, dtype="bfloat16",
                                    num_samples=N, shard_rows=SHARD, block_rows=BLOCK)
    records = []
    for sid in (4, 2, 0, 2, 3, 1):  # shard 2 twice: a retried task; idempotent
        task = st.attach_writer(str(root))
        lo, hi = sid * SHARD, min(N, (sid + 1) * SHARD)
        records.append(task.write_shard(sid, keys(hi - lo, lo), x[lo:hi], labels=torch.full((hi - lo,), sid)))
    marker = json.loads((root / ".softtargets-shards" / "000002.json").read_text())
    assert marker["start"] == 32 and marker["rows"] == 16
    with pytest.raises(ValueError, match=r"shard 1 holds rows \[16, 32\); got 5 rows"):
        st.attach_writer(str(root)).write_shard(1, keys(5, 16), x[16:21])
    m = coordinator.finalize(records)
    assert [s.labeled for s in m.shards] == [16, 16, 16, 16, 6]
    got = st.open_targets(root, verify="full")[:]
    assert torch.equal(bits(got["logits"]), bits(_zm(x, torch.bfloat16)))
    assert got["label"].tolist() == [i // SHARD for i in range(N)]


def test_writer_input_errors(tmp_path):
    w = st.create_targets(tmp_path / "e.zarr", num_classes=10, num_teachers=3, shard_rows=SHARD, block_rows=BLOCK)
    x = teacher_logits(4)
    with pytest.raises(ValueError, match=r"do not fit this per_teacher store, which takes \[B, 3, 10\]"):
        w.write(keys(4), x[:, :2])
    with pytest.raises(ValueError, match=r"duplicate sample keys: \['a'\]"):
        w.write(["a", "b", "a", "c"], x)
    w.write(keys(4), x)
    with pytest.raises(ValueError, match="duplicate sample keys"):
        w.write(keys(1), x[:1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        w.write(keys(4, 10), x, labels=[0, 1, 10, 2])
    with pytest.raises(ValueError, match="non-empty"):
        w.write(["p", "", "q", "r"], x)
    assert w.close().num_samples == 4
    with pytest.raises(RuntimeError, match="is closed"):
        w.write(keys(4, 20), x)
