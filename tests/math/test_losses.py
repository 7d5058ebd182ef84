"""Tests of softtargets.math.losses against the equations of Hinton, Vinyals & Dean (2015).

References are computed here independently of softtargets.math.temperature (plain softmax,
explicit means), in float64 wherever a tight tolerance is asserted.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from softtargets.math.losses import (
    DistillationLoss,
    distillation_loss,
    kd_loss,
    logit_matching_loss,
    resolve_temperature,
)

B, C, K = 8, 10, 5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(*shape: int, scale: float = 1.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _zero_mean(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=-1, keepdim=True)


def _reference_target(teacher: torch.Tensor, T: float, rule: str) -> torch.Tensor:
    """p at temperature T, written out directly: [B, C] or [B, K, C] -> [B, C]."""
    if teacher.dim() == 2:
        return torch.softmax(teacher / T, dim=-1)
    if rule == "geometric":
        # renormalised geometric mean of the K tempered distributions, computed literally
        log_geo = torch.log(torch.softmax(teacher / T, dim=-1)).mean(dim=1)
        geo = log_geo.exp()
        return geo / geo.sum(dim=-1, keepdim=True)
    return torch.softmax(teacher / T, dim=-1).mean(dim=1)


def _soft_grad(student: torch.Tensor, teacher: torch.Tensor, T: float, rule: str = "geometric",
               **kw) -> torch.Tensor:
    z = student.detach().clone().requires_grad_(True)
    kd_loss(z, teacher, T, rule, **kw).backward()
    return z.grad


# --------------------------------------------------------------------------- eq. 2


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
@pytest.mark.parametrize("per_teacher", [True, False], ids=["BKC", "BC"])
@pytest.mark.parametrize("T", [0.5, 1.0, 3.0, 10.0])
def test_soft_gradient_is_q_minus_p_over_T(rule: str, per_teacher: bool, T: float) -> None:
    """Paper eq. 2: d CE / d z_i = (1/T)(q_i - p_i), checked against autograd in float64.

    Also checks the loss value -sum p log q, the batch mean (1/B factor) and the T^2 scaling.
    """
    z = _logits(B, C, scale=2.0, seed=1)
    v = _logits(B, K, C, scale=3.0, seed=2) if per_teacher else _logits(B, C, scale=3.0, seed=2)
    p = _reference_target(v, T, rule)
    q = torch.softmax(z / T, dim=-1)
    expected = (q - p) / T

    grad_sum = _soft_grad(z, v, T, rule, reduction="sum", scale_t2=False)
    torch.testing.assert_close(grad_sum, expected, rtol=0, atol=1e-12)
    grad_mean = _soft_grad(z, v, T, rule, reduction="mean", scale_t2=False)
    torch.testing.assert_close(grad_mean, expected / B, rtol=0, atol=1e-12)
    grad_scaled = _soft_grad(z, v, T, rule, reduction="sum", scale_t2=True)
    torch.testing.assert_close(grad_scaled, T * (q - p), rtol=0, atol=1e-11)

    ce = -(p * torch.log(q)).sum(dim=-1)
    kl = (p * (torch.log(p) - torch.log(q))).sum(dim=-1)
    torch.testing.assert_close(
        kd_loss(z, v, T, rule, reduction="none", scale_t2=False), kl, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(kd_loss(z, v, T, rule), T * T * kl.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        kd_loss(z, v, T, rule, reduction="none", scale_t2=False, form="ce"), ce, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(kd_loss(z, v, T, rule, form="ce"), T * T * ce.mean(), rtol=1e-12, atol=1e-12)


def test_rules_differ_for_several_teachers_and_agree_for_one() -> None:
    """The rule matters for K > 1 (so the tests above can tell the rules apart), not for K = 1."""
    z = _logits(B, C, seed=1)
    v = _logits(B, K, C, scale=3.0, seed=2)
    geo = kd_loss(z, v, 2.0, "geometric")
    ari = kd_loss(z, v, 2.0, "arithmetic")
    assert abs(geo - ari) > 1e-3
    v1 = v[:, :1]
    torch.testing.assert_close(kd_loss(z, v1, 2.0, "geometric"), kd_loss(z, v1, 2.0, "arithmetic"))


# --------------------------------------------------------------------------- eq. 4


def test_high_temperature_gradient_is_logit_matching() -> None:
    """Paper eq. 4: with zero-meaned z and v, dC/dz_i ~ (z_i - v_i) / (N T^2) at high T.

    Logits ~ N(0, 1), N = C = 10 classes. Measured relative error (Frobenius norm of the
    difference over the norm of the approximation): 0.64 % at T = 100, 0.064 % at
    T = 1000. Asserted: < 2 % at T = 100, and at least 5x smaller at T = 1000 (the
    approximation converges like 1/T). The T^2-scaled gradient at T = 100 also matches
    the gradient of logit_matching_loss divided by N (per sample) within 2 %.
    """
    z = _zero_mean(_logits(B, C, seed=3))
    v = _zero_mean(_logits(B, C, seed=4))

    def rel_err(T: float) -> float:
        grad = _soft_grad(z, v, T, reduction="sum", scale_t2=False)
        approx = (z - v) / (C * T * T)
        return ((grad - approx).norm() / approx.norm()).item()

    err100, err1000 = rel_err(100.0), rel_err(1000.0)
    assert err100 < 0.02, err100
    assert err1000 < err100 / 5, (err100, err1000)

    grad_kd = _soft_grad(z, v, 100.0, reduction="sum", scale_t2=True)
    zz = z.clone().requires_grad_(True)
    (logit_matching_loss(zz, v) * B).backward()  # mean over batch -> per-sample sum
    rel = ((grad_kd - zz.grad / C).norm() / (zz.grad / C).norm()).item()
    assert rel < 0.02, rel


# --------------------------------------------------------------------------- T^2 scaling


def test_t2_scaling_keeps_soft_gradient_norm_roughly_constant() -> None:
    """Gradient norm of the soft term (reduction "sum") w.r.t. the student logits.

    Logits ~ N(0, 1), zero-meaned, B = 8, C = 10. Measured with T^2 scaling:
    |g| = 1.894 (T=1), 1.771 (T=4), 1.734 (T=20): max/min 1.09, and 1.02 between T=4
    and T=20 (the high-T regime is flat; T=1 differs more, and more so for larger
    logits: 1.43 with logits ~ N(0, 9)). Asserted: max/min < 1.25, T=4 vs T=20 < 1.1.
    Without scaling the norm falls ~1/T^2: measured 17.1x (T=4) and 437x (T=20) below
    T=1. Asserted: > 10x and > 200x, and |g| T^2 again within a factor 1.25.
    """
    z = _zero_mean(_logits(B, C, seed=5))
    v = _zero_mean(_logits(B, C, seed=6))
    temps = (1.0, 4.0, 20.0)
    scaled = [_soft_grad(z, v, T, reduction="sum", scale_t2=True).norm().item() for T in temps]
    unscaled = [_soft_grad(z, v, T, reduction="sum", scale_t2=False).norm().item() for T in temps]

    assert max(scaled) / min(scaled) < 1.25, scaled
    assert max(scaled[1:]) / min(scaled[1:]) < 1.1, scaled
    assert unscaled[0] / unscaled[1] > 10, unscaled
    assert unscaled[0] / unscaled[2] > 200, unscaled
    restored = [g * T * T for g, T in zip(unscaled, temps, strict=True)]
    assert max(restored) / min(restored) < 1.25, restored
    for s, r in zip(scaled, restored, strict=True):
        assert s == pytest.approx(r, rel=1e-12)


# --------------------------------------------------------------------------- Hinton's combined loss


def _labels() -> torch.Tensor:
    return torch.tensor([3, -1, 0, 9, -1, -1, 5, 3], dtype=torch.int64)


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
def test_distillation_loss_equals_hand_computed_combination(rule: str) -> None:
    z = _logits(B, C, scale=2.0, seed=7)
    v = _logits(B, K, C, scale=3.0, seed=8)
    y = _labels()
    T, alpha = 3.0, 0.7
    p = _reference_target(v, T, rule)
    soft_ce = -(p * torch.log_softmax(z / T, dim=-1)).sum(dim=-1).mean()  # over all 8 rows
    soft_kl = (p * (torch.log(p) - torch.log_softmax(z / T, dim=-1))).sum(dim=-1).mean()
    labelled = [i for i in range(B) if y[i] >= 0]
    hard = -sum(torch.log_softmax(z[i], dim=-1)[y[i]] for i in labelled) / len(labelled)  # 5 rows
    got = distillation_loss(z, v, y, T, alpha, rule)
    torch.testing.assert_close(got, alpha * T * T * soft_kl + (1 - alpha) * hard, rtol=1e-12, atol=1e-12)
    assert got.dtype == torch.float64
    got_ce = distillation_loss(z, v, y, T, alpha, rule, form="ce")
    torch.testing.assert_close(got_ce, alpha * T * T * soft_ce + (1 - alpha) * hard, rtol=1e-12, atol=1e-12)
    module = DistillationLoss(T, alpha, rule, form="ce")
    torch.testing.assert_close(module(z, v, y), got_ce, rtol=0, atol=0)


def test_unlabelled_rows_are_excluded_from_the_hard_term() -> None:
    z = _logits(B, C, seed=9)
    v = _logits(B, C, seed=10)
    y = _labels()
    keep = y != -1
    hard = distillation_loss(z, v, y, 2.0, alpha=0.0)
    torch.testing.assert_close(hard, F.cross_entropy(z[keep], y[keep]), rtol=1e-12, atol=0)
    # changing an unlabelled row's student logits leaves the hard term unchanged
    z2 = z.clone()
    z2[1] += torch.linspace(-5, 5, C, dtype=torch.float64)
    torch.testing.assert_close(distillation_loss(z2, v, y, 2.0, alpha=0.0), hard, rtol=1e-12, atol=0)
    # a custom ignore_index
    y7 = torch.where(keep, y, torch.full_like(y, 7))
    y7[0] = 3
    with_7 = distillation_loss(z, v, y7, 2.0, 0.0, ignore_index=7)
    torch.testing.assert_close(with_7, hard, rtol=1e-12, atol=0)
    # all unlabelled: the hard term is 0 (not NaN), and the soft term remains
    none = torch.full((B,), -1, dtype=torch.int64)
    assert distillation_loss(z, v, none, 2.0, alpha=0.0).item() == 0.0
    torch.testing.assert_close(distillation_loss(z, v, none, 2.0, alpha=0.25), 0.25 * kd_loss(z, v, 2.0))


def test_alpha_one_is_the_pure_soft_term_and_alpha_is_validated() -> None:
    z = _logits(B, C, seed=11)
    v = _logits(B, K, C, seed=12)
    y = _labels()
    for rule in ("geometric", "arithmetic"):
        torch.testing.assert_close(
            distillation_loss(z, v, y, 4.0, 1.0, rule), kd_loss(z, v, 4.0, rule), rtol=1e-14, atol=0
        )
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            distillation_loss(z, v, y, 4.0, bad)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(z, v, y[:-1], 4.0, 0.5)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(z, v, y.double(), 4.0, 0.5)


# --------------------------------------------------------------------------- dtypes, devices, detach


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
@pytest.mark.parametrize(
    ("dtype", "loss_tol", "grad_tol"), [(torch.float16, 1e-4, 2e-3), (torch.bfloat16, 5e-4, 1.5e-2)]
)
@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_low_precision_teacher_logits(rule: str, dtype: torch.dtype, loss_tol: float, grad_tol: float,
                                      T: float) -> None:
    """Teacher logits stored as float16/bfloat16 (zero-meaned, ~N(0, 16), K=5, C=100).

    Measured against float32 teachers: float16 loss rel. diff <= 1.1e-5, gradient rel.
    diff <= 4.8e-4; bfloat16 <= 7.4e-5 and <= 3.9e-3 (worst at T=1, arithmetic).
    Asserted: 1e-4 / 2e-3 (float16) and 5e-4 / 1.5e-2 (bfloat16). The loss is computed in
    float32: identical to the loss on the same stored values upcast beforehand.
    """
    g = _gen(13)
    z = torch.randn(64, 100, generator=g) * 3
    v = _zero_mean(torch.randn(64, K, 100, generator=g) * 4)
    low = v.to(dtype)
    l32 = kd_loss(z, v, T, rule)
    llow = kd_loss(z, low, T, rule)
    assert llow.dtype == torch.float32
    assert torch.equal(llow, kd_loss(z, low.float(), T, rule))
    assert abs(llow.item() - l32.item()) / l32.item() < loss_tol

    g32 = _soft_grad(z, v, T, rule)
    glow = _soft_grad(z, low, T, rule)
    assert glow.dtype == torch.float32
    assert ((glow - g32).norm() / g32.norm()).item() < grad_tol


def test_compute_dtype_and_detached_targets() -> None:
    z = _logits(B, C, dtype=torch.float32, seed=14)
    v = _logits(B, K, C, dtype=torch.float32, seed=15).requires_grad_(True)
    # float64 student: computed in float64 even with a float16 teacher
    assert kd_loss(z.double(), v.detach().half(), 2.0).dtype == torch.float64
    # float16 / bfloat16 student (autocast output): computed in float32, grads flow back
    for low in (torch.float16, torch.bfloat16):
        zl = z.to(low).requires_grad_(True)
        loss = distillation_loss(zl, v, _labels(), 2.0, 0.5)
        assert loss.dtype == torch.float32
        loss.backward()
        assert zl.grad is not None and zl.grad.dtype == low and torch.isfinite(zl.grad.float()).all()
    # no gradient into the teacher logits
    zz = z.clone().requires_grad_(True)
    (kd_loss(zz, v, 2.0) + logit_matching_loss(zz, v)).backward()
    assert v.grad is None
    assert zz.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teacher_logits_move_to_the_student_device() -> None:
    z = _logits(B, C, dtype=torch.float32, seed=16).cuda()
    v = _logits(B, K, C, dtype=torch.float32, seed=17)
    loss = kd_loss(z, v.half(), 3.0)  # teacher on CPU, float16
    assert loss.device == z.device
    torch.testing.assert_close(loss.cpu(), kd_loss(z.cpu(), v.half(), 3.0), rtol=1e-5, atol=1e-6)
    labels = _labels().cuda()
    assert distillation_loss(z, v, labels, 3.0, 0.5).device == z.device
    assert logit_matching_loss(z, v.bfloat16()).device == z.device


# --------------------------------------------------------------------------- schedules


def test_temperature_schedule() -> None:
    z = _logits(B, C, seed=18)
    v = _logits(B, K, C, seed=19)

    def schedule(step: int) -> float:
        return 1.0 + 0.5 * step

    torch.testing.assert_close(kd_loss(z, v, schedule, step=6), kd_loss(z, v, 4.0), rtol=0, atol=0)
    torch.testing.assert_close(
        distillation_loss(z, v, _labels(), schedule, 0.3, step=2),
        distillation_loss(z, v, _labels(), 2.0, 0.3),
    )
    with pytest.raises(ValueError, match="step"):
        kd_loss(z, v, schedule)
    with pytest.raises(ValueError, match="step"):
        distillation_loss(z, v, _labels(), schedule, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(z, v, lambda step: 0.0, step=1)
    assert resolve_temperature(2.5) == 2.5
    assert resolve_temperature(schedule, 4) == 3.0


def test_distillation_loss_module_counts_steps() -> None:
    z = _logits(B, C, seed=20)
    v = _logits(B, K, C, seed=21)
    y = _labels()

    def schedule(step: int) -> float:
        return 1.0 + step

    mod = DistillationLoss(schedule, alpha=0.6, rule="arithmetic")
    for step in range(3):
        assert mod.step_count == step
        expected = distillation_loss(z, v, y, 1.0 + step, 0.6, "arithmetic")
        torch.testing.assert_close(mod(z, v, y), expected, rtol=0, atol=0)
    assert mod.step_count == 3
    # eval mode and an explicit step do not advance the counter
    mod.eval()
    expected = distillation_loss(z, v, y, 4.0, 0.6, "arithmetic")
    torch.testing.assert_close(mod(z, v, y), expected, rtol=0, atol=0)
    mod.train()
    torch.testing.assert_close(mod(z, v, y, step=0), distillation_loss(z, v, y, 1.0, 0.6, "arithmetic"))
    assert mod.step_count == 3
    # labels=None: every row unlabelled
    torch.testing.assert_close(mod(z, v), 0.6 * kd_loss(z, v, 4.0, "arithmetic"))
    # the counter survives state_dict round trips (resumption)
    fresh = DistillationLoss(schedule, alpha=0.6, rule="arithmetic")
    fresh.load_state_dict(mod.state_dict())
    assert fresh.step_count == 4
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(2.0, alpha=2.0)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(-1.0)


# --------------------------------------------------------------------------- logit matching


def test_logit_matching_closed_form() -> None:
    """1/2 ||z - v||^2 after zero-meaning both per row; sum over classes, mean over batch."""
    z = _logits(B, C, scale=2.0, seed=22)
    v = _logits(B, C, scale=3.0, seed=23)
    expected = 0.0
    for b in range(B):
        zb = [z[b, i].item() - z[b].mean().item() for i in range(C)]
        vb = [v[b, i].item() - v[b].mean().item() for i in range(C)]
        expected += 0.5 * sum((a - c) ** 2 for a, c in zip(zb, vb, strict=True)) / B
    assert logit_matching_loss(z, v).item() == pytest.approx(expected, rel=1e-12)
    # shift invariance per row: it is the zero-meaned logits that are matched
    shift = torch.arange(B, dtype=torch.float64)[:, None] * 7.0
    assert logit_matching_loss(z + shift, v - shift).item() == pytest.approx(expected, rel=1e-12)
    assert logit_matching_loss(z, z + shift).item() == pytest.approx(0.0, abs=1e-20)


def test_logit_matching_per_teacher() -> None:
    z = _logits(B, C, seed=24)
    v = _logits(B, K, C, seed=25)
    mean_logits = v.mean(dim=1)
    expected = logit_matching_loss(z, mean_logits)
    torch.testing.assert_close(logit_matching_loss(z, v), expected, rtol=1e-14, atol=0)
    # arithmetic: fine for a single logit vector, refused for K > 1
    single = logit_matching_loss(z, v[:, 0])
    torch.testing.assert_close(logit_matching_loss(z, v[:, :1], "arithmetic"), single)
    torch.testing.assert_close(logit_matching_loss(z, v[:, 0], "arithmetic"), single)
    with pytest.raises(ValueError, match="arithmetic"):
        logit_matching_loss(z, v, "arithmetic")


# --------------------------------------------------------------------------- errors


def test_shape_errors() -> None:
    z = _logits(B, C)
    cases = [
        (z, _logits(B + 1, C), "batch size"),
        (z, _logits(B + 1, K, C), "batch size"),
        (z, _logits(B, C + 1), "class count"),
        (z, _logits(B, K, C + 1), "class count"),
        (_logits(B, 2, C), _logits(B, C), r"student logits must be \[B, C\]"),
        (z, _logits(B, 2, K, C), r"teacher logits must be"),
        (z, _logits(B, 0, C), "K = 0"),
    ]
    for student, teacher, message in cases:
        with pytest.raises(ValueError, match=message):
            kd_loss(student, teacher, 2.0)
        with pytest.raises(ValueError, match=message):
            logit_matching_loss(student, teacher)
        with pytest.raises(ValueError, match=message):
            distillation_loss(student, teacher, _labels(), 2.0, 0.5)


def test_rule_temperature_and_reduction_errors() -> None:
    z = _logits(B, C)
    v = _logits(B, K, C)
    with pytest.raises(ValueError, match="rule 'harmonic'"):
        kd_loss(z, v, 2.0, "harmonic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule 'harmonic'"):
        distillation_loss(z, v, _labels(), 2.0, 0.5, "harmonic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule 'harmonic'"):
        logit_matching_loss(z, v, "harmonic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule 'harmonic'"):
        DistillationLoss(2.0, rule="harmonic")  # type: ignore[arg-type]
    for bad in (0.0, -1.0, math.nan, math.inf, "hot"):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(z, v, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="temperature"):
            distillation_loss(z, v, _labels(), bad, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(z, v, 2.0, reduction="max")  # type: ignore[arg-type]
