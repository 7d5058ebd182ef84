"""Distillation losses over stored teacher logits — pure torch, computed on the student's device.

Shapes: the student's logits are ``[B, C]``; teacher logits are ``[B, C]`` (one vector
per sample: a single teacher or the geometric-mean logits) or ``[B, K, C]`` (K
teachers). Teacher logits may arrive in their stored dtype (float16, bfloat16,
float32): every loss casts them to the *compute dtype* — float64 when the student's
logits are float64, otherwise float32 — on the student's device, and detaches them
(no gradient ever reaches the teacher logits). Student logits in float16/bfloat16
(autocast) are upcast to float32 too; gradients flow back through the cast.

The soft term is reported as ``KL(p || q) = sum_i p_i (log p_i - log q_i)`` between the
ensemble target ``p = ensemble(teacher, T, rule)`` and ``q = softmax(z / T)`` (``form="kl"``, the
default, as ``nn.KLDivLoss``): 0 when the student matches the target, so a logged value compares
across temperatures. ``form="ce"`` reports Hinton, Vinyals & Dean's (2015) cross-entropy
``-sum_i p_i log q_i`` instead, which adds the target's entropy ``H(p)`` (a constant with respect to
the student that changes with T). Both forms have the same gradient, ``d/d z_i = (q_i - p_i) / T``.
Classes with ``p_i = 0`` (an underflowed target) contribute 0 to the KL form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import LossForm, Reduction, Rule, choices, parse_choice
from .temperature import ensemble_log_probs

REDUCTIONS: tuple[str, ...] = choices(Reduction)

#: What the soft term reports: ``"kl"`` = ``KL(p || q)``, ``"ce"`` = ``CE(p, q) = KL(p || q) + H(p)``.
Form = LossForm
FORMS: tuple[str, ...] = choices(Form)

#: A temperature: a fixed number, or a schedule mapping the training step to a number.
Temperature = float | Callable[[int], float]

__all__ = [
    "FORMS",
    "REDUCTIONS",
    "DistillationLoss",
    "Form",
    "Reduction",
    "Temperature",
    "distillation_loss",
    "kd_loss",
    "logit_matching_loss",
    "resolve_temperature",
]


def resolve_temperature(temperature: Temperature, step: int | None = None) -> float:
    """The temperature to use now: ``temperature`` itself, or ``temperature(step)`` for a schedule.

    Raises ``ValueError`` when a schedule is given without ``step``, or when the result
    is not a finite number > 0.
    """
    if callable(temperature):
        if step is None:
            raise ValueError(
                "temperature is a schedule (a callable of the training step); pass step=<int> "
                "to the loss (or use DistillationLoss, which counts steps)"
            )
        value = temperature(int(step))
    else:
        value = temperature
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number > 0, got {value!r}") from None
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return t


def _compute_dtype(student_logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if student_logits.dtype == torch.float64 else torch.float32


def _check_rule(rule: str) -> None:
    parse_choice("ensemble rule", rule, Rule)


def _prepare(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return (student, teacher) in the compute dtype on the student's device.

    The teacher is detached. Student ``[B, C]``; teacher ``[B, C]`` or ``[B, K, C]``.
    """
    if not torch.is_tensor(student_logits) or not torch.is_tensor(teacher_logits):
        raise TypeError("student_logits and teacher_logits must be torch tensors")
    if student_logits.dim() != 2:
        raise ValueError(
            f"student logits must be [B, C]; got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.dim() not in (2, 3):
        raise ValueError(
            f"teacher logits must be [B, C] or [B, K, C]; got shape {tuple(teacher_logits.shape)}"
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError(
            f"logits must be floating point; got student {student_logits.dtype}, "
            f"teacher {teacher_logits.dtype}"
        )
    b, c = student_logits.shape
    if teacher_logits.shape[0] != b:
        raise ValueError(
            f"batch size mismatch: student logits have {b} rows, teacher logits "
            f"{teacher_logits.shape[0]} (shapes {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)})"
        )
    if teacher_logits.shape[-1] != c:
        raise ValueError(
            f"class count mismatch: student logits have {c} classes, teacher logits "
            f"{teacher_logits.shape[-1]} (shapes {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)})"
        )
    if teacher_logits.dim() == 3 and teacher_logits.shape[1] == 0:
        raise ValueError("teacher logits [B, K, C] have K = 0 teachers")
    dtype = _compute_dtype(student_logits)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(device=student_logits.device, dtype=dtype)
    return student, teacher


def _check_form(form: str) -> None:
    parse_choice("loss form", form, LossForm, note="('kl': KL(p || q), 'ce': cross-entropy)")


def _soft_term(target_log_probs: torch.Tensor, student_log_probs: torch.Tensor, form: str) -> torch.Tensor:
    """Per-sample ``KL(p || q)`` or ``CE(p, q)`` from log-probabilities ``[B, C]`` -> ``[B]``."""
    p = target_log_probs.exp()
    if form == "ce":
        return -(p * student_log_probs).sum(dim=-1)
    terms = p * (target_log_probs - student_log_probs)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=-1)  # 0 log 0 = 0


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Temperature,
    rule: Rule = "geometric",
    *,
    step: int | None = None,
    reduction: Reduction = "mean",
    scale_t2: bool = True,
    form: Form = "kl",
) -> torch.Tensor:
    """The soft term of Hinton et al. (2015) at temperature T, reported as a KL divergence.

    ``T^2 * KL(p || q)`` per sample (``form="kl"``), or ``T^2 * CE(p, q)`` (``form="ce"``), with
    ``p = ensemble(teacher_logits, T, rule)`` and ``q = softmax(student_logits / T)``;
    ``KL(p || q) = sum_i p_i (log p_i - log q_i)``, ``CE(p, q) = -sum_i p_i log q_i = KL + H(p)``.
    The two forms have the same gradient; the KL form is 0 when the student matches the target.

    Args:
        student_logits: ``[B, C]`` floating point, any device; gradients flow to it.
        teacher_logits: ``[B, C]`` or ``[B, K, C]``, any float dtype (float16/bfloat16
            as stored are fine) and any device; cast to the compute dtype (float64 if the
            student is float64, else float32), moved to the student's device, detached.
        temperature: T > 0, or a schedule ``step -> T`` (then ``step`` is required).
        rule: ``"geometric"`` or ``"arithmetic"`` mean of the K teachers' tempered
            distributions; irrelevant for ``[B, C]`` teacher logits.
        step: the training step, passed to a temperature schedule.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` (``[B]``).
        scale_t2: multiply by ``T^2`` so the soft gradient's scale stays roughly fixed as
            T changes (the gradient w.r.t. ``z_i`` is ``T (q_i - p_i)`` per sample).
        form: ``"kl"`` (default, as ``nn.KLDivLoss``) or ``"ce"`` (adds the target entropy ``H(p)``).

    Returns:
        A scalar (or ``[B]`` for ``reduction="none"``) in the compute dtype.
    """
    _check_rule(rule)
    _check_form(form)
    parse_choice("reduction", reduction, Reduction)
    t = resolve_temperature(temperature, step)
    student, teacher = _prepare(student_logits, teacher_logits)
    target_log_probs = ensemble_log_probs(teacher, t, rule, per_teacher=teacher.dim() == 3)
    student_log_probs = torch.log_softmax(student / t, dim=-1)
    per_sample = _soft_term(target_log_probs, student_log_probs, form)
    if scale_t2:
        per_sample = per_sample * (t * t)
    return _reduce(per_sample, reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: Temperature,
    alpha: float,
    rule: Rule = "geometric",
    *,
    step: int | None = None,
    ignore_index: int = -1,
    form: Form = "kl",
) -> torch.Tensor:
    """Hinton's combined loss: ``alpha * T^2 * soft + (1 - alpha) * CE_hard``.

    ``soft`` is :func:`kd_loss` (without its own ``T^2``), averaged over all B rows:
    ``KL(p || q)`` by default, ``CE(p, q)`` with ``form="ce"`` (same gradient).
    ``CE_hard`` is the ordinary cross-entropy of ``softmax(student_logits)`` (T = 1)
    against ``labels``, averaged over the *labelled* rows only; rows whose label is
    ``ignore_index`` (default -1: unlabelled transfer-set samples) contribute only to
    the soft term. With no labelled row in the batch the hard term is 0.

    Args:
        student_logits: ``[B, C]`` floating point.
        teacher_logits: ``[B, C]`` or ``[B, K, C]``, any float dtype/device (see :func:`kd_loss`).
        labels: ``[B]`` integer class indices (int64), ``ignore_index`` for unlabelled.
        temperature: T > 0 or a schedule ``step -> T`` (then ``step`` is required).
        alpha: weight of the soft term, in ``[0, 1]``.
        rule: ``"geometric"`` or ``"arithmetic"``.
        step: the training step, for a temperature schedule.
        ignore_index: the label value marking an unlabelled row.
        form: ``"kl"`` or ``"ce"``: what the soft term reports (see :func:`kd_loss`).

    Returns:
        A scalar in the compute dtype (float64 for a float64 student, else float32).
    """
    alpha_f = float(alpha)
    if not (0.0 <= alpha_f <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not torch.is_tensor(labels) or labels.dim() != 1:
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"labels must be a [B] tensor of class indices; got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class indices (int64); got dtype {labels.dtype}")
    if labels.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"batch size mismatch: student logits have {student_logits.shape[0]} rows, "
            f"labels {labels.shape[0]}"
        )
    soft = kd_loss(
        student_logits, teacher_logits, temperature, rule, step=step, reduction="mean", scale_t2=True, form=form
    )
    student = student_logits.to(soft.dtype)
    labels = labels.to(device=student.device, dtype=torch.int64)
    hard_sum = F.cross_entropy(student, labels, ignore_index=ignore_index, reduction="sum")
    n_labelled = (labels != ignore_index).sum().clamp_min(1)
    hard = hard_sum / n_labelled
    return alpha_f * soft + (1.0 - alpha_f) * hard


def logit_matching_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    rule: Rule = "geometric",
) -> torch.Tensor:
    """Caruana's logit matching: ``1/2 ||z - v||^2`` with z and v zero-meaned per row.

    The high-temperature limit of the ``T^2``-scaled soft term (up to a factor ``1/C``).
    Reduction: **sum over classes, mean over the batch**.

    Args:
        student_logits: ``[B, C]`` floating point (z).
        teacher_logits: ``[B, C]``, or ``[B, K, C]`` reduced to the mean logits over the K
            teachers (v; the logits of the geometric ensemble). Any float dtype/device.
        rule: ``"geometric"``; ``"arithmetic"`` is refused for ``K > 1`` because the
            arithmetic mean of distributions has no single logit vector at all T.

    Returns:
        A scalar in the compute dtype (float64 for a float64 student, else float32).
    """
    _check_rule(rule)
    student, teacher = _prepare(student_logits, teacher_logits)
    if teacher.dim() == 3:
        if rule == "arithmetic" and teacher.shape[1] > 1:
            raise ValueError(
                f"logit matching with the arithmetic rule needs a single logit vector, but "
                f"K = {teacher.shape[1]} teachers were given: the arithmetic mean of their "
                f"distributions has no logit vector valid at every T. Use rule='geometric' "
                f"(mean logits) or kd_loss with rule='arithmetic'."
            )
        teacher = teacher.mean(dim=1)
    z = student - student.mean(dim=-1, keepdim=True)
    v = teacher - teacher.mean(dim=-1, keepdim=True)
    return 0.5 * (z - v).pow(2).sum(dim=-1).mean()


class DistillationLoss(nn.Module):
    """:func:`distillation_loss` as a module that counts steps for a temperature schedule.

    ``forward(student_logits [B, C], teacher_logits [B, C] | [B, K, C], labels [B] | None)``
    returns a scalar (the soft term as ``KL(p || q)``, or ``CE(p, q)`` with ``form="ce"``).
    ``labels=None`` means every row is unlabelled (soft term only,
    weighted by ``alpha``). Each forward call in training mode uses the current
    ``step_count`` and then advances it by one; pass ``step=`` to override. The counter is
    saved in ``state_dict()`` (extra state), so a resumed run keeps its schedule position.
    """

    def __init__(
        self,
        temperature: Temperature,
        alpha: float = 0.5,
        rule: Rule = "geometric",
        *,
        ignore_index: int = -1,
        form: Form = "kl",
    ) -> None:
        super().__init__()
        _check_rule(rule)
        _check_form(form)
        if not (0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not callable(temperature):
            resolve_temperature(temperature)
        self.temperature = temperature
        self.alpha = float(alpha)
        self.rule = rule
        self.ignore_index = ignore_index
        self.form = form
        self.step_count = 0

    def current_temperature(self) -> float:
        """T at the current ``step_count``."""
        return resolve_temperature(self.temperature, self.step_count)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        step: int | None = None,
    ) -> torch.Tensor:
        if labels is None:
            labels = torch.full(
                (student_logits.shape[0],), self.ignore_index, dtype=torch.int64,
                device=student_logits.device,
            )
        use_step = self.step_count if step is None else int(step)
        loss = distillation_loss(
            student_logits, teacher_logits, labels, self.temperature, self.alpha, self.rule,
            step=use_step, ignore_index=self.ignore_index, form=self.form,
        )
        if self.training and step is None:
            self.step_count += 1
        return loss

    def get_extra_state(self) -> Any:
        return {"step_count": self.step_count}

    def set_extra_state(self, state: Any) -> None:
        self.step_count = int(state["step_count"])

    def extra_repr(self) -> str:
        t = self.temperature
        shown = getattr(t, "__name__", "schedule") if callable(t) else t
        return (f"temperature={shown}, alpha={self.alpha}, rule={self.rule!r}, form={self.form!r}, "
                f"step_count={self.step_count}")
