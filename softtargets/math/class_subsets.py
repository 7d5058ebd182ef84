"""Class subsets for specialists (Hinton et al. 2015, §5): the covariance of a generalist's predictions,
computed streaming, clustered into confusable subsets — torch and numpy only.

* :class:`StreamingCovariance` accumulates the ``[C, C]`` covariance of predicted distributions batch by
  batch (Chan et al.'s pairwise update, float64): memory ``O(C^2)`` whatever the number of rows; the
  result equals the in-memory ``np.cov(P, rowvar=False, bias=True)`` to rounding.
* :func:`online_kmeans` clusters the covariance's columns (the paper's method: MacQueen's online
  K-means, one centroid update per column visited); :func:`spectral_clusters` offers a second method
  (a spectral embedding of the columns' non-negative similarity, then K-means on it).
* :func:`subsets_from_clusters` turns M clusters into M subsets of exactly S classes (grown from each cluster
  by co-prediction, or each centroid's S nearest columns; subsets may overlap), and :func:`confusability`
  scores each subset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class StreamingCovariance:
    """Covariance of rows ``p [C]`` seen in batches: ``cov = E[(p - mean)(p - mean)^T]`` (population, bias=True).

    Args:
        num_classes: C.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.count = 0
        self.mean = np.zeros(self.num_classes, np.float64)
        self._m2 = np.zeros((self.num_classes, self.num_classes), np.float64)  # sum of centred outer products

    def update(self, probs: torch.Tensor | np.ndarray) -> None:
        """Add a batch ``[B, C]`` (any float dtype)."""
        p = probs.detach().cpu().to(torch.float64).numpy() if isinstance(probs, torch.Tensor) else \
            np.asarray(probs, np.float64)
        if p.ndim != 2 or p.shape[1] != self.num_classes:
            raise ValueError(f"expected a batch [B, {self.num_classes}], got {list(p.shape)}")
        n_b = p.shape[0]
        if n_b == 0:
            return
        mean_b = p.mean(0)
        centred = p - mean_b
        m2_b = centred.T @ centred
        n = self.count + n_b
        delta = mean_b - self.mean
        self._m2 += m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.mean += delta * (n_b / n)
        self.count = n

    def covariance(self) -> np.ndarray:
        """``[C, C]`` float64 population covariance of the rows added so far."""
        if self.count == 0:
            raise ValueError("no rows added")
        return self._m2 / self.count

    def second_moment(self) -> np.ndarray:
        """``[C, C]`` float64 ``E[p p^T]`` (covariance plus the outer product of the mean)."""
        return self.covariance() + np.outer(self.mean, self.mean)


def online_kmeans(columns: np.ndarray, clusters: int, *, seed: int = 0, passes: int = 20) -> np.ndarray:
    """MacQueen's online K-means over the rows of ``columns`` (``[C, D]``: here the covariance's columns).

    Centroids start at ``clusters`` rows chosen by k-means++ seeding; then, for ``passes`` passes in a
    seeded random order, each row moves its nearest centroid toward it by ``1 / (rows it has taken)``.

    Returns:
        ``[C]`` int64: each row's cluster (by nearest final centroid), in ``[0, clusters)``.
    """
    x = np.asarray(columns, np.float64)
    c = x.shape[0]
    if not 1 <= clusters <= c:
        raise ValueError(f"clusters must lie in [1, {c}], got {clusters}")
    rng = np.random.default_rng(seed)
    centroids = _kmeanspp(x, clusters, rng)
    counts = np.ones(clusters)
    for _ in range(passes):
        for i in rng.permutation(c):
            k = int(((centroids - x[i]) ** 2).sum(1).argmin())
            counts[k] += 1
            centroids[k] += (x[i] - centroids[k]) / counts[k]
    return ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1).astype(np.int64)


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [int(rng.integers(len(x)))]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - x[chosen][None]) ** 2).sum(-1).min(1)
        total = d2.sum()
        nxt = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(nxt)
    return x[chosen].copy()


def spectral_clusters(second_moment: np.ndarray, clusters: int, *, seed: int = 0) -> np.ndarray:
    """A second method: classes as nodes of a graph weighted by their normalised co-prediction
    ``E[p_i p_j] / sqrt(E[p_i^2] E[p_j^2])`` (off the diagonal), embedded by the leading eigenvectors of the
    normalised affinity, rows normalised, then clustered by :func:`online_kmeans`.

    Returns:
        ``[C]`` int64 cluster of each class.
    """
    s = np.asarray(second_moment, np.float64)
    d = np.sqrt(np.clip(np.diag(s), 1e-300, None))
    a = s / np.outer(d, d)
    np.fill_diagonal(a, 0.0)
    deg = np.clip(a.sum(1), 1e-300, None)
    norm = a / np.sqrt(np.outer(deg, deg))
    _, vecs = np.linalg.eigh(norm)
    emb = vecs[:, -clusters:]
    emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-300, None)
    return online_kmeans(emb, clusters, seed=seed)


def subsets_from_clusters(columns: np.ndarray, labels: np.ndarray, size: int,
                          second_moment: np.ndarray | None = None) -> list[list[int]]:
    """M subsets of exactly ``size`` classes, one per non-empty cluster, in order of cluster id; each sorted by
    class id. Subsets may overlap.

    Without ``second_moment``: each cluster's ``size`` rows of ``columns`` nearest its centroid (the cluster's
    mean). With it (``E[p p^T]``): grown greedily from the member nearest the centroid, each step adding the
    class most co-predicted with the subset so far, ``sum_{i in subset} E[p_i p_j] / sqrt(E[p_i^2] E[p_j^2])``,
    the cluster's own members first; so a cluster smaller than ``size`` is completed by the classes the
    generalist confuses with it, not by classes that merely lie near every centroid.

    Args:
        columns: ``[C, D]`` what was clustered (the covariance's columns).
        labels: ``[C]`` cluster of each row.
        size: S, in ``[1, C]``.
        second_moment: ``[C, C]`` ``E[p p^T]`` (:meth:`StreamingCovariance.second_moment`), or None.
    """
    x = np.asarray(columns, np.float64)
    if not 1 <= size <= len(x):
        raise ValueError(f"size must lie in [1, {len(x)}], got {size}")
    affinity = None
    if second_moment is not None:
        s = np.asarray(second_moment, np.float64)
        d = np.sqrt(np.clip(np.diag(s), 1e-300, None))
        affinity = s / np.outer(d, d)
        np.fill_diagonal(affinity, 0.0)
    out = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        centroid = x[members].mean(0)
        dist = ((x - centroid) ** 2).sum(1)
        if affinity is None:
            out.append(sorted(int(i) for i in np.argsort(dist, kind="stable")[:size]))
            continue
        chosen = [int(members[np.argmin(dist[members])])]
        while len(chosen) < size:
            score = affinity[chosen].sum(0)
            score[chosen] = -np.inf
            inside = np.isin(np.arange(len(x)), members) & np.isfinite(score)
            pool = np.flatnonzero(inside) if inside.any() else np.flatnonzero(np.isfinite(score))
            chosen.append(int(pool[np.argmax(score[pool])]))
        out.append(sorted(chosen))
    return out


def confusability(second_moment: np.ndarray, subset: Sequence[int]) -> float:
    """How much the generalist splits its mass among the classes of ``subset``:
    ``E[sum_{i != j in S} p_i p_j] / E[(sum_{i in S} p_i)^2]``.

    0 when it never gives two classes of the subset mass on the same row; at most ``1 - 1/|S|`` (mass
    always spread evenly over the subset). Needs only ``E[p p^T]`` (:meth:`StreamingCovariance.second_moment`).
    """
    ids = np.asarray(list(subset), np.int64)
    block = np.asarray(second_moment, np.float64)[np.ix_(ids, ids)]
    total = float(block.sum())
    return 0.0 if total <= 0 else float((total - np.trace(block)) / total)
