"""Eq. 5 (generalist + specialists) against an independent optimiser, the dustbin correction against Bayes'
rule, the active specialists, and the class-subset math (streaming covariance, clustering, confusability)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from softtargets.math.class_subsets import (
    StreamingCovariance,
    confusability,
    online_kmeans,
    spectral_clusters,
    subsets_from_clusters,
)
from softtargets.math.hints import hint_loss
from softtargets.math.specialists import (
    active_specialists,
    combine_specialists,
    dustbin_corrected,
    eq5_objective,
    membership,
    oversampling_factor,
)


def _problem(seed: int, b: int, c: int, subsets: list[list[int]], scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    pg = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * scale, -1)
    ps = [torch.softmax(torch.randn(b, len(s) + 1, generator=g, dtype=torch.float64) * scale, -1) for s in subsets]
    return pg, ps


def _reference(pg: np.ndarray, ps: list[np.ndarray], subsets: list[list[int]], active: np.ndarray) -> np.ndarray:
    """Eq. 5 for one row by scipy (softmax parametrisation, BFGS from several starts): the optimum's objective."""
    c = len(pg)

    def objective(z: np.ndarray) -> float:
        q = np.exp(z - z.max())
        q /= q.sum()
        val = float(np.sum(pg * (np.log(pg) - np.log(q))))
        for m, s in enumerate(subsets):
            if active[m]:
                qm = np.append(q[s], 1.0 - q[s].sum())
                val += float(np.sum(ps[m] * (np.log(ps[m]) - np.log(np.clip(qm, 1e-300, None)))))
        return val

    best = math.inf
    rng = np.random.default_rng(0)
    for start in [np.log(pg)] + [rng.normal(size=c) for _ in range(3)]:
        res = scipy.optimize.minimize(objective, start, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000})
        best = min(best, float(res.fun))
    return np.float64(best)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eq5_reaches_the_optimum_of_an_independent_optimiser(seed: int) -> None:
    subsets = [[0, 1, 2], [2, 3], [4, 5, 6]]  # overlapping subsets
    b, c = 6, 7
    pg, ps = _problem(seed, b, c, subsets)
    member = membership(subsets, c)
    active = torch.rand(b, len(subsets), generator=torch.Generator().manual_seed(seed + 9)) < 0.7
    active[0] = True
    active[1] = False
    sol = combine_specialists(pg, ps, member, active, tol=1e-10)
    assert float(sol.residual.max()) < 1e-10
    q = sol.log_q.double().exp()
    assert torch.allclose(q.sum(1), torch.ones(b, dtype=torch.float64), atol=1e-6)
    ours = eq5_objective(q, pg, ps, member, active)
    for row in range(b):
        ref = _reference(pg[row].numpy(), [p[row].numpy() for p in ps], subsets, active[row].numpy())
        assert ours[row].item() == pytest.approx(float(ref), abs=2e-6)
        assert ours[row].item() >= float(ref) - 2e-6  # no better than the optimum: the objective is computed right
    # a row with no active specialist keeps the generalist's distribution
    assert torch.allclose(q[1], pg[1], atol=1e-6)


def test_eq5_on_three_classes_matches_a_grid_search() -> None:
    subsets = [[0], [1, 2]]
    pg, ps = _problem(5, 1, 3, subsets, scale=1.5)
    member = membership(subsets, 3)
    active = torch.ones(1, 2, dtype=torch.bool)
    sol = combine_specialists(pg, ps, member, active, tol=1e-12)
    n = 800
    a, b_ = np.meshgrid(np.arange(1, n) / n, np.arange(1, n) / n, indexing="ij")
    ok = a + b_ < 1
    grid = torch.tensor(np.stack([a[ok], b_[ok], 1 - a[ok] - b_[ok]], 1))
    obj = eq5_objective(grid, pg.expand(len(grid), 3), [p.expand(len(grid), -1) for p in ps], member,
                        active.expand(len(grid), 2))
    ours = eq5_objective(sol.log_q.double().exp(), pg, ps, member, active)
    assert ours.item() <= obj.min().item() + 1e-9
    assert np.allclose(sol.log_q.double().exp()[0].numpy(), grid[obj.argmin()].numpy(), atol=2 / n)


def test_eq5_agrees_with_specialists_that_agree_with_the_generalist() -> None:
    """When each specialist says exactly what the generalist implies for its subset, q is the generalist."""
    subsets = [[0, 1], [3, 4, 5]]
    pg, _ = _problem(3, 4, 6, subsets)
    ps = [torch.cat([pg[:, s], 1 - pg[:, s].sum(1, keepdim=True)], 1) for s in subsets]
    sol = combine_specialists(pg, ps, membership(subsets, 6), torch.ones(4, 2, dtype=torch.bool), tol=1e-12)
    assert torch.allclose(sol.log_q.double().exp(), pg, atol=1e-6)


def test_eq5_refuses_a_specialist_output_of_the_wrong_width() -> None:
    subsets = [[0, 1, 2]]
    pg, _ = _problem(0, 2, 5, subsets)
    with pytest.raises(ValueError, match=r"expected \[2, 4\] \(its classes and a dustbin\)"):
        combine_specialists(pg, [torch.full((2, 3), 1 / 3)], membership(subsets, 5), torch.ones(2, 1, dtype=torch.bool))


def test_membership_refuses_unknown_and_repeated_classes() -> None:
    with pytest.raises(ValueError, match=r"names classes \[10\] outside \[0, 10\)"):
        membership([[1, 10]], 10)
    with pytest.raises(ValueError, match="twice"):
        membership([[1, 1]], 10)


def test_active_specialists_are_those_meeting_the_generalists_top_classes() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.05, 0.05, 0.1, 0.8]])
    member = membership([[1], [2, 3], [0]], 4)
    assert active_specialists(probs, member, top=1).tolist() == [[False, False, True], [False, True, False]]
    assert active_specialists(probs, member, top=2).tolist() == [[True, False, True], [False, True, False]]


def test_dustbin_correction_is_bayes_rule_for_the_oversampled_prior() -> None:
    """Three Gaussian classes on a line; the specialist owns class 0. Trained where class 0 is 4x as frequent
    (relative to the dustbin) as in the transfer set, its exact posterior, corrected, is the transfer set's."""
    means, x = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64), torch.linspace(-2, 4, 25, dtype=torch.float64)
    loglik = -0.5 * (x[:, None] - means) ** 2
    prior = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)

    def specialist_logits(pr: torch.Tensor) -> torch.Tensor:
        joint = loglik + pr.log()
        return torch.stack([joint[:, 0], torch.logsumexp(joint[:, 1:], 1)], 1)  # class 0, dustbin

    f = oversampling_factor(0.1, special_share=0.5)  # half of the specialist's data from class 0
    assert f == pytest.approx((0.5 / 0.1) / (0.5 / 0.9))
    trained = prior * torch.tensor([0.5 / 0.1, 0.5 / 0.9, 0.5 / 0.9], dtype=torch.float64)  # its training prior
    corrected = torch.softmax(dustbin_corrected(specialist_logits(trained), f), -1)
    natural = torch.softmax(specialist_logits(prior), -1)
    assert torch.allclose(corrected, natural, atol=1e-12)
    assert not torch.allclose(torch.softmax(specialist_logits(trained), -1), natural, atol=1e-2)
    with pytest.raises(ValueError, match="oversample"):
        dustbin_corrected(specialist_logits(prior), 0.0)


def test_streaming_covariance_equals_the_in_memory_one() -> None:
    rng = np.random.default_rng(0)
    p = torch.softmax(torch.tensor(rng.normal(size=(1000, 12)) * 3), -1)
    acc = StreamingCovariance(12)
    for lo in range(0, 1000, 37):  # uneven batches
        acc.update(p[lo:lo + 37].float())
    ref = np.cov(p.float().double().numpy(), rowvar=False, bias=True)
    assert acc.count == 1000
    assert np.allclose(acc.covariance(), ref, atol=1e-12, rtol=1e-9)
    assert np.allclose(acc.second_moment(), p.float().double().numpy().T @ p.float().double().numpy() / 1000,
                       atol=1e-12)


def _confusable_predictions(seed: int = 0) -> np.ndarray:
    """Predictions over 9 classes in three groups {0,1,2}, {3,4,5}, {6,7,8}: mass spread within a group."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(600):
        g = rng.integers(3)
        z = np.full(9, -6.0)
        z[3 * g:3 * g + 3] = rng.normal(size=3) * 1.5
        rows.append(np.exp(z) / np.exp(z).sum())
    return np.array(rows)


@pytest.mark.parametrize("method", ["kmeans", "spectral"])
def test_clustering_the_covariance_finds_the_confusable_groups(method: str) -> None:
    p = _confusable_predictions()
    acc = StreamingCovariance(9)
    acc.update(p)
    cov = acc.covariance()
    labels = online_kmeans(cov, 3, seed=1) if method == "kmeans" else spectral_clusters(acc.second_moment(), 3)
    found = sorted(subsets_from_clusters(cov, labels, 3))
    assert found == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    scores = [confusability(acc.second_moment(), s) for s in found]
    mixed = confusability(acc.second_moment(), [0, 3, 6])
    assert min(scores) > 0.2 and mixed < 0.01


def test_hint_loss_is_half_the_mean_squared_distance() -> None:
    reg = torch.nn.Linear(3, 2)
    s, t = torch.randn(4, 3), torch.randn(4, 2).half()
    want = 0.5 * ((reg(s) - t.float()) ** 2).sum(1).mean()
    assert torch.allclose(hint_loss(s, t, reg), want)
    with pytest.raises(ValueError, match="regressor"):
        hint_loss(s, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eq5_on_the_device_equals_the_cpu_solution() -> None:
    subsets = [[0, 1, 2], [2, 3], [4, 5, 6]]
    pg, ps = _problem(4, 512, 7, subsets)
    member = membership(subsets, 7)
    active = torch.rand(512, 3, generator=torch.Generator().manual_seed(1)) < 0.6
    cpu = combine_specialists(pg, ps, member, active, tol=1e-9)
    dev = combine_specialists(pg.cuda(), [p.cuda() for p in ps], member.cuda(), active.cuda(), tol=1e-9)
    assert dev.log_q.device.type == "cuda" and float(dev.residual.max()) < 1e-9
    assert torch.allclose(dev.log_q.cpu(), cpu.log_q, atol=1e-6)


def test_a_small_cluster_is_completed_by_the_classes_confused_with_it() -> None:
    """Cluster {0} of a 6-class problem where 0 is confused with 4 and 5 only: its subset of 3 is {0, 4, 5}
    (the nearest-column rule would take whichever columns lie near its centroid)."""
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(500):
        z = np.full(6, -6.0)
        pair = [0, 4, 5] if rng.random() < 0.3 else [int(rng.integers(1, 4))]
        z[pair] = rng.normal(size=len(pair))
        rows.append(np.exp(z) / np.exp(z).sum())
    p = np.array(rows)
    acc = StreamingCovariance(6)
    acc.update(p)
    labels = np.array([0, 1, 1, 1, 1, 1])
    assert subsets_from_clusters(acc.covariance(), labels, 3, acc.second_moment())[0] == [0, 4, 5]
