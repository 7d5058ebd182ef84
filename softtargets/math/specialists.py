"""Generalist + specialists (Hinton et al. 2015, §5): the dustbin correction, the active specialists and the
eq. 5 combination — pure torch.

A specialist ``m`` owns a subset ``S_m`` of the C classes; its head has ``|S_m| + 1`` outputs, the subset's
classes in the subset's order, then one *dustbin* for every other class (``D_m``, the complement of ``S_m``).

Eq. 5 finds, per row, the full distribution ``q`` over C classes closest to the generalist and the
specialists active for that row::

    q = argmin_q  KL(p^g || q) + sum_{m active} KL(p^m || q^m),     q^m = (q_{S_m}, sum_{j in D_m} q_j)

Up to terms without ``q`` this maximises ``sum_j w_j log q_j + sum_m d_m log(sum_{j in D_m} q_j)`` with
``w = p^g + sum_m p^m`` scattered onto the classes and ``d_m`` the specialist's dustbin probability: a
concave problem over the simplex with one optimum (``p^g > 0`` everywhere). The solver is
expectation-maximisation: each dustbin's mass is shared among its classes in proportion to the current
``q`` (E), then ``q`` is the normalised total (M). Each step raises the objective; at the fixed point the
KKT conditions hold. The residual reported is ``max_j |q_j - EM(q)_j|`` (in probability), the distance
of ``q`` from its own EM step; the solver stops when every row's residual is below ``tol``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def membership(subsets: Sequence[Sequence[int]], num_classes: int, device: torch.device | str | None = None
               ) -> torch.Tensor:
    """``[M, C]`` bool: ``out[m, j]`` is True where class ``j`` belongs to subset ``m``.

    Raises:
        ValueError: a subset is empty, names a class outside ``[0, C)`` or names one twice.
    """
    out = torch.zeros(len(subsets), num_classes, dtype=torch.bool, device=device)
    for m, subset in enumerate(subsets):
        ids = [int(c) for c in subset]
        if not ids:
            raise ValueError(f"specialist subset {m} is empty")
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"specialist subset {m} names classes {bad} outside [0, {num_classes})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"specialist subset {m} names a class twice: {ids}")
        out[m, ids] = True
    return out


def dustbin_corrected(logits: torch.Tensor, oversample: float) -> torch.Tensor:
    """A specialist's logits ``[..., |S| + 1]`` with ``log(oversample)`` added to the dustbin (the last) logit.

    A specialist trained on data where its subset's classes are ``oversample`` times as frequent, relative
    to the dustbin's classes, as in the transfer set's distribution gives too little mass to its dustbin;
    Bayes' rule for that prior shift is exactly this correction. Returns a new tensor (same shape, dtype).

    Raises:
        ValueError: ``oversample`` is not a finite number > 0.
    """
    f = float(oversample)
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"oversample must be a finite number > 0, got {oversample!r}")
    out = logits.clone()
    out[..., -1] += math.log(f)
    return out


def oversampling_factor(subset_fraction: float, special_share: float = 0.5) -> float:
    """The factor by which a specialist's training stream over-represents its subset relative to the dustbin.

    Args:
        subset_fraction: the fraction of the transfer set whose class is in the subset, ``pi_S`` in (0, 1).
        special_share: the fraction of the specialist's training examples drawn from its subset
            (``0.5``: half its batches from the subset, half from the rest, :class:`SpecialistBatches`).

    Returns:
        ``(special_share / pi_S) / ((1 - special_share) / (1 - pi_S))``: pass it to :func:`dustbin_corrected`.
    """
    p, s = float(subset_fraction), float(special_share)
    if not (0 < p < 1 and 0 < s < 1):
        raise ValueError(f"subset_fraction and special_share must lie in (0, 1), got {p}, {s}")
    return (s / p) / ((1 - s) / (1 - p))


def active_specialists(generalist_probs: torch.Tensor, member: torch.Tensor, top: int) -> torch.Tensor:
    """The paper's step 1: specialist ``m`` is active for a row when its subset holds one of the generalist's
    ``top`` most probable classes.

    Args:
        generalist_probs: ``[B, C]`` (probabilities or logits: only their order is used).
        member: ``[M, C]`` bool, :func:`membership`.
        top: how many of the generalist's classes to look at (``>= 1``).

    Returns:
        ``[B, M]`` bool.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    k = min(int(top), generalist_probs.shape[-1])
    ids = generalist_probs.topk(k, dim=-1).indices  # [B, k]
    return member.T[ids].any(dim=1)  # member.T [C, M] -> [B, k, M] -> [B, M]


@dataclass
class Combination:
    """The eq. 5 solution of a batch.

    Attributes:
        log_q: ``[B, C]`` float32 log-probabilities of q.
        residual: ``[B]`` float32, ``max_j |q_j - EM(q)_j|`` at the returned q (probability units).
        iterations: EM steps taken.
        tol: the residual the solver aimed for.
    """

    log_q: torch.Tensor
    residual: torch.Tensor
    iterations: int
    tol: float


def eq5_objective(q: torch.Tensor, generalist_probs: torch.Tensor, specialist_probs: Sequence[torch.Tensor],
                  member: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``KL(p^g || q) + sum_{m active} KL(p^m || q^m)`` per row, ``[B]`` (the eq. 5 objective; nats).

    Args:
        q: ``[B, C]`` probabilities.
        generalist_probs: ``[B, C]``.
        specialist_probs: M tensors ``[B, |S_m| + 1]``, each in its subset's class order, dustbin last.
        member: ``[M, C]`` bool; active: ``[B, M]`` bool.
    """
    def kl(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (p * (p.clamp_min(1e-300).log() - r.clamp_min(1e-300).log())).sum(-1)

    total = kl(generalist_probs, q)
    for m, pm in enumerate(specialist_probs):
        ids = member[m].nonzero().squeeze(1)
        qm = torch.cat([q[:, ids], (q.sum(-1) - q[:, ids].sum(-1))[:, None]], dim=1)
        total = total + torch.where(active[:, m], kl(pm, qm), torch.zeros_like(total))
    return total


def combine_specialists(generalist_probs: torch.Tensor, specialist_probs: Sequence[torch.Tensor],
                        member: torch.Tensor, active: torch.Tensor, *, tol: float = 1e-7,
                        max_iter: int = 5000) -> Combination:
    """Solve eq. 5 for every row of a batch at once, on the inputs' device, in float64.

    Args:
        generalist_probs: ``[B, C]`` the generalist's probabilities (rows sum to 1, all > 0).
        specialist_probs: M tensors ``[B, |S_m| + 1]``: specialist m's probabilities over its subset's classes
            (in the order of ``member[m].nonzero()``, i.e. ascending class id) and its dustbin, last.
        member: ``[M, C]`` bool (:func:`membership`).
        active: ``[B, M]`` bool (:func:`active_specialists`): the specialists that take part in each row.
        tol: stop when every row's residual ``max_j |q_j - EM(q)_j|`` is below this.
        max_iter: at most this many EM steps (the residual returned says how close it got).

    Returns:
        :class:`Combination`; a row with no active specialist gets ``q = p^g`` exactly.
    """
    b, c = generalist_probs.shape
    m_count = member.shape[0]
    if len(specialist_probs) != m_count or tuple(active.shape) != (b, m_count):
        raise ValueError(f"{len(specialist_probs)} specialists' outputs and active {tuple(active.shape)} "
                         f"for {m_count} subsets and {b} rows")
    sizes = member.sum(1).tolist()
    for m, pm in enumerate(specialist_probs):
        if tuple(pm.shape) != (b, sizes[m] + 1):
            raise ValueError(f"specialist {m}'s outputs are {tuple(pm.shape)}; its subset has {sizes[m]} classes, "
                             f"so expected [{b}, {sizes[m] + 1}] (its classes and a dustbin)")
    dev = generalist_probs.device
    pg = generalist_probs.to(torch.float64)
    weights = pg.clone()  # w_j: mass each class gets directly
    dust = torch.zeros(b, m_count, dtype=torch.float64, device=dev)  # d_m of active specialists, else 0
    act = active.to(torch.float64)
    for m, pm in enumerate(specialist_probs):
        ids = member[m].nonzero().squeeze(1)
        pm64 = pm.to(device=dev, dtype=torch.float64)
        weights[:, ids] += pm64[:, :-1] * act[:, m:m + 1]
        dust[:, m] = pm64[:, -1] * act[:, m]
    outside = (~member).to(torch.float64)  # [M, C]: the dustbin's classes
    total = weights.sum(1, keepdim=True) + dust.sum(1, keepdim=True)  # 1 + sum of active specialists' mass
    q = (weights + dust @ outside)  # a start: each dustbin spread evenly would be another; this is one M step
    q = q / q.sum(1, keepdim=True)
    residual = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (reported)
        mass = (q @ outside.T).clamp_min(1e-300)  # [B, M] sum of q over each dustbin
        nxt = (weights + q * ((dust / mass) @ outside)) / total
        residual = (nxt - q).abs().amax(1)
        q = nxt
        if bool((residual < tol).all()):
            break
    return Combination(q.clamp_min(1e-300).log().to(torch.float32), residual.to(torch.float32), it, float(tol))


def collapse_to_subset(log_probs: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """A full distribution's log-probabilities ``[B, C]`` seen by a specialist: ``[B, |S| + 1]``, the subset's
    classes in the order of ``classes``, then the log of the others' summed probability (the dustbin). A
    specialist distilled from a store learns from these."""
    ids = torch.as_tensor([int(c) for c in classes], device=log_probs.device)
    others = torch.ones(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
    others[ids] = False
    return torch.cat([log_probs[..., ids], torch.logsumexp(log_probs[..., others], -1, keepdim=True)], -1)
