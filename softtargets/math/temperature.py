"""Tempered softmax and the ensemble rules — pure torch, no I/O.

Every function takes logits whose last axis is the class axis (C). Per-teacher
logits are ``[..., K, C]`` (K teachers on axis -2). Outputs keep the input dtype
unless stated; call ``.double()`` first for reference-grade arithmetic.

Softmax at temperature T: ``q_i = exp(z_i / T) / sum_j exp(z_j / T)``. It is shift
invariant, so stored logits may be zero-meaned per row.

* geometric mean of K tempered distributions, renormalised, is
  ``softmax(mean_k(v_k) / T)`` exactly, at every T;
* arithmetic mean ``(1/K) sum_k softmax(v_k / T)`` needs all K logit vectors to be
  exact at a T other than the one it was reduced at.
"""

from __future__ import annotations

import math

import torch

from ..choices import Content, Rule, choices, parse_choice

RULES: tuple[str, ...] = choices(Rule)


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def tempered_log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)`` over the last axis; shape and dtype unchanged."""
    return torch.log_softmax(logits / _check_temperature(temperature), dim=-1)


def tempered_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / T)`` over the last axis; shape and dtype unchanged."""
    return torch.softmax(logits / _check_temperature(temperature), dim=-1)


def geometric_logits(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over teachers: ``[..., K, C] -> [..., C]``. Serves the geometric rule at any T."""
    return teacher_logits.mean(dim=-2)


def geometric_log_probs(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log of the renormalised geometric mean of the K tempered distributions.

    ``[..., K, C] -> [..., C]``; equals ``log_softmax(mean_k(v_k) / T)``.
    """
    return tempered_log_softmax(geometric_logits(teacher_logits), temperature)


def arithmetic_log_probs(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log((1/K) sum_k softmax(v_k / T))``: ``[..., K, C] -> [..., C]``, computed stably."""
    k = teacher_logits.shape[-2]
    per_teacher = tempered_log_softmax(teacher_logits, temperature)
    return torch.logsumexp(per_teacher, dim=-2) - math.log(k)


def ensemble_log_probs(
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    rule: Rule = "geometric",
    *,
    per_teacher: bool | None = None,
) -> torch.Tensor:
    """Ensemble log-probabilities at temperature T.

    ``teacher_logits`` is ``[..., K, C]`` (per-teacher) or ``[..., C]`` (one vector per
    sample: a single teacher, or geometric mean logits, for which both rules agree).
    ``per_teacher`` says which; by default a tensor of 3 or more dims is per-teacher.
    Returns ``[..., C]`` in the input dtype.
    """
    parse_choice("ensemble rule", rule, Rule)
    if teacher_logits.dim() < 1:
        raise ValueError("teacher logits need a class axis; got a scalar")
    if per_teacher is None:
        per_teacher = teacher_logits.dim() >= 3
    if not per_teacher:
        return tempered_log_softmax(teacher_logits, temperature)
    if rule == "geometric":
        return geometric_log_probs(teacher_logits, temperature)
    return arithmetic_log_probs(teacher_logits, temperature)


def ensemble_probs(
    teacher_logits: torch.Tensor, temperature: float = 1.0, rule: Rule = "geometric"
) -> torch.Tensor:
    """``exp`` of :func:`ensemble_log_probs`: ``[..., K, C]`` or ``[..., C]`` -> ``[..., C]``."""
    return ensemble_log_probs(teacher_logits, temperature, rule).exp()


def reduce_teachers(
    teacher_logits: torch.Tensor, content: Content, temperature: float = 1.0
) -> torch.Tensor:
    """Reduce ``[..., K, C]`` per-teacher logits to what a store of ``content`` holds.

    ``per_teacher``: unchanged; ``geometric``: mean logits ``[..., C]``;
    ``arithmetic``: ``log mean_k softmax(v_k / T0)`` ``[..., C]`` with T0 = ``temperature``.
    """
    if parse_choice("content", content, Content) == "per_teacher":
        return teacher_logits
    if content == "geometric":
        return geometric_logits(teacher_logits)
    return arithmetic_log_probs(teacher_logits, temperature)


def zero_mean(logits: torch.Tensor) -> torch.Tensor:
    """Subtract each row's mean over the class axis (shift invariance keeps every softmax)."""
    return logits - logits.mean(dim=-1, keepdim=True)
