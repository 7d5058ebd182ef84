"""Training helpers for specialists: half special, half other batches; labels over a subset and a dustbin;
a specialist started from the generalist's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import softtargets as st


def test_half_of_each_batch_comes_from_the_subset() -> None:
    labels = torch.arange(1000) % 10  # subset {3, 5} is 20 % of the rows
    sampler = st.SpecialistBatches(labels, [3, 5], batch_size=32, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 200 // 16 + (200 % 16 > 0)
    for b in batches:
        assert len(b) == 32 and sum(int(labels[i]) in (3, 5) for i in b) == 16
    special = [i for b in batches for i in b if int(labels[i]) in (3, 5)]
    assert len(set(special)) == 200  # each special row once per pass
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="rows of its classes"):
        st.SpecialistBatches(labels, [11], batch_size=8)
    # the factor by which the stream over-represents the subset, as the dustbin correction wants it
    assert st.oversampling_factor(0.2) == pytest.approx((0.5 / 0.2) / (0.5 / 0.8))


def test_specialist_labels_map_other_classes_to_the_dustbin() -> None:
    y = torch.tensor([3, 5, 0, 9, -1, 5])
    assert st.specialist_labels(y, [5, 3]).tolist() == [1, 0, 2, 2, -1, 0]


def test_a_specialist_starts_from_the_generalists_weights() -> None:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10))
    spec = st.specialist_from_generalist(gen, [7, 2, 4])
    x = torch.randn(5, 4)
    with torch.no_grad():
        zg, zs = gen(x), spec(x)
    assert zs.shape == (5, 4)
    assert torch.allclose(zs[:, :3], zg[:, [7, 2, 4]], atol=1e-6)
    assert spec[0].weight.data_ptr() != gen[0].weight.data_ptr()  # a copy: training it leaves the generalist
    assert torch.equal(spec[0].weight, gen[0].weight)
    # the dustbin starts near the log of the others' summed exp where they agree
    others = [i for i in range(10) if i not in (7, 2, 4)]
    lin = gen[2]
    with torch.no_grad():
        lin.weight[others] = lin.weight[others].mean(0)
        lin.bias[others] = lin.bias[others].mean()
        spec2 = st.specialist_from_generalist(gen, [7, 2, 4])
        assert torch.allclose(spec2(x)[:, 3], torch.logsumexp(gen(x)[:, others], 1), atol=1e-5)
    with pytest.raises(ValueError, match="distinct ids"):
        st.specialist_from_generalist(gen, [10])


def test_collapse_to_subset_sums_the_other_classes() -> None:
    lp = torch.log_softmax(torch.randn(3, 6, dtype=torch.float64), -1)
    out = st.collapse_to_subset(lp, [4, 1])
    p = lp.exp()
    assert torch.allclose(out.exp(), torch.stack([p[:, 4], p[:, 1], p[:, [0, 2, 3, 5]].sum(1)], 1))
    assert np.allclose(out.exp().sum(1).numpy(), 1)
