"""Elastic resume under real torch.distributed (2 gloo processes on 127.0.0.1, one spawn for both layouts):
a state saved with 1 rank resumes on 2 ranks, states saved by 2 ranks resume on 1, with other batch sizes and
DataLoader worker counts; every row of the epoch is consumed once (padding aside), before or after the resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from softtargets.streaming import stream
from tests.ddp import init_gloo, spawn_ranks
from tests.store_data import LAYOUTS, store_path, write_store

C, N, WORLD = 10, 301, 2


def _rank_main(rank: int, port: int, stores: dict[str, str], saved: dict[str, dict], out: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        result: dict[str, dict] = {}
        for layout, store in stores.items():
            # 1 -> 2: the rest of a one-rank epoch, batch 16 -> 12, no workers -> 1 worker per rank.
            ds = stream(store, batch_size=12, seed=5)
            ds.load_state_dict(saved[layout])
            seen = []
            for batch in ds.loader(num_workers=1, multiprocessing_context="fork", timeout=30):
                total = batch["teacher_logits"].float().sum().reshape(1)
                dist.all_reduce(total)  # a DDP step: both ranks have the same number of batches
                seen += batch["index"].tolist()
            grown: list = [None] * WORLD
            dist.all_gather_object(grown, {"seen": seen, "epoch": ds.epoch})
            # A two-rank run that stops after 4 steps (2 workers each) and saves its state on every rank.
            ds = stream(store, batch_size=16, seed=7, buffer_size=48)
            taken = []
            for i, batch in enumerate(ds.loader(num_workers=2, multiprocessing_context="fork", timeout=30)):
                taken += batch["index"].tolist()
                if i == 3:
                    break
            states: list = [None] * WORLD
            dist.all_gather_object(states, {"state": ds.state_dict(), "taken": taken})
            result[layout] = {"grown": grown, "two": states}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def elastic(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    root = tmp_path_factory.mktemp("elastic")
    stores, saved, before = {}, {}, {}
    for layout in LAYOUTS:
        path = str(store_path(root, layout))
        write_store(path, torch.randn(N, C, generator=torch.Generator().manual_seed(0)), layout=layout,
                    content="geometric", dtype="float16", shard_rows=64, block_rows=16)
        stores[layout] = path
        ds = stream(path, batch_size=16, seed=5, rank=0, world_size=1)
        it = iter(ds)
        before[layout] = [i for _ in range(7) for i in next(it)["index"].tolist()]
        saved[layout] = ds.state_dict()
    out = root / "result.json"
    spawn_ranks(_rank_main, stores, saved, str(out), world=WORLD)
    return stores, before, json.loads(out.read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_rank_resumed_on_two(elastic: tuple[dict, dict, dict], layout: str) -> None:
    _, before, result = elastic
    grown = result[layout]["grown"]
    after = Counter(i for r in grown for i in r["seen"])
    assert len(before[layout]) == 7 * 16 and not set(before[layout]) & set(after)
    rest = N - 7 * 16  # 189 rows left, 95 per rank with pad: the rest's first row twice
    assert sorted(after) == sorted(set(range(N)) - set(before[layout]))
    assert sum(after.values()) == 2 * 95 and sorted(after.values())[-1] == 2 and len(after) == rest
    assert [len(r["seen"]) for r in grown] == [95, 95] and [r["epoch"] for r in grown] == [1, 1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ranks_resumed_on_one_with_another_batch_size(elastic: tuple[dict, dict, dict], layout: str) -> None:
    stores, _, result = elastic
    two = result[layout]["two"]
    taken = [i for r in two for i in r["taken"]]
    states = [r["state"] for r in two]
    # 2 workers hand out batches of two windows in turn: 4 batches consumed per rank, not 0-3.
    assert [sum(b - a for a, b in s["consumed"]) for s in states] == [4, 4] and len(taken) == 2 * 4 * 16
    assert states[0]["consumed"] == states[1]["consumed"]  # lockstep
    for given in (states, states[0]):  # every rank's state, or one for all (the ranks ran in lockstep)
        ds = stream(stores[layout], batch_size=10, seed=7, rank=0, world_size=1)
        ds.load_state_dict(given)
        batches = list(ds)
        after = [i for b in batches for i in b["index"].tolist()]
        assert len(after) == len(set(after)) and not set(after) & set(taken)
        assert set(after) | set(taken) == set(range(N))  # the old epoch padded one row: it is taken once
        assert [len(b["index"]) for b in batches[:-1]] == [10] * (len(batches) - 1)
        assert ds.epoch == 1  # the rest done: the next epoch is a whole one
        assert ds.batches_per_epoch == -(-N // 10)
