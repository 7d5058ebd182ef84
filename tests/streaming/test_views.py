"""Stage two over a views store: each epoch streams one view of every sample, exactly once across ranks and
DataLoader workers, resumable mid-epoch; the epoch-to-view schedule covers every view; the joined input is
replayed into the view the targets belong to."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import softtargets as st
from softtargets.math.augment import RandomView
from softtargets.store.views import ViewParams
from softtargets.streaming.views import ViewStream, epoch_view, view_schedule

N, D, C, V, B = 48, 64, 10, 4, 8
AUG = RandomView(flip=0.5, degrees=20, translate=0.1, shape=(1, 8, 8), param_dtype="float16")


def teachers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)) for _ in range(2)]


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(2)
    return torch.utils.data.TensorDataset(torch.rand(N, D, generator=g), torch.arange(N) % C)


@pytest.fixture(scope="module", params=["zarr", "wds"])
def views_store(request, tmp_path_factory) -> str:
    url = tmp_path_factory.mktemp("views") / f"v.{request.param}"
    st.precompute(teachers(), dataset(), url, views=V, augment=AUG, seed=3, shard_rows=32, progress=False,
                  num_workers=0)
    return str(url)


@pytest.mark.parametrize("count", [1, 4, 16, 64])
def test_every_cycle_of_v_epochs_covers_every_view_once(count):
    schedule = view_schedule(seed=11, epochs=3 * count, count=count)
    for cycle in range(3):
        assert sorted(schedule[cycle * count:(cycle + 1) * count]) == list(range(count))
    if count >= 4:  # cycles visit the views in other orders, and other seeds give other schedules
        assert schedule[:count] != schedule[count:2 * count]
        assert view_schedule(seed=12, epochs=count, count=count) != schedule[:count]


def test_each_epoch_gives_every_sample_once_across_ranks_and_workers(views_store):
    ds, ts = dataset(), teachers()
    params = ViewParams(st.open_targets(views_store))
    for epoch in range(V):
        seen: Counter[int] = Counter()
        batches = []
        for rank in range(2):
            s = st.stream(views_store, batch_size=B, seed=7, rank=rank, world_size=2, buffer_size=16, dataset=ds,
                          replay=AUG.replay)
            assert isinstance(s, ViewStream)
            s.set_epoch(epoch)
            got = list(s.loader(num_workers=2, multiprocessing_context="fork"))
            assert len(got) == s.batches_per_epoch == N // (2 * B)
            batches += got
            seen.update(i for b in got for i in b["sample"].tolist())
        assert seen == Counter(range(N))  # every sample once
        view = epoch_view(7, epoch, V)
        for b in batches:
            assert (b["view"] == view).all()
            assert torch.equal(b["index"], b["sample"] + view * N)
            stored = params.take(b["index"].numpy())
            assert all(torch.equal(b["view_params"][k], stored[k]) for k in stored)
            assert b["key"] == [f"{i}#{view}" for i in b["sample"].tolist()]
            # the replayed input is the view the teachers saw: they give the stored logits again
            with torch.no_grad():
                ref = torch.stack([t(b["input"]) for t in ts], dim=1)
            torch.testing.assert_close(b["teacher_logits"].float(), ref - ref.mean(-1, keepdim=True), atol=1e-2,
                                       rtol=1e-3)
    assert {epoch_view(7, e, V) for e in range(V)} == set(range(V))


def test_a_resumed_epoch_gives_the_samples_not_yet_consumed(views_store):
    s = st.stream(views_store, batch_size=B, seed=1, buffer_size=16)
    s.set_epoch(2)
    it = iter(s.loader(num_workers=2, multiprocessing_context="fork"))
    first = [next(it) for _ in range(2)]
    state = s.state_dict()
    del it
    again = st.stream(views_store, batch_size=B, seed=1, buffer_size=16)
    again.load_state_dict(state)
    rest = list(again.loader(num_workers=2, multiprocessing_context="fork"))
    samples = [i for b in first + rest for i in b["sample"].tolist()]
    assert sorted(samples) == list(range(N))
    assert {int(v) for b in first + rest for v in b["view"]} == {epoch_view(1, 2, V)}
    other = st.stream(views_store, batch_size=B, seed=2, buffer_size=16)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_a_dataset_joins_by_sample_key(views_store):
    ds = dataset()
    keyed = [(x, int(y), f"k{i}") for i, (x, y) in enumerate(zip(*ds.tensors, strict=True))]
    s = st.stream(views_store, batch_size=B, seed=0, dataset=[(x, y) for x, y, _ in reversed(keyed)], by="key",
                  dataset_keys=[str(i) for i in reversed(range(N))], replay=AUG.replay)
    batch = next(iter(s))
    want = AUG.replay(ds.tensors[0][batch["sample"]], batch["view_params"])
    torch.testing.assert_close(batch["input"], want, atol=0, rtol=0)


def test_replay_is_for_views_stores(tmp_path):
    url = tmp_path / "plain.zarr"
    st.precompute(teachers(), dataset(), url, progress=False, num_workers=0)
    with pytest.raises(ValueError, match="views stores"):
        st.stream(url, batch_size=B, replay=AUG.replay)
    with pytest.raises(st.StoreError, match="not a views store"):
        ViewStream(st.open_targets(url), batch_size=B)


def test_batches_without_a_dataset_carry_views_and_parameters(views_store):
    s = st.stream(views_store, batch_size=B, seed=0, shuffle=False)
    s.set_epoch(5)
    batch = next(iter(s))
    view = epoch_view(0, 5, V)
    assert batch["index"].tolist() == list(range(view * N, view * N + B))
    assert sorted(batch["view_params"]) == ["angle", "flip", "tx", "ty"]
    assert batch["view_params"]["flip"].dtype == torch.uint8
    assert batch["view_params"]["angle"].dtype == torch.float16
    assert np.isin(batch["view_params"]["flip"].numpy(), [0, 1]).all()


def test_with_targets_joins_and_replays_the_view_stream_gives(views_store):
    ds = dataset()
    joined = st.with_targets(ds, views_store, replay=AUG.replay, seed=7)
    assert isinstance(joined, st.ViewTargetJoin) and len(joined) == N
    # workers that persist across epochs follow set_epoch (the epoch is in shared memory)
    loader = torch.utils.data.DataLoader(joined, batch_size=B, num_workers=2, multiprocessing_context="fork",
                                         persistent_workers=True)
    for epoch in (0, 1, 5):
        s = st.stream(views_store, batch_size=B, seed=7, dataset=ds, replay=AUG.replay)
        s.set_epoch(epoch)
        streamed = {int(i): (x, lg) for b in s for i, x, lg in zip(b["sample"], b["input"], b["teacher_logits"],
                                                                   strict=True)}
        joined.set_epoch(epoch)
        assert joined.view == epoch_view(7, epoch, V)
        # through DataLoader workers, in batches (__getitems__), and one item at a time (__getitem__)
        batched = [(x, lg) for xb, _, lb in loader for x, lg in zip(xb, lb, strict=True)]
        assert len(batched) == N
        for i in range(N):
            x, y, lg = joined[i]
            assert y == i % C
            for got_x, got_lg in ((x, lg), batched[i]):
                torch.testing.assert_close(got_x, streamed[i][0], atol=0, rtol=0)
                torch.testing.assert_close(got_lg, streamed[i][1], atol=0, rtol=0)


def test_with_targets_over_a_views_store_joins_by_sample_key_and_refuses_replay_elsewhere(views_store, tmp_path):
    ds = dataset()
    keys = [str(i) for i in range(N)]
    by_key = st.with_targets(list(zip(*ds.tensors, strict=True))[::-1], views_store, by="key", keys=keys[::-1],
                             replay=AUG.replay, seed=3)
    by_index = st.with_targets(ds, views_store, replay=AUG.replay, seed=3)
    for j in (by_key, by_index):
        j.set_epoch(2)
    for i in (0, 17, N - 1):
        x, _, lg = by_key[N - 1 - i]
        want_x, _, want_lg = by_index[i]
        torch.testing.assert_close(x, want_x, atol=0, rtol=0)
        torch.testing.assert_close(lg, want_lg, atol=0, rtol=0)
    raw = st.with_targets(ds, views_store, seed=3)  # no replay: the targets of the epoch's view, the clean input
    raw.set_epoch(2)
    assert torch.equal(raw[5][0], ds.tensors[0][5]) and torch.equal(raw[5][2], by_index[5][2])
    with pytest.raises(ValueError, match="48 samples"):
        st.with_targets(torch.utils.data.TensorDataset(torch.zeros(N * V, D)), views_store)
    plain = tmp_path / "plain.zarr"
    st.precompute(teachers(), ds, plain, progress=False, num_workers=0)
    with pytest.raises(ValueError, match="views stores"):
        st.with_targets(ds, plain, replay=AUG.replay)
