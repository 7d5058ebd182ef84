"""with_targets: a map-style dataset joined with a real store by index and by key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import softtargets as st
from softtargets.streaming.joined import with_targets

N, C, K = 200, 10, 3


@pytest.fixture(scope="module", params=["zarr", "wds"])
def store(request, tmp_path_factory) -> st.TargetStore:
    g = torch.Generator().manual_seed(3)
    path = tmp_path_factory.mktemp("join") / f"t.{request.param}"
    w = st.create_targets(path, num_classes=C, num_teachers=K, layout=request.param, dtype="float16",
                          shard_rows=48, block_rows=16)
    labels = torch.randint(0, C, (N,), generator=g)
    labels[::4] = -1
    w.write([f"id-{i}" for i in range(N)], torch.randn(N, K, C, generator=g) * 2, labels)
    w.close()
    return st.open_targets(path)


class Pairs(Dataset):
    """Item i = (x, y) for the sample numbered order[i]; x carries the number."""

    def __init__(self, order: np.ndarray, with_label: bool = True):
        self.order, self.with_label = order, with_label

    def keys(self) -> list[str]:
        return [f"id-{i}" for i in self.order]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        x = torch.tensor([float(self.order[i]), 1.0])
        return (x, 100 + int(self.order[i])) if self.with_label else x


def test_join_by_index(store):
    joined = with_targets(Pairs(np.arange(N)), store, by="index", check_join=False)  # y = 100 + row, not the store's
    assert len(joined) == N
    x, y, v = joined[17]
    assert y == 117 and v.dtype == torch.float16 and v.shape == (K, C)
    assert torch.equal(v, store[17]["logits"])
    loader = DataLoader(joined, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0),
                        num_workers=2)
    seen = []
    for x, y, v in loader:
        rows = x[:, 0].long()
        assert v.shape == (len(rows), K, C) and v.dtype == torch.float16
        assert torch.equal(v, store.take(rows)["logits"]) and torch.equal(y, rows + 100)
        seen += rows.tolist()
    assert sorted(seen) == list(range(N))


def test_join_by_key_in_another_order(store):
    order = np.random.default_rng(1).permutation(N)[: N // 2]  # a subset, shuffled
    joined = with_targets(Pairs(order, with_label=False), store, by="key")
    x, y, v = joined[0]
    assert torch.equal(v, store[f"id-{order[0]}"]["logits"])
    assert y == store[int(order[0])]["label"]  # no label in the item: the store's (-1 = unlabelled)
    batch = joined.__getitems__(list(range(len(order))))
    for (x, y, v), row in zip(batch, order, strict=True):
        ref = store[int(row)]
        assert int(x[0]) == row and torch.equal(v, ref["logits"]) and y == ref["label"]


def test_join_errors(store):
    with pytest.raises(ValueError, match="200 rows"):
        with_targets(Pairs(np.arange(5)), store, by="index")
    with pytest.raises(KeyError, match="not in"):
        with_targets(Pairs(np.array([0, 1, 999])), store, by="key")
    with pytest.raises(ValueError, match="keys"):
        with_targets([torch.zeros(2)] * N, store, by="key")
