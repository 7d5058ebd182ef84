"""Compact contents' math: records, the tail's log-partition, and the losses over topk, sampled and hidden rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softtargets.math.compact import (
    CompactSpec,
    encode_hidden,
    encode_sampled,
    encode_topk,
    hermite_log_partition,
    numpy_record_dtype,
    pack_record,
    record_fields,
    unpack_record,
)
from softtargets.math.compact_losses import hidden_kd_loss, sampled_kd_loss, topk_kd_loss, topk_log_probs


def heavy_logits(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed logits (a few large, a long tail), float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=g, dtype=torch.float64) * 2 + \
        torch.empty(rows, classes, dtype=torch.float64).exponential_(generator=g) * 1.5


def dense_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 KL(softmax(p/T) || softmax(q/T))`` per row."""
    lp, lq = F.log_softmax(p_logits / t, -1), F.log_softmax(q_logits / t, -1)
    return t * t * (lp.exp() * (lp - lq)).sum(-1)


def test_records_round_trip_bitwise_and_numpy_reads_them():
    z = heavy_logits(7, 70000)  # over 65 536 classes: int32 ids
    spec = CompactSpec("topk", k=5, temperatures=(1.0, 2.0))
    f, _ = encode_topk(z, spec)
    fields = record_fields(spec, 70000)
    assert fields[0]["dtype"] == "<i4" and record_fields(spec, 1000)[0]["dtype"] == "<u2"
    rec = pack_record(f, fields)
    assert rec.dtype == torch.uint8 and rec.shape == (7, 5 * 4 + 5 * 2 + 2 * 4 + 2 * 4)
    back = unpack_record(rec, fields)
    assert torch.equal(back["ids"], f["ids"]) and torch.equal(back["values"], f["values"].half())
    plain = rec.numpy().view(numpy_record_dtype(fields))[:, 0]  # numpy alone
    assert np.array_equal(plain["ids"], f["ids"].numpy()) and np.array_equal(plain["tail_logz"], f["tail_logz"].numpy())
    ids16 = torch.tensor([[0, 40000, 65535]])  # uint16 ids above int16's range survive
    spec16 = CompactSpec("topk", k=3, temperatures=(1.0,))
    f16 = {"ids": ids16, "values": torch.zeros(1, 3), "tail_logz": torch.zeros(1, 1), "tail_dlogz": torch.zeros(1, 1)}
    assert unpack_record(pack_record(f16, record_fields(spec16, 65536)), record_fields(spec16, 65536))["ids"].tolist() \
        == [[0, 40000, 65535]]


def test_hermite_log_partition_exact_on_grid_and_close_between():
    z = heavy_logits(16, 2000)
    spec = CompactSpec("topk", k=8)
    f, err = encode_topk(z, spec)
    assert 0 < err < 2e-3  # measured at the midpoints
    top = z.topk(8, -1)
    tail = (z - top.values[:, :1]).scatter(-1, top.indices, float("-inf"))
    betas = spec.betas()
    for t in (0.5, 0.6, 1.0, 1.7, 3.3, 20.0):
        exact = torch.logsumexp(tail / t, -1)
        approx = hermite_log_partition(f["tail_logz"].double(), f["tail_dlogz"].double(), betas, 1 / t)
        bound = 1e-5 if t in spec.temperatures else 2e-3
        assert (approx - exact).abs().max() < bound, t


def test_topk_normalised_over_one_support_zero_for_the_teacher_and_equal_to_bucketed_kl():
    z = heavy_logits(32, 500, seed=1)
    spec = CompactSpec("topk", k=16, value_dtype="float32")
    f, _ = encode_topk(z, spec)
    for t in (0.5, 1.0, 4.0, 20.0):
        student = z.clone().requires_grad_()
        for div in ("forward", "reverse", "jsd"):
            loss = topk_kd_loss(student, f, spec, t, divergence=div)
            grad, = torch.autograd.grad(loss, student)
            assert abs(float(loss.detach())) < 1e-6 and float(grad.abs().max()) < 1e-6, (t, div)
        # MaxText's mismatch: teacher renormalised over its top-k, student over the vocabulary: never 0
        lp_renorm = torch.log_softmax(f["values"] / t, -1)
        lq = torch.log_softmax(z / t, -1).gather(-1, f["ids"])
        mismatch = (lp_renorm.exp() * (lp_renorm - lq)).sum(-1).mean()
        assert float(mismatch) > 1e-3
        # Equal to the KL between the dense distributions bucketed the same way
        other = heavy_logits(32, 500, seed=2)
        def bucket(logits, t=t):
            lp = torch.log_softmax(logits / t, -1)
            return torch.cat([lp.gather(-1, f["ids"]), lp.scatter(-1, f["ids"], float("-inf")).logsumexp(-1, True)], -1)
        bp, bq = bucket(z), bucket(other)
        want = t * t * (bp.exp() * (bp - bq)).sum(-1).mean()
        assert abs(float(topk_kd_loss(other, f, spec, t)) - float(want)) < 5e-3 * max(1.0, float(want))
        lp_top, lp_tail = topk_log_probs(f, spec, t)
        assert torch.allclose(torch.logaddexp(lp_top.logsumexp(-1), lp_tail), torch.zeros(32, dtype=torch.float64),
                              atol=1e-9)


def test_refusals_name_the_range_and_the_loss():
    z = heavy_logits(4, 100)
    spec = CompactSpec("topk", k=4, temperatures=(1.0, 2.0, 4.0))
    f, _ = encode_topk(z, spec)
    with pytest.raises(ValueError, match=r"T=8 lies outside the temperature range \[1, 4\].*approximate=True"):
        topk_kd_loss(z, f, spec, 8.0)
    assert math.isfinite(float(topk_kd_loss(z, f, spec, 8.0, approximate=True)))
    sspec = CompactSpec("sampled", k=8, temperatures=(1.0, 2.0))
    s = encode_sampled(z, sspec, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sampled store gives only the forward KL; 'reverse'"):
        sampled_kd_loss(z, s, sspec, 1.0, divergence="reverse")
    with pytest.raises(ValueError, match="k=100 must be smaller than the 100 classes"):
        encode_topk(z, CompactSpec("topk", k=100))


def test_sampled_loss_and_gradient_are_unbiased():
    """The sampled estimate's mean over independent draws matches the dense KL and its gradient (within 4
    standard errors), at the proposal temperature and at another one on the grid."""
    teacher = heavy_logits(1, 300, seed=3)
    student = heavy_logits(1, 300, seed=4)
    spec = CompactSpec("sampled", k=24, proposal_temperature=1.0, temperatures=(1.0, 2.0), value_dtype="float32")
    draws = 3000
    f = encode_sampled(teacher.expand(draws, -1), spec, torch.Generator().manual_seed(5))
    assert (f["counts"].sum(-1) == 24).all()
    for t in (1.0, 2.0):
        s = student.expand(draws, -1).clone().requires_grad_()
        per_row = sampled_kd_loss(s, f, spec, t, reduction="none")
        grad_rows, = torch.autograd.grad(per_row.sum(), s)
        dense_s = student.clone().requires_grad_()
        dense = dense_kl(teacher, dense_s, t)
        dense_grad, = torch.autograd.grad(dense.sum(), dense_s)
        se = float(per_row.std()) / math.sqrt(draws)
        assert abs(float(per_row.mean()) - float(dense)) < 4 * se + 1e-9, (t, float(per_row.mean()), float(dense))
        g_mean, g_var = grad_rows.mean(0), grad_rows.var(0) / draws
        # squared error of the mean gradient against its sampling variance (expected ratio 1; a bias shows as >> 1)
        ratio = float(((g_mean - dense_grad[0]) ** 2).sum() / g_var.sum())
        assert ratio < 2.0, (t, ratio)


def test_hidden_is_exact_at_every_temperature_and_int8_close():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(20, 32, generator=g)
    w, b = torch.randn(400, 32, generator=g), torch.randn(400, generator=g)
    logits = h @ w.T + b
    for quant, bound in (("float16", 1e-4), ("int8", 5e-3)):
        spec = CompactSpec("hidden", quantization=quant)
        fields = encode_hidden(h, spec)
        back = unpack_record(pack_record(fields, record_fields(spec, 400, 1, 32)), record_fields(spec, 400, 1, 32))
        for t in (0.5, 1.0, 20.0):
            loss = hidden_kd_loss(logits, back, w, b, t, reduction="none")
            assert float(loss.max()) < bound * t * t, (quant, t)
            for div in ("reverse", "jsd"):
                assert float(hidden_kd_loss(logits, back, w, b, t, divergence=div).abs()) < bound * t * t


def test_masks_drop_rows_and_t2_scales():
    z = heavy_logits(6, 50)
    spec = CompactSpec("topk", k=4, temperatures=(1.0, 2.0))
    f, _ = encode_topk(z, spec)
    other = heavy_logits(6, 50, seed=9)
    rows = topk_kd_loss(other, f, spec, 2.0, reduction="none")
    mask = torch.tensor([True, False, True, False, False, True])
    assert torch.allclose(topk_kd_loss(other, f, spec, 2.0, mask=mask), rows[mask].mean())
    assert torch.allclose(topk_kd_loss(other, f, spec, 2.0, scale_t2=False, reduction="none") * 4, rows)
    seq = topk_kd_loss(other.reshape(2, 3, 50), {k: v.reshape(2, 3, *v.shape[1:]) for k, v in f.items()}, spec, 2.0,
                       mask=mask.reshape(2, 3))
    assert torch.allclose(seq, rows[mask].mean())
