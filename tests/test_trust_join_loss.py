"""Recipes that never unpickle, joins that check they join the right dataset, a KD loss reported as KL."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softtargets.losses import DistillationLoss, distillation_loss, kd_loss

# -- the KD loss: KL by default, CE by name --------------------------------------------------------------


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
def test_kd_loss_is_zero_when_the_student_matches_the_geometric_teacher(rule):
    v = torch.randn(16, 3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    z = v.mean(1)  # the geometric ensemble's logits (for K = 1 also the arithmetic one's)
    for t in (1.0, 4.0, 20.0):
        assert kd_loss(z, v, t).item() == pytest.approx(0.0, abs=1e-12)
        assert kd_loss(z.float(), v.float(), t).item() == pytest.approx(0.0, abs=1e-5)
        assert kd_loss(z, v[:, :1], t, rule).item() != pytest.approx(0.0, abs=1e-3)  # a different target
        assert kd_loss(v[:, 0], v[:, :1], t, rule).item() == pytest.approx(0.0, abs=1e-12)
        assert kd_loss(z, v, t, form="ce").item() > 1.0  # CE adds the target's entropy, times T^2
    assert distillation_loss(z, v, torch.full((16,), -1), 4.0, 0.5).item() == pytest.approx(0.0, abs=1e-12)
    assert DistillationLoss(4.0, alpha=1.0)(z, v).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
@pytest.mark.parametrize("t", [0.5, 2.0, 10.0])
def test_kd_loss_equals_kldivloss_times_t2_and_has_the_ce_gradient(rule, t):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 40, generator=g, dtype=torch.float64) * 3
    v = torch.randn(32, 5, 40, generator=g, dtype=torch.float64) * 3
    if rule == "geometric":
        target = torch.log_softmax(v.mean(1) / t, -1)
    else:  # the arithmetic mixture of the K tempered distributions, exactly
        target = torch.log(torch.softmax(v / t, -1).mean(1))
    expected = nn.KLDivLoss(reduction="batchmean", log_target=True)(torch.log_softmax(z / t, -1), target) * t * t
    torch.testing.assert_close(kd_loss(z, v, t, rule), expected, rtol=1e-12, atol=1e-12)

    def grad(form):
        zz = z.clone().requires_grad_(True)
        kd_loss(zz, v, t, rule, form=form).backward()
        return zz.grad

    torch.testing.assert_close(grad("kl"), grad("ce"), rtol=0, atol=1e-14)
    entropy = -(target.exp() * target).sum(-1).mean() * t * t
    torch.testing.assert_close(kd_loss(z, v, t, rule, form="ce"), expected + entropy, rtol=1e-12, atol=1e-12)


def test_kd_loss_form_is_checked_and_kl_ignores_zero_probability_classes():
    z = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown loss form 'js'.*'kl'"):
        kd_loss(z, z, 1.0, form="js")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown loss form"):
        DistillationLoss(2.0, form="mse")  # type: ignore[arg-type]
    v = torch.tensor([[0.0, 0.0, -2000.0, -2000.0]] * 2, dtype=torch.float64)  # p = (1/2, 1/2, 0, 0) exactly
    zz = z.clone().requires_grad_(True)
    loss = kd_loss(zz, v, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(2.0))))  # KL((.5, .5, 0, 0) || uniform)
    assert torch.isfinite(zz.grad).all()
