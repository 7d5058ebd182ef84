"""Distillation losses over compact contents (:mod:`.compact`), at any temperature, with ``T^2`` scaling and masks.

* ``topk``: the divergence between teacher and student over the same support: the stored top-k ids one by
  one plus one bucket for every other class. Both distributions are normalised over the full vocabulary
  (the teacher by its stored tail log-partition, the student by its own softmax) and then bucketed, so a
  student equal to the teacher has loss 0 (MaxText normalised the teacher over its top-k and the student
  over the vocabulary, which is never 0). ``forward`` (``KL(p || q)``), ``reverse`` (``KL(q || p)``) or ``jsd``
  (the Jensen-Shannon divergence, ``(KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``).
* ``sampled``: an unbiased estimate of the dense ``KL(p_T || q_T)`` and of its gradient: each stored id
  weighted by ``count / draws * p_T(i) / p_T0(i)``. Only ``forward``: the other divergences need ``p`` where
  the student puts mass, which samples of ``p`` do not give.
* ``hidden``: the teacher's logits ``h W^T + b`` exactly, then the dense divergence.

Shapes: the student's logits are ``[..., C]`` (rows: samples, or token positions ``[B, L]``); the targets are
the fields :func:`~softtargets.math.compact.unpack_record` returns, with the same leading shape (and a
teacher axis after it for per-teacher stores: the divergence is averaged over teachers). ``mask [...]`` (bool,
True = counts) drops padding and prompt positions; ``reduction="mean"`` averages over the rows that count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from .compact import CompactSpec, decode_hidden, head_logits, hermite_log_partition

Divergence = Literal["forward", "reverse", "jsd"]
"""Which divergence of teacher ``p`` and student ``q``: ``KL(p || q)``, ``KL(q || p)`` or Jensen-Shannon."""
DIVERGENCES = ("forward", "reverse", "jsd")


def check_temperature(spec: CompactSpec, temperature: float, approximate: bool = False) -> None:
    """Refuse a temperature outside the range the content serves (unless ``approximate``).

    Raises:
        ValueError: ``temperature <= 0``, or outside ``spec.temperature_range`` without ``approximate=True``.
    """
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    lo, hi = spec.temperature_range
    if not lo - 1e-12 <= t <= hi + 1e-12 and not approximate:
        raise ValueError(f"T={t:g} lies outside the temperature range [{lo:g}, {hi:g}] this {spec.kind} store "
                         "serves; pass approximate=True to extrapolate the tail's log-partition linearly "
                         "(a lower bound on it), or store a wider range")


def _divergence(lp: torch.Tensor, lq: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-row divergence over the last axis between log-distributions ``lp`` (teacher) and ``lq`` (student)."""
    if divergence == "forward":
        p = lp.exp()
        return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    if divergence == "reverse":
        q = lq.exp()
        return torch.where(q > 0, q * (lq - lp), torch.zeros_like(q)).sum(-1)
    if divergence == "jsd":
        lm = torch.logaddexp(lp, lq) - math.log(2.0)
        return 0.5 * (_divergence(lp, lm, "forward") + _divergence(lq, lm, "forward"))
    raise ValueError(f"unknown divergence {divergence!r}; expected one of 'forward', 'reverse', 'jsd'")


def _reduce(per_row: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask is not None:
        m = mask.to(device=per_row.device, dtype=torch.bool).expand_as(per_row)
        per_row = torch.where(m, per_row, torch.zeros_like(per_row))
        if reduction == "mean":
            return per_row.sum() / m.sum().clamp_min(1)
    if reduction == "mean":
        return per_row.mean() if per_row.numel() else per_row.sum()
    if reduction == "sum":
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"unknown reduction {reduction!r}; expected one of 'mean', 'sum', 'none'")


def _student_log_probs(student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(student_logits.to(dt) / temperature, dim=-1)


def _per_teacher(t: torch.Tensor, lead: int) -> bool:
    return t.dim() > lead + 1


def topk_log_probs(fields: Mapping[str, torch.Tensor], spec: CompactSpec, temperature: float, *,
                   approximate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-probabilities at ``T`` over its bucketed support: ``(top [..., k], tail [...])``,
    normalised over the full vocabulary (``logsumexp`` of the ``k + 1`` buckets is 0).

    Raises:
        ValueError: ``T`` outside the store's temperature range without ``approximate=True``.
    """
    check_temperature(spec, temperature, approximate)
    beta = 1.0 / float(temperature)
    values = fields["values"].double()
    betas = spec.betas(values.device)
    tail = hermite_log_partition(fields["tail_logz"].double(), fields["tail_dlogz"].double(), betas, beta)
    top = values * beta
    logz = torch.logaddexp(torch.logsumexp(top, dim=-1), tail)
    return top - logz.unsqueeze(-1), tail - logz


def topk_kd_loss(student_logits: torch.Tensor, fields: Mapping[str, torch.Tensor], spec: CompactSpec,
                 temperature: float = 1.0, *, divergence: Divergence = "forward", mask: torch.Tensor | None = None,
                 reduction: str = "mean", approximate: bool = False, scale_t2: bool = True) -> torch.Tensor:
    """Sparse KD over the top-k ids plus one tail bucket, teacher and student normalised over the same support.

    Args:
        student_logits: ``[..., C]`` (gradients flow into it).
        fields: a ``topk`` row's fields: ``ids``, ``values [..., (K,) k]``, ``tail_logz``, ``tail_dlogz``.
        spec: the store's content spec (its grid of temperatures).
        temperature: T, inside the store's range (or ``approximate=True``).
        divergence: ``forward``, ``reverse`` or ``jsd``.
        mask: ``[...]`` bool, True where the row counts.
        reduction: ``mean`` (over the rows that count), ``sum`` or ``none`` (``[...]``).
        scale_t2: multiply by ``T^2`` (Hinton's scaling, keeps the gradient's scale as T changes).

    Returns:
        The loss, in nats (times ``T^2``), in the student's compute dtype (float32, float64 for a float64 student).
    """
    lead = student_logits.dim() - 1
    lq_all = _student_log_probs(student_logits, temperature)
    ids = fields["ids"].to(device=student_logits.device, dtype=torch.int64)
    per_teacher = _per_teacher(ids, lead)
    if per_teacher:
        lq_all = lq_all.unsqueeze(-2).expand(*ids.shape[:-1], lq_all.shape[-1])
    lp_top, lp_tail = topk_log_probs({k: v.to(student_logits.device) for k, v in fields.items()}, spec,
                                     temperature, approximate=approximate)
    lq_top = lq_all.gather(-1, ids)
    lq_tail = lq_all.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
    lp = torch.cat([lp_top, lp_tail.unsqueeze(-1)], dim=-1).to(lq_all.dtype)
    lq = torch.cat([lq_top, lq_tail.unsqueeze(-1)], dim=-1)
    per_row = _divergence(lp, lq, divergence)
    if per_teacher:
        per_row = per_row.mean(dim=-1)
    if scale_t2:
        per_row = per_row * float(temperature) ** 2
    return _reduce(per_row, mask, reduction)


def sampled_weights(fields: Mapping[str, torch.Tensor], spec: CompactSpec, temperature: float, *,
                    approximate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [..., n], teacher log-probs at T [..., n])`` of a ``sampled`` row's ids: ``count / draws *
    p_T(i) / p_T0(i)``, so that ``sum_i weight_i f(i)`` estimates ``E_{p_T}[f]`` without bias."""
    check_temperature(spec, temperature, approximate)
    betas = spec.betas(fields["values"].device)
    logz, dlogz = fields["logz"].double(), fields["dlogz"].double()
    b, b0 = 1.0 / float(temperature), 1.0 / spec.proposal_temperature
    z = fields["values"].double()
    lp = z * b - hermite_log_partition(logz, dlogz, betas, b).unsqueeze(-1)
    lp0 = z * b0 - hermite_log_partition(logz, dlogz, betas, b0).unsqueeze(-1)
    counts = fields["counts"].double()
    return counts / spec.k * torch.exp(lp - lp0), lp


def sampled_kd_loss(student_logits: torch.Tensor, fields: Mapping[str, torch.Tensor], spec: CompactSpec,
                    temperature: float = 1.0, *, divergence: Divergence = "forward", mask: torch.Tensor | None = None,
                    reduction: str = "mean", approximate: bool = False, scale_t2: bool = True) -> torch.Tensor:
    """An unbiased estimate of the dense ``KL(p_T || q_T)`` (times ``T^2``) and of its gradient, from importance
    samples. Arguments as for :func:`topk_kd_loss`; fields: ``ids``, ``counts``, ``values``, ``logz``, ``dlogz``.

    Raises:
        ValueError: ``divergence`` other than ``forward`` (samples of ``p`` cannot estimate them), or ``T``
            outside the range without ``approximate=True``.
    """
    if divergence != "forward":
        raise ValueError(f"a sampled store gives only the forward KL; {divergence!r} needs the teacher's "
                         "probabilities where the student puts mass (use a topk or hidden store)")
    lead = student_logits.dim() - 1
    lq_all = _student_log_probs(student_logits, temperature)
    ids = fields["ids"].to(device=student_logits.device, dtype=torch.int64)
    if _per_teacher(ids, lead):
        lq_all = lq_all.unsqueeze(-2).expand(*ids.shape[:-1], lq_all.shape[-1])
    w, lp = sampled_weights({k: v.to(student_logits.device) for k, v in fields.items()}, spec, temperature,
                            approximate=approximate)
    lq = lq_all.gather(-1, ids)
    w, lp = w.to(lq.dtype), lp.to(lq.dtype)
    per_row = (w * (lp - lq)).sum(dim=-1)
    if _per_teacher(ids, lead):
        per_row = per_row.mean(dim=-1)
    if scale_t2:
        per_row = per_row * float(temperature) ** 2
    return _reduce(per_row, mask, reduction)


def hidden_kd_loss(student_logits: torch.Tensor, fields: Mapping[str, torch.Tensor], weight: torch.Tensor,
                   bias: torch.Tensor | None, temperature: float = 1.0, *, divergence: Divergence = "forward",
                   mask: torch.Tensor | None = None, reduction: str = "mean", scale_t2: bool = True) -> torch.Tensor:
    """Dense KD from stored hidden states: the teacher's logits ``h W^T + b`` (exact at every T), then the
    divergence over the full vocabulary. ``weight [C, d]`` (or ``[K, C, d]`` per teacher, then averaged over
    teachers), ``bias [C]`` (``[K, C]``) as the store holds them (:meth:`TargetStore.head`)."""
    lead = student_logits.shape[:-1]
    h = decode_hidden({k: v.to(student_logits.device) for k, v in fields.items()})
    flat = h.reshape(-1, *h.shape[len(lead):])
    teacher = head_logits(flat, weight, bias).reshape(*lead, *(() if weight.dim() == 2 else (weight.shape[0],)), -1)
    lq = _student_log_probs(student_logits, temperature)
    lp = torch.log_softmax(teacher.to(lq.dtype) / float(temperature), dim=-1)
    if weight.dim() == 3:
        lq = lq.unsqueeze(-2)
    per_row = _divergence(lp, lq.expand_as(lp), divergence)
    if weight.dim() == 3:
        per_row = per_row.mean(dim=-1)
    if scale_t2:
        per_row = per_row * float(temperature) ** 2
    return _reduce(per_row, mask, reduction)


def compact_kd_loss(student_logits: torch.Tensor, fields: Mapping[str, torch.Tensor],
                    compact: CompactSpec | Mapping[str, object], temperature: float = 1.0, *,
                    divergence: Divergence = "forward", mask: torch.Tensor | None = None, reduction: str = "mean",
                    approximate: bool = False, scale_t2: bool = True,
                    head: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """The distillation loss a compact store's rows give: :func:`topk_kd_loss`, :func:`sampled_kd_loss` or
    :func:`hidden_kd_loss` by the store's kind (``compact``: its spec, or the manifest's ``compact`` entry).

    Raises:
        ValueError: the fields are not the kind's (rows of another store), a ``hidden`` store without its
            ``head``, a divergence the content cannot give, or a temperature outside the store's range.
    """
    spec = compact if isinstance(compact, CompactSpec) else CompactSpec.from_dict(compact)
    need = {"topk": {"ids", "values", "tail_logz", "tail_dlogz"}, "sampled": {"ids", "counts", "values", "logz"},
            "hidden": {"hidden"}}[spec.kind]
    if not need <= set(fields):
        raise ValueError(f"these rows hold {sorted(fields)}, not a {spec.kind} store's fields {sorted(need)}: "
                         "read them with the store's own compact entry")
    if spec.kind == "topk":
        return topk_kd_loss(student_logits, fields, spec, temperature, divergence=divergence, mask=mask,
                            reduction=reduction, approximate=approximate, scale_t2=scale_t2)
    if spec.kind == "sampled":
        return sampled_kd_loss(student_logits, fields, spec, temperature, divergence=divergence, mask=mask,
                               reduction=reduction, approximate=approximate, scale_t2=scale_t2)
    if head is None:
        raise ValueError("a hidden store's loss needs its output head: pass head=store.head()")
    return hidden_kd_loss(student_logits, fields, head[0], head[1], temperature, divergence=divergence, mask=mask,
                          reduction=reduction, scale_t2=scale_t2)
