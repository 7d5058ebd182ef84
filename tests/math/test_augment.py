"""RandomView: views drawn from a generator are rebuilt exactly from their parameters, one by one or batched;
each part of the map does what its parameter says."""

from __future__ import annotations

import pytest
import torch

from softtargets.math.augment import RandomView


def image(b: int = 0) -> torch.Tensor:
    return torch.rand(*((b,) if b else ()), 3, 12, 16, generator=torch.Generator().manual_seed(4))


def test_a_drawn_view_is_rebuilt_from_its_parameters_alone_and_in_a_batch():
    aug = RandomView(scale=(0.3, 1.0), ratio=(0.75, 1.33), flip=0.5, degrees=10, translate=0.1, size=(8, 8))
    xs = image(6)
    views, params = [], []
    for i in range(6):
        v, p = aug(xs[i], torch.Generator().manual_seed(i))
        assert v.shape == (3, 8, 8)
        again, p2 = aug(xs[i], torch.Generator().manual_seed(i))
        assert torch.equal(v, again) and p == p2  # the generator decides everything
        assert torch.equal(aug.replay(xs[i], p), v)
        views.append(v)
        params.append(p)
    batched = {k: torch.tensor([p[k] for p in params]) for k in params[0]}
    torch.testing.assert_close(aug.replay(xs, batched), torch.stack(views), atol=1e-6, rtol=0)
    assert len({p["crop_w"] for p in params}) > 1 and {p["flip"] for p in params} == {0, 1}


def test_the_identity_parameters_give_the_image_back():
    x = image()
    out = RandomView(flip=0.5, degrees=5).replay(x, {"flip": 0, "angle": 0.0})
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_flip_mirrors_and_a_translation_of_one_pixel_shifts_by_one_pixel():
    x = image()
    aug = RandomView(flip=1.0, translate=0.1)
    torch.testing.assert_close(aug.replay(x, {"flip": 1, "tx": 0.0, "ty": 0.0}), x.flip(-1), atol=1e-6, rtol=0)
    shifted = aug.replay(x, {"flip": 0, "tx": 2 / 16, "ty": 0.0})  # 2 / W normalised = one pixel: sample x + 1
    torch.testing.assert_close(shifted[..., :-1], x[..., 1:], atol=1e-5, rtol=0)
    assert (shifted[..., -1] == 0).all()  # zeros come in from outside


def test_a_crop_of_the_left_half_reads_the_left_half():
    x = image()
    aug = RandomView(scale=(0.5, 0.5), size=(12, 8))
    left = aug.replay(x, {"crop_x": -0.5, "crop_y": 0.0, "crop_w": 0.5, "crop_h": 1.0})
    torch.testing.assert_close(left, x[..., :8], atol=1e-5, rtol=0)


def test_flat_inputs_and_parameter_dtypes():
    aug = RandomView(degrees=15, translate=0.125, shape=(1, 8, 8), param_dtype="float16")
    assert aug.param_dtypes == {"angle": "float16", "tx": "float16", "ty": "float16"}
    x = torch.rand(64)
    v, p = aug(x, torch.Generator().manual_seed(0))
    assert v.shape == (64,)
    assert all(float(torch.tensor(val, dtype=torch.float16)) == val for val in p.values())
    assert -15 <= p["angle"] <= 15 and abs(p["tx"]) <= 0.25
    with pytest.raises(ValueError, match="scale"):
        RandomView(scale=(0.0, 1.0))


def test_a_batch_of_random_views_at_once():
    aug = RandomView(scale=(0.5, 1.0), ratio=(0.75, 1.33), flip=0.5, degrees=10, translate=0.1, param_dtype="float16")
    p = aug.sample_batch(500, torch.Generator().manual_seed(0))
    assert set(p) == set(aug.param_dtypes) and all(len(v) == 500 for v in p.values())
    assert p["flip"].dtype == torch.uint8 and p["angle"].dtype == torch.float16
    assert 0.4 < float(p["flip"].float().mean()) < 0.6 and float(p["angle"].abs().max()) <= 10
    area = (p["crop_w"].float() * p["crop_h"].float())
    assert float(area.min()) > 0.45 and float(area.max()) <= 1.01
    assert aug.replay(image(500), p).shape == (500, 3, 12, 16)
