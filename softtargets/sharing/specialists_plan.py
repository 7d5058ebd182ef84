"""Class subsets for specialists from a finished store (Hinton et al. 2015, §5): ``softtargets specialists plan``.

The generalist's predicted distributions (the store's ensemble at T = 1) are read shard by shard and their
``[C, C]`` covariance accumulated in float64 (:class:`softtargets.math.class_subsets.StreamingCovariance`:
memory ``O(C^2)``, whatever N); the covariance's columns are clustered into M groups (online K-means, the
paper's method, or a spectral method) and each group grows into S classes, the cluster's members first, by
co-prediction (:func:`softtargets.math.class_subsets.subsets_from_clusters`). Each subset is scored by
:func:`softtargets.math.class_subsets.confusability` and by the share of the transfer set the generalist
assigns to it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import numpy as np

from ..choices import Rule
from ..math.class_subsets import (
    StreamingCovariance,
    confusability,
    online_kmeans,
    spectral_clusters,
    subsets_from_clusters,
)
from ..store import TargetStore, open_targets

__all__ = ["ClusterMethod", "plan_specialists"]

ClusterMethod = Literal["kmeans", "spectral"]


def plan_specialists(
    store: str | os.PathLike[str] | TargetStore,
    *,
    specialists: int,
    size: int,
    method: ClusterMethod = "kmeans",
    rule: Rule = "geometric",
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """M class subsets of S classes each, the most confusable for the store's generalist.

    Args:
        store: a finished store (URL or open store).
        specialists: M, the number of subsets.
        size: S, classes per subset (subsets may overlap).
        method: ``"kmeans"`` (online K-means on the covariance's columns, as the paper) or ``"spectral"``.
        rule: how the store's logits form the generalist's distribution (T = 1).
        seed: the clustering's seed.
        out: also write the plan as JSON there.

    Returns:
        ``{"store", "num_classes", "rows", "method", "rule", "seed", "subsets": [{"classes", "names",
        "confusability", "share"}, ...]}`` with subsets sorted by confusability, highest first; ``share`` is
        the fraction of rows whose generalist top class lies in the subset (each specialist's ``pi_S``, for
        :func:`softtargets.math.specialists.oversampling_factor`).

    Raises:
        ValueError: M or S out of range, or an unknown method.
    """
    st = store if isinstance(store, TargetStore) else open_targets(store)
    m = st.manifest
    c = m.num_classes
    if not 1 <= specialists <= c:
        raise ValueError(f"--specialists must lie in [1, {c}] (the store has {c} classes), got {specialists}")
    if not 1 <= size < c:
        raise ValueError(f"--size must lie in [1, {c - 1}] (a specialist keeps a dustbin), got {size}")
    if method not in ("kmeans", "spectral"):
        raise ValueError(f"unknown method {method!r}; expected one of ['kmeans', 'spectral']")
    acc = StreamingCovariance(c)
    top_counts = np.zeros(c, np.int64)
    for shard in m.shards:
        p = st.probs(np.arange(shard.start, shard.stop), temperature=1.0, rule=rule).double()
        acc.update(p)
        top_counts += np.bincount(p.argmax(1).numpy(), minlength=c)
    cov = acc.covariance()
    labels = online_kmeans(cov, specialists, seed=seed) if method == "kmeans" else \
        spectral_clusters(acc.second_moment(), specialists, seed=seed)
    second = acc.second_moment()
    subsets = subsets_from_clusters(cov, labels, size, second)
    names = m.class_names
    scores = [round(confusability(second, s), 6) for s in subsets]
    rows = [{"classes": s, "names": [names[i] for i in s] if names else None, "confusability": score,
             "share": round(float(top_counts[s].sum() / max(acc.count, 1)), 6)}
            for score, s in sorted(zip(scores, subsets, strict=True), key=lambda pair: -pair[0])]
    plan = {"store": str(st.url), "num_classes": c, "rows": acc.count, "method": method, "rule": rule,
            "seed": seed, "size": size, "subsets": rows}
    if out is not None:
        with open(out, "w") as f:
            json.dump(plan, f, indent=1)
            f.write("\n")
    return plan
