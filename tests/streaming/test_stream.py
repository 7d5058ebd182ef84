"""softtargets.stream over real zarr stores and real tar shards, with real DataLoader workers.

Stores: N=300 rows (not a multiple of anything used), C=10 classes, float16, shards of 64 rows,
blocks of 16; per-teacher [N, 2, C] and geometric [N, C] content; both layouts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import softtargets as st
from softtargets.streaming import stream, window
from softtargets.streaming.plan import EpochPlan, SplitConfig, Units
from tests.store_data import LAYOUTS

N, C, K = 300, 10, 2


def make_store(path: Path, layout: str, *, per_teacher: bool = True, dtype: str = "float16") -> Path:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, K, C, generator=g) * 3 if per_teacher else torch.randn(N, C, generator=g) * 3
    labels = torch.randint(0, C, (N,), generator=g)
    labels[::3] = -1
    w = st.create_targets(
        path, num_classes=C, content="per_teacher" if per_teacher else "geometric",
        num_teachers=K if per_teacher else 1, layout=layout, dtype=dtype, shard_rows=64, block_rows=16,
    )
    w.write([f"img-{i:04d}" for i in range(N)], x, labels)
    w.close()
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    out = {layout: make_store(root / f"pt.{layout}", layout) for layout in LAYOUTS}
    out.update({f"geo-{layout}": make_store(root / f"geo.{layout}", layout, per_teacher=False) for layout in LAYOUTS})
    return out


def indices(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def epoch_batches(ds, num_workers: int = 0) -> list[dict]:
    return list(ds.loader(num_workers=num_workers))


def check_rows(store: st.TargetStore, batch: dict) -> None:
    """The batch's rows are the store's rows, bit for bit, in the stored dtype."""
    ref = store.take(batch["index"])
    assert batch["teacher_logits"].dtype == ref["logits"].dtype == torch.float16
    assert torch.equal(batch["teacher_logits"].view(torch.int16), ref["logits"].view(torch.int16))
    assert torch.equal(batch["label"], ref["label"]) and batch["label"].dtype == torch.int64
    assert batch["key"] == ref["key"] == [f"img-{i:04d}" for i in batch["index"].tolist()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_every_sample_once_over_ranks_and_workers(stores, layout, remainder):
    store = st.open_targets(stores[layout])
    world = 4  # 300 = 4 * 75: 75 rows per rank, batches of 32 -> 3 batches each (last one 11 rows)
    per_rank = []
    for rank in range(world):
        ds = stream(store, batch_size=32, seed=3, rank=rank, world_size=world, remainder=remainder, buffer_size=64)
        if rank == 2:  # a plain DataLoader works too (one batch per item, no bundling)
            batches = list(DataLoader(ds, batch_size=None, num_workers=2))
        else:
            batches = epoch_batches(ds, num_workers=2 if rank == 1 else 0)
        for b in batches:
            check_rows(store, b)
        per_rank.append(batches)
    assert [len(b) for b in per_rank] == [3] * world
    seen = Counter(i for batches in per_rank for i in indices(batches))
    assert sorted(seen) == list(range(N)) and set(seen.values()) == {1}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_remainder_policies_give_equal_batch_counts(stores, layout):
    store = st.open_targets(stores[layout])
    world, bs = 7, 8  # 300 = 7 * 42 + 6
    for remainder, drop_last, rows, nb in [
        ("pad", False, 43, 6), ("drop", False, 42, 6), ("pad", True, 40, 5), ("drop", True, 40, 5),
    ]:
        per_rank = [
            epoch_batches(stream(store, batch_size=bs, seed=1, rank=r, world_size=world, remainder=remainder,
                                 drop_last=drop_last, buffer_size=16))
            for r in range(world)
        ]
        assert [len(b) for b in per_rank] == [nb] * world, (remainder, drop_last)
        assert {len(indices(b)) for b in per_rank} == {rows}
        if drop_last:
            assert {len(b["index"]) for batches in per_rank for b in batches} == {bs}
        seen = Counter(i for batches in per_rank for i in indices(batches))
        if remainder == "pad" and not drop_last:
            # 7 * 43 = 301 positions: every row once, one row (the epoch's first) twice.
            assert sorted(seen) == list(range(N)) and sorted(seen.values()) == [1] * (N - 1) + [2]
        else:
            assert set(seen.values()) == {1} and len(seen) == world * rows


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shuffle_is_deterministic_in_seed_and_epoch(stores, layout):
    store = st.open_targets(stores[layout])

    def order(seed: int, epoch: int, workers: int = 0) -> list[int]:
        ds = stream(store, batch_size=20, seed=seed, buffer_size=40)
        ds.set_epoch(epoch)
        return indices(epoch_batches(ds, workers))

    first = order(0, 0)
    assert sorted(first) == list(range(N)) and first != list(range(N))
    assert order(0, 0) == first
    assert order(0, 1) != first and sorted(order(0, 1)) == list(range(N))
    assert order(1, 0) != first
    # The batches are the same whatever the worker count; only their arrival order changes.
    by_workers = [
        sorted(tuple(b["index"].tolist()) for b in epoch_batches(stream(store, batch_size=20, buffer_size=40), w))
        for w in (0, 2)
    ]
    assert by_workers[0] == by_workers[1]
    # Unshuffled: store order.
    plain = stream(store, batch_size=20, shuffle=False)
    assert indices(epoch_batches(plain)) == list(range(N))


def test_iterating_again_moves_to_the_next_epoch(stores):
    ds = stream(stores["zarr"], batch_size=50, seed=5)
    e0 = indices(list(ds))
    assert ds.epoch == 1
    e1 = indices(list(ds))
    assert ds.epoch == 2 and e0 != e1
    ds.set_epoch(0)
    assert indices(list(ds)) == e0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_next_epochs_first_window_read_ahead_is_used_only_when_it_fits(stores, layout):
    """The main process reads the next epoch's first window during an epoch's last one: the epoch that
    follows must be exactly what a fresh stream gives, and a jump, a resume or a break must not use it."""
    store = st.open_targets(stores[layout])

    def fresh(epoch: int) -> list[tuple[list[int], list[str]]]:
        ds = stream(store, batch_size=20, seed=9, buffer_size=60)
        ds.set_epoch(epoch)
        return [(b["index"].tolist(), b["key"]) for b in ds.loader()]

    ds = stream(store, batch_size=20, seed=9, buffer_size=60)
    loader = ds.loader()
    seen = []
    for _ in range(3):  # 0, 1, 2 in turn: each following epoch starts from the window read ahead
        seen.append([(b["index"].tolist(), b["key"]) for b in loader])
    assert seen == [fresh(0), fresh(1), fresh(2)]
    ds.set_epoch(5)  # a jump: the window read ahead was epoch 3's
    assert [(b["index"].tolist(), b["key"]) for b in loader] == fresh(5)
    it = iter(loader)  # epoch 6: stop after one batch, save, resume elsewhere in the epoch
    next(it)
    state = ds.state_dict()
    del it
    again = stream(store, batch_size=20, seed=9, buffer_size=60)
    again.load_state_dict(state)
    assert [(b["index"].tolist(), b["key"]) for b in again.loader()] == fresh(6)[1:]
    for b in ds.loader():  # the stream that stopped goes on with the rest of epoch 6 as well
        check_rows(store, b)


def test_persistent_workers_follow_whole_epochs(stores):
    ds = stream(stores["zarr"], batch_size=32, seed=1)
    loader = ds.loader(num_workers=2, persistent_workers=True)
    for epoch in range(2):
        ref = stream(stores["zarr"], batch_size=32, seed=1)
        ref.set_epoch(epoch)
        got = sorted(tuple(b["index"].tolist()) for b in loader)
        assert got == sorted(tuple(b["index"].tolist()) for b in ref) and ds.epoch == epoch + 1
    ds.set_epoch(5)  # the workers' copies cannot follow a jump: refused, not silently wrong
    with pytest.raises(RuntimeError, match="persistent_workers"):
        next(iter(loader))


def test_windows_ramp_up_then_stay_full():
    """Windows of 160 rows (16 batches of 10): an epoch starts with windows of 2, 4 and 8 batches, then full ones;
    together they cover the rank's rows once, and window_of agrees with window_range."""
    units = Units.from_shards([(0, 1000)], 10, grouped=False)
    plan = EpochPlan(units, SplitConfig(batch_size=10, window=160), epoch=0, rank=0)
    ranges = [plan.window_range(k) for k in range(plan.window_of(plan.num_batches - 1) + 1)]
    assert ranges[:5] == [(0, 20), (20, 60), (60, 140), (140, 300), (300, 460)]
    assert ranges[-1] == (940, 1000) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert plan.window_of(np.arange(100)).tolist() == [k for k, (a, b) in enumerate(ranges) for _ in range(a // 10,
                                                                                                           b // 10)]
    assert [plan.window_of(j) for j in (0, 1, 2, 13, 14, 99)] == [0, 0, 1, 2, 3, 8]
    one = EpochPlan(units, SplitConfig(batch_size=10), epoch=0, rank=0)  # window = one batch: no ramp
    assert [one.window_range(k) for k in (0, 1, 99)] == [(0, 10), (10, 20), (990, 1000)]


def test_wds_units_never_leave_their_shard(stores):
    """wds: the epoch order visits each shard's rows in one run (a shard is decoded once)."""
    ds = stream(stores["wds"], batch_size=16, seed=11, buffer_size=16)
    for epoch in range(3):
        plan = ds.plan(epoch)
        shard_seq = [a // 64 for a, b in plan.segments(0, plan.rows_per_rank) for _ in range(a, b)]
        runs = [s for i, s in enumerate(shard_seq) if i == 0 or shard_seq[i - 1] != s]
        assert sorted(runs) == list(range(5))  # 5 shards, each in exactly one run
    z = stream(stores["zarr"], batch_size=16, seed=11, buffer_size=16).plan(0)
    zseq = [a // 64 for a, _ in z.segments(0, z.rows_per_rank)]
    assert len([s for i, s in enumerate(zseq) if i == 0 or zseq[i - 1] != s]) > 5  # zarr mixes blocks globally


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_mid_epoch_yields_exactly_the_rest(stores, layout):
    store = st.open_targets(stores[layout])
    kw = dict(batch_size=16, seed=2, rank=1, world_size=2, remainder="pad", buffer_size=48)
    full = stream(store, **kw)
    full.set_epoch(3)
    whole = Counter(indices(epoch_batches(full)))

    ds = stream(store, **kw)
    ds.set_epoch(3)
    taken = []
    for i, b in enumerate(ds.loader(num_workers=2)):
        taken.append(b)
        if i == 4:
            break
    state = ds.state_dict()
    assert state["epoch"] == 3 and len(ds) == ds.batches_per_epoch - 5
    for workers in (0, 1):  # resume with another worker count
        again = stream(store, **kw)
        again.load_state_dict(state)
        again.set_epoch(3)  # the resumed epoch keeps its progress
        rest = epoch_batches(again, workers)
        assert len(rest) == ds.batches_per_epoch - 5
        assert Counter(indices(taken)) + Counter(indices(rest)) == whole
        assert again.epoch == 4 and again.state_dict()["consumed"] == []


def test_resume_without_workers_and_state_checks(stores):
    kw = dict(batch_size=10, seed=9)
    ds = stream(stores["zarr"], **kw)
    it = iter(ds)
    head = [next(it) for _ in range(7)]
    state = ds.state_dict()
    assert state["consumed"] == [[0, 7]]
    again = stream(stores["zarr"], **kw)
    again.load_state_dict(state)
    assert indices(head) + indices(list(again)) == indices(list(stream(stores["zarr"], **kw)))
    other = stream(stores["zarr"], batch_size=20, seed=9)  # another batch size: the rest of the rows, elastically
    other.load_state_dict(state)
    assert sorted(indices(head) + indices(list(other))) == list(range(N))
    with pytest.raises(ValueError, match="the store differs from the saved one"):
        stream(stores["geo-zarr"], **kw).load_state_dict({**state, "config": {**state["config"], "num_samples": 1}})


@pytest.mark.parametrize("name", ["zarr", "wds", "geo-zarr", "geo-wds"])
def test_stored_dtype_and_shapes(stores, name):
    store = st.open_targets(stores[name])
    batches = epoch_batches(stream(store, batch_size=64, seed=0), 2)
    shape = (K, C) if not name.startswith("geo") else (C,)
    for b in batches:
        assert tuple(b["teacher_logits"].shape[1:]) == shape
        check_rows(store, b)
    assert sorted(indices(batches)) == list(range(N))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_stored_dtypes_bit_for_bit(tmp_path, dtype):
    want = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    for layout in LAYOUTS:
        store = st.open_targets(make_store(tmp_path / f"d.{layout}", layout, dtype=dtype))
        for b in epoch_batches(stream(store, batch_size=64, seed=0), 2):
            ref = store.take(b["index"])["logits"]
            assert b["teacher_logits"].dtype == ref.dtype == want
            assert torch.equal(b["teacher_logits"].view(torch.int16 if dtype == "bfloat16" else torch.int32),
                               ref.view(torch.int16 if dtype == "bfloat16" else torch.int32))


def test_bad_arguments(stores):
    with pytest.raises(ValueError, match="remainder"):
        stream(stores["zarr"], batch_size=8, remainder="wrap")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        stream(stores["zarr"], batch_size=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        stream(stores["zarr"], batch_size=8, rank=0)
    with pytest.raises(ValueError, match="buffer_size"):
        stream(stores["zarr"], batch_size=8, buffer_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        stream(stores["zarr"], batch_size=8).loader(batch_size=4)


# -- inputs beside the targets ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A wds sample-layout store with ``input.npy`` (float32 [6], [0] = row number) per row; logits = input @ W."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g)
    x[:, 0] = torch.arange(N, dtype=torch.float32)  # the row number, carried by the input itself
    w = torch.randn(6, C, generator=g)
    w[0] = 0  # the row number does not enter the logits
    path = tmp_path_factory.mktemp("packed") / "packed.wds"
    writer = st.create_targets(
        path, num_classes=C, content="geometric", layout="wds", sample_layout="sample", dtype="float16",
        shard_rows=64, inputs={"input.npy": "float32 [6] features", "meta.txt": "a note"},
    )
    writer.write([f"p{i}" for i in range(N)], x @ w, torch.arange(N) % C,
                 inputs=[{"input.npy": x[i].numpy(), "meta.txt": f"row {i}"} for i in range(N)])
    writer.close()
    return path, w


def test_packed_inputs_travel_with_their_targets(packed):
    path, w = packed
    for workers in (0, 2):
        batches = epoch_batches(stream(path, batch_size=32, seed=4, buffer_size=64), workers)
        assert sorted(indices(batches)) == list(range(N))
        for b in batches:
            x = b["input"]
            assert x.dtype == torch.float32 and x.shape == (len(b["index"]), 6)
            assert torch.equal(x[:, 0].long(), b["index"])
            want = x @ w
            want = want - want.mean(dim=1, keepdim=True)  # the store zero-means each row
            assert torch.allclose(want, b["teacher_logits"].float(), atol=1e-2)
            assert b["meta.txt"] == [f"row {i}".encode() for i in b["index"].tolist()]


def test_packed_inputs_custom_decode(packed):
    path, _ = packed

    def decode(members: dict[str, bytes]) -> dict:
        return {"note": members["meta.txt"].decode()}

    b = next(iter(stream(path, batch_size=8, seed=0, decode=decode)))
    assert b["note"] == [f"row {i}" for i in b["index"].tolist()] and "input" not in b


class Items(torch.utils.data.Dataset):
    """A map-style dataset of (x, y) whose items are in a different order than the store's rows."""

    def __init__(self, order: np.ndarray):
        self.order = order
        self.keys = [f"img-{i:04d}" for i in order]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return torch.full((3,), float(self.order[i])), int(self.order[i]) % C


def test_stream_joins_a_dataset_by_key_and_index(stores):
    shuffled = Items(np.random.default_rng(0).permutation(N))
    for by, items in (("key", shuffled), ("index", Items(np.arange(N)))):
        for workers in (0, 2):
            ds = stream(stores["wds"], batch_size=25, seed=1, dataset=items, by=by, check_join=False)  # y: not stored
            for b in epoch_batches(ds, workers):
                assert torch.equal(b["input"][:, 0].long(), b["index"])
    with pytest.raises(ValueError, match="300 rows"):
        stream(stores["zarr"], batch_size=8, dataset=Items(np.arange(10)), by="index")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_ahead_changes_timing_not_batches(stores, layout):
    """Reading the next window (and the next joined batch) on a thread yields the very same batches."""
    def run(read_ahead: bool) -> list[tuple]:
        ds = stream(stores[layout], batch_size=30, seed=4, buffer_size=90, dataset=Items(np.arange(N)),
                    read_ahead=read_ahead, check_join=False)
        out = []
        for _ in range(2):
            out += [(b["epoch"], b["batch_idx"], b["index"].tolist(), b["key"], b["input"][:, 0].tolist(),
                     b["teacher_logits"].view(torch.int16).tolist()) for b in ds.loader()]
        return out

    assert run(True) == run(False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slabs_hand_out_the_same_batches_as_whole_windows(stores, layout):
    """A window arranged in slabs of 2 batches (what bounds memory for big rows) gives the batches, bit for bit, that
    the whole window gives; with and without workers, shuffled and not."""
    store = st.open_targets(stores[layout])
    for shuffle, workers in ((True, 0), (True, 2), (False, 0)):
        whole = stream(store, batch_size=10, seed=4, buffer_size=60, shuffle=shuffle)
        assert whole.slab_rows >= whole.config.window_rows  # small rows: one slab per window
        slabs = stream(store, batch_size=10, seed=4, buffer_size=60, shuffle=shuffle)
        slabs.slab_rows = 20
        # Workers take turns by item (a slab's run of batches): arrival orders differ, the batches do not.
        a, b = (sorted(epoch_batches(ds, workers), key=lambda x: x["batch_idx"]) for ds in (whole, slabs))
        assert [x["batch_idx"] for x in a] == [x["batch_idx"] for x in b] == list(range(len(a)))
        assert indices(a) == indices(b) and sorted(indices(b)) == list(range(N))
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["teacher_logits"].view(torch.int16), y["teacher_logits"].view(torch.int16))
            check_rows(store, y)
    assert slabs.memory_bound_bytes < whole.memory_bound_bytes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_copies_on_several_threads_give_the_batches_of_one(stores, layout, monkeypatch):
    """A slab's pieces copied on 3 threads (every slab, however small) give the batches, bit for bit, of one
    thread: whole windows and slabs, shuffled and not."""
    store = st.open_targets(stores[layout])
    threads = torch.get_num_threads()

    def run(n: int, shuffle: bool, slab_rows: int | None) -> list[dict]:
        torch.set_num_threads(n)
        try:
            ds = stream(store, batch_size=10, seed=4, buffer_size=60, shuffle=shuffle)
            if slab_rows:
                ds.slab_rows = slab_rows
            return epoch_batches(ds, 0)
        finally:
            torch.set_num_threads(threads)

    monkeypatch.setattr(window, "PARALLEL_BYTES", 0)
    for shuffle, slab_rows in ((True, None), (True, 20), (False, None)):
        serial, parallel = run(1, shuffle, slab_rows), run(3, shuffle, slab_rows)
        assert indices(serial) == indices(parallel) and sorted(indices(parallel)) == list(range(N))
        for x, y in zip(serial, parallel, strict=True):
            assert torch.equal(x["teacher_logits"].view(torch.int16), y["teacher_logits"].view(torch.int16))
            check_rows(store, y)


def test_run_copies_raises_what_a_copy_on_another_thread_raised(monkeypatch):
    monkeypatch.setattr(window, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(window, "copy_threads", lambda: 3)
    done: list[int] = []

    def fail() -> None:
        raise ValueError("copy failed")

    copies = [(5, lambda: done.append(1)), (4, fail), (3, lambda: done.append(3))]
    with pytest.raises(ValueError, match="copy failed"):
        window.run_copies(copies, 8)
    assert sorted(done) == [1, 3]  # the others ran
