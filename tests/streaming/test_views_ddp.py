"""A views store under real torch.distributed: 2 gloo ranks x 2 DataLoader workers, zarr and wds (one spawn for
both). Over V epochs every (sample, view) pair is streamed exactly once, each epoch's view is the schedule's,
the joined input is the replay of the row's stored parameters, and a run stopped mid-epoch resumes with exactly
the pairs it had not consumed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import softtargets as st
from softtargets.math.augment import RandomView
from softtargets.store.views import ViewParams
from softtargets.streaming.views import epoch_view
from tests.ddp import init_gloo, spawn_ranks
from tests.store_data import LAYOUTS

N, D, C, V, B, WORLD = 64, 64, 10, 4, 8, 2
SEED, RESUME_SEED, RESUME_EPOCH, STOP_AFTER = 7, 9, 2, 3
AUG = RandomView(flip=0.5, degrees=20, translate=0.1, shape=(1, 8, 8), param_dtype="float16")


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(2)
    return torch.utils.data.TensorDataset(torch.rand(N, D, generator=g), torch.arange(N) % C)


def _loader(ds: st.TargetStream):
    return ds.loader(num_workers=2, multiprocessing_context="fork", timeout=30)


def _pairs(batch: dict) -> list[list[int]]:
    return [[s, v] for s, v in zip(batch["sample"].tolist(), batch["view"].tolist(), strict=True)]


def _epochs(url: str) -> list[dict]:
    """V whole epochs on this rank: each batch's (sample, view) pairs, rows, keys, and how far its input is from
    the replay of its rows' stored parameters."""
    data, params = dataset(), ViewParams(st.open_targets(url))
    out = []
    for epoch in range(V):
        ds = st.stream(url, batch_size=B, seed=SEED, buffer_size=16, dataset=data, replay=AUG.replay)
        assert (ds.rank, ds.world_size) == (dist.get_rank(), WORLD)
        ds.set_epoch(epoch)
        pairs, index, keys, worst = [], [], [], 0.0
        for batch in _loader(ds):
            total = batch["teacher_logits"].float().sum().reshape(1)
            dist.all_reduce(total)  # a DDP step: a rank with fewer batches would hang here
            pairs += _pairs(batch)
            index += batch["index"].tolist()
            keys += batch["key"]
            want = AUG.replay(data.tensors[0][batch["sample"]], params.take(batch["index"].numpy()))
            worst = max(worst, float((batch["input"] - want).abs().max()))
        out.append({"pairs": pairs, "index": index, "keys": keys, "worst": worst, "len": ds.batches_per_epoch})
    return out


def _resume(url: str) -> dict:
    """Epoch RESUME_EPOCH stopped after STOP_AFTER batches on every rank, then resumed from each rank's state."""
    data = dataset()
    ds = st.stream(url, batch_size=B, seed=RESUME_SEED, buffer_size=16, dataset=data, replay=AUG.replay)
    ds.set_epoch(RESUME_EPOCH)
    before = []
    for i, batch in enumerate(_loader(ds)):
        before += _pairs(batch)
        if i + 1 == STOP_AFTER:
            break
    state = ds.state_dict()
    again = st.stream(url, batch_size=B, seed=RESUME_SEED, buffer_size=16, dataset=data, replay=AUG.replay)
    again.load_state_dict(state)
    after = [p for batch in _loader(again) for p in _pairs(batch)]
    return {"before": before, "after": after, "epoch_after": again.epoch}


def _rank_main(rank: int, port: int, stores: dict[str, str], out: str) -> None:
    init_gloo(rank, port, WORLD)
    try:
        result = {}
        for layout, url in stores.items():
            for name, got in (("epochs", _epochs(url)), ("resume", _resume(url))):
                gathered: list = [None] * WORLD
                dist.all_gather_object(gathered, got)
                result[f"{layout}/{name}"] = gathered
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_views(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("views_ddp")
    torch.manual_seed(0)
    teachers = [torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))]
    stores = {}
    for layout in LAYOUTS:
        url = str(root / f"v.{layout}")
        # shards of 48 rows: the views' bounds (every 64 rows) fall inside shards
        st.precompute(teachers, dataset(), url, views=V, augment=AUG, seed=3, shard_rows=48, block_rows=16,
                      progress=False, num_workers=0)
        stores[layout] = url
    out = root / "result.json"
    spawn_ranks(_rank_main, stores, str(out), world=WORLD)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_v_epochs_stream_every_sample_view_pair_once_across_ranks_and_workers(ddp_views, layout):
    epochs = ddp_views[f"{layout}/epochs"]
    everything: Counter[tuple[int, int]] = Counter()
    for e in range(V):
        ranks = [r[e] for r in epochs]
        view = epoch_view(SEED, e, V)
        assert [len(r["pairs"]) for r in ranks] == [N // WORLD] * WORLD  # equal batches: no DDP hang
        assert [r["len"] for r in ranks] == [N // (WORLD * B)] * WORLD
        pairs = Counter((s, v) for r in ranks for s, v in r["pairs"])
        assert pairs == Counter((s, view) for s in range(N))  # every sample once, in this epoch's view
        for r in ranks:
            assert r["index"] == [v * N + s for s, v in r["pairs"]]
            assert r["keys"] == [f"{s}#{v}" for s, v in r["pairs"]]
            assert r["worst"] == 0.0  # the input is the replay of the row's stored parameters, bit for bit
        everything.update(pairs)
    assert everything == Counter((s, v) for s in range(N) for v in range(V))  # V epochs: every pair once


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_resumed_epoch_streams_exactly_the_unconsumed_pairs(ddp_views, layout):
    ranks = ddp_views[f"{layout}/resume"]
    view = epoch_view(RESUME_SEED, RESUME_EPOCH, V)
    before = [tuple(p) for r in ranks for p in r["before"]]
    after = [tuple(p) for r in ranks for p in r["after"]]
    assert len(before) == WORLD * STOP_AFTER * B
    assert len(after) == len(set(after)) and not set(before) & set(after)
    assert sorted(before + after) == [(s, view) for s in range(N)]
    assert [len(r["after"]) for r in ranks] == [N // WORLD - STOP_AFTER * B] * WORLD
    assert all(r["epoch_after"] == RESUME_EPOCH + 1 for r in ranks)
