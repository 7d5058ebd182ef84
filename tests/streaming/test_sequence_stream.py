"""Stage two over sequence stores: whole padded sequences and packed windows, aligned targets, exactly once
across ranks and DataLoader workers, resume (softtargets.streaming.sequences)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import softtargets as st
from tests.ddp import init_gloo, spawn_ranks
from tests.sequence_data import sequences, write_sequences
from tests.store_data import LAYOUTS, store_path

N_SEQ, WORLD, BATCH = 24, 2, 3


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("seq")
    return {layout: write_sequences(store_path(root, layout), sequences(N_SEQ), layout=layout) for layout in LAYOUTS}


def _check_aligned(s: st.SequenceStore, batch: dict, mode: str, length: int | None = None) -> None:
    """Every unmasked position of a batch holds its store row: input id, label and logits, in order."""
    for r, item in enumerate(batch["index"].tolist()):
        a, b = (int(s.offsets[item]), int(s.offsets[item + 1])) if mode == "sequences" else \
            (item * length, min((item + 1) * length, s.num_tokens))
        n = b - a
        rows = s.rows(a, b)
        assert batch["attention_mask"][r].tolist() == [True] * n + [False] * (batch["input_ids"].shape[1] - n)
        assert torch.equal(batch["input_ids"][r, :n], rows["input_ids"])
        assert torch.equal(batch["label"][r, :n], rows["label"])
        assert torch.equal(batch["teacher_logits"][r, :n], rows["logits"])
        assert (batch["label"][r, n:] == -1).all() and (batch["teacher_logits"][r, n:] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_sequences_once_per_epoch_padded_and_aligned(stores, layout):
    s = st.open_sequences(stores[layout])
    ds = st.stream_sequences(s, batch_size=5, seed=3)
    seen = []
    for batch in ds:
        _check_aligned(s, batch, "sequences")
        assert batch["input_ids"].shape[1] == max(s.lengths[i] for i in batch["index"].tolist())
        assert batch["key"] == [s.keys()[i] for i in batch["index"].tolist()]
        # the next position's input is this position's label (inside a sequence)
        m = batch["attention_mask"][:, 1:]
        assert torch.equal(batch["label"][:, :-1][m], batch["input_ids"][:, 1:][m])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(N_SEQ))
    assert ds.epoch == 1
    # deterministic shuffle: same seed and epoch, same order; another epoch, another order
    order = [b["index"].tolist() for b in st.stream_sequences(s, batch_size=5, seed=3)]
    assert [x for b in order for x in b] == seen
    ds2 = st.stream_sequences(s, batch_size=5, seed=3)
    ds2.set_epoch(1)
    assert [x for b in ds2 for x in b["index"].tolist()] != seen


def test_packed_windows_cover_every_row_once(stores):
    s = st.open_sequences(stores["zarr"])
    length = 16
    ds = st.stream_sequences(s, batch_size=4, mode="windows", length=length, seed=1)
    rows = []
    for batch in ds:
        _check_aligned(s, batch, "windows", length)
        assert batch["input_ids"].shape[1] == length
        for r, item in enumerate(batch["index"].tolist()):
            a = item * length
            n = int(batch["attention_mask"][r].sum())
            rows += range(a, a + n)
            # positions restart at each sequence start
            for t in range(n):
                seq = int((s.offsets <= a + t).sum()) - 1
                assert batch["position_ids"][r, t] == a + t - s.offsets[seq]
    assert sorted(rows) == list(range(s.num_tokens))


def test_resume_mid_epoch_with_workers(stores):
    s = st.open_sequences(stores["wds"])
    ds = st.stream_sequences(s, batch_size=2, seed=9)
    loader = ds.loader(num_workers=2, multiprocessing_context="fork")
    first = []
    for k, batch in enumerate(loader):
        first += batch["index"].tolist()
        if k == 4:
            break
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = st.stream_sequences(s, batch_size=2, seed=9)
    resumed.load_state_dict(state)
    assert len(resumed) == ds.batches_per_epoch - 5
    rest = [i for b in resumed.loader(num_workers=2, multiprocessing_context="fork") for i in b["index"].tolist()]
    assert sorted(first + rest) == list(range(N_SEQ))
    assert resumed.state_dict()["epoch"] == 1
    other = st.stream_sequences(s, batch_size=4, seed=9)
    with pytest.raises(ValueError, match="batch_size: saved 2, now 4"):
        other.load_state_dict(state)


def _rank_main(rank: int, port: int, urls: dict[str, str], out: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        result = {}
        for name, url in urls.items():
            for mode, length in (("sequences", None), ("windows", 16)):
                ds = st.stream_sequences(url, batch_size=BATCH, seed=4, mode=mode, length=length)
                seen, steps = [], 0
                for batch in ds.loader(num_workers=2, multiprocessing_context="fork", timeout=30):
                    total = batch["teacher_logits"].float().sum().reshape(1)
                    dist.all_reduce(total)  # a DDP step: a rank with fewer batches would hang here
                    seen += batch["index"].tolist()
                    steps += 1
                gathered: list = [None] * WORLD
                dist.all_gather_object(gathered, {"seen": seen, "steps": steps, "num_items": ds.num_items})
                result[f"{name}/{mode}"] = gathered
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_two_workers_exactly_once(stores, tmp_path):
    out = tmp_path / "result.json"
    spawn_ranks(_rank_main, stores, str(out), world=WORLD)
    result = json.loads(out.read_text())
    for name, ranks in result.items():
        n = ranks[0]["num_items"]
        counts = Counter(i for r in ranks for i in r["seen"])
        assert sorted(counts) == list(range(n)), name
        # remainder="pad": equal steps on every rank; at most WORLD - 1 items repeated
        assert ranks[0]["steps"] == ranks[1]["steps"], name
        assert sum(counts.values()) - n == (-n) % WORLD, name
        if n % WORLD == 0:
            assert set(counts.values()) == {1}, name
