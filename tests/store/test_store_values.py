"""What a store gives back: stored bits, ensemble targets at any T, refusals, float16 overflow.

References are float64 numpy, computed from the original logits without softtargets.math.temperature.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softtargets as st
from softtargets.store.encoding import encode_logits
from tests.store_data import (
    DTYPES,
    LAYOUTS,
    TEMPERATURES,
    TORCH_DTYPE,
    arithmetic_ref,
    bits,
    geometric_ref,
    kl,
    softmax,
    store_path,
    teacher_logits,
    write_store,
)

N = 70  # 3 shards of 32 rows (the last partial), blocks of 8
# Worst row KL measured on these logits (spread 2.5, offsets 5, C=10, K=3): float16 1.2e-6 nats at T=0.5;
# bfloat16 6.5e-5 at T=0.5, 1.8e-5 at T=1, 1.8e-8 at T=20 -- it scales as 1/T^2. Stated bound:
BF16_KL_AT_T1 = 5e-5  # bfloat16 storage: KL <= 5e-5 / T^2 nats
F16_KL = 1e-5
F32_ABS = 1e-6


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return teacher_logits(N)


@pytest.fixture(scope="module", params=[(lay, dt) for lay in LAYOUTS for dt in DTYPES], ids=lambda p: "-".join(p))
def per_teacher(request, tmp_path_factory, x):
    layout, dtype = request.param
    path = store_path(tmp_path_factory.mktemp(f"{layout}-{dtype}"), layout)
    write_store(path, x, layout=layout, dtype=dtype, labels=torch.arange(N) % 10)
    return st.open_targets(path, verify="full"), layout, dtype


def test_round_trip_is_bitwise_zero_mean_in_stored_dtype(per_teacher, x):
    store, layout, dtype = per_teacher
    assert len(store) == N and store.manifest.layout == layout and store.manifest.dtype == dtype
    got = store[:]
    want = (x - x.mean(dim=-1, keepdim=True)).to(TORCH_DTYPE[dtype])
    assert got["logits"].dtype == TORCH_DTYPE[dtype]
    assert got["logits"].shape == (N, 3, 10)
    assert torch.equal(bits(got["logits"]), bits(want))
    assert got["label"].tolist() == [i % 10 for i in range(N)]
    assert got["index"].tolist() == list(range(N))
    assert got["key"][:2] == ["sample-00000", "sample-00001"]
    one = store[45]
    assert torch.equal(bits(one["logits"]), bits(want[45])) and one["label"] == 5 and one["key"] == "sample-00045"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_without_normalization_is_the_input_cast(tmp_path, layout, dtype):
    x = teacher_logits(20, seed=3)
    write_store(store_path(tmp_path, layout), x, layout=layout, dtype=dtype, normalization="none", shard_rows=8,
                block_rows=4)
    got = st.open_targets(store_path(tmp_path, layout))[:]["logits"]
    assert torch.equal(bits(got), bits(x.to(TORCH_DTYPE[dtype])))
    assert got.float().mean(dim=-1).abs().max() > 1.0  # the row offsets survived: nothing was subtracted


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
def test_targets_at_every_temperature_match_float64_reference(per_teacher, x, rule):
    store, _, dtype = per_teacher
    v = x.numpy()
    idx = np.arange(N)
    ref_fn = geometric_ref if rule == "geometric" else arithmetic_ref
    for t in TEMPERATURES:
        ref = ref_fn(v, t)
        p = store.probs(idx, temperature=t, rule=rule, dtype=torch.float64).numpy()
        log_q = store.log_probs(idx, temperature=t, rule=rule, dtype=torch.float64).numpy()
        assert p.shape == (N, 10)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-12)
        worst = kl(ref, log_q).max()
        if dtype == "float32":
            assert np.abs(p - ref).max() <= F32_ABS, (t, np.abs(p - ref).max())
        elif dtype == "float16":
            assert worst <= F16_KL, (t, worst)
        else:
            assert worst <= BF16_KL_AT_T1 / t**2, (t, worst)
    # the default output dtype is float32; any index order works
    q = store.probs([5, 0, 5], temperature=2.5, rule=rule)
    assert q.dtype == torch.float32 and q.shape == (3, 10)
    assert torch.equal(q[0], q[2])


def test_rules_differ_so_the_comparison_can_fail(x):
    v = x.numpy()
    assert np.abs(geometric_ref(v, 1.0) - arithmetic_ref(v, 1.0)).max() > 1e-2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_geometric_content_store_serves_geometric_at_any_t(tmp_path, x, layout):
    v = x.numpy()
    reduced = torch.from_numpy(v.mean(axis=1))  # mean teacher logits [N, C]
    m = write_store(store_path(tmp_path, layout), reduced, layout=layout, dtype="float32", content="geometric",
                    num_teachers=3)
    assert m.content == "geometric" and m.num_teachers == 3
    store = st.open_targets(store_path(tmp_path, layout))
    assert store[:]["logits"].shape == (N, 10)
    for t in TEMPERATURES:
        p = store.probs(np.arange(N), t, "geometric", dtype=torch.float64).numpy()
        assert np.abs(p - geometric_ref(v, t)).max() <= F32_ABS
    with pytest.raises(ValueError, match=r"geometric-mean logits.*arithmetic"):
        store.probs([0], 1.0, "arithmetic")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_arithmetic_content_store_serves_its_t0_and_refuses_the_rest(tmp_path, x, layout):
    v = x.numpy()
    t0 = 2.5
    reduced = torch.from_numpy(np.log(arithmetic_ref(v, t0)))  # log mean_k softmax(v_k / T0) [N, C]
    m = write_store(store_path(tmp_path, layout), reduced, layout=layout, dtype="float32", content="arithmetic",
                    num_teachers=3, temperature=t0)
    assert m.content == "arithmetic" and m.temperature == t0
    store = st.open_targets(store_path(tmp_path, layout))
    idx = np.arange(N)
    p = store.probs(idx, t0, "arithmetic", dtype=torch.float64).numpy()
    assert np.abs(p - arithmetic_ref(v, t0)).max() <= F32_ABS
    with pytest.raises(ValueError, match=r"exact only at T0=2\.5.*approximate=True"):
        store.probs(idx, 1.0, "arithmetic")
    with pytest.raises(ValueError, match=r"arithmetic-mean.*geometric targets"):
        store.probs(idx, t0, "geometric")
    # The opt-in approximation, re-tempered from T0: its error is real (nonzero) and bounded. Mean KL measured
    # on these logits: 0.065 nats at T=1, 0.0010 at T=7.3 (0.46 at T=0.5: far from T0 it is poor).
    for t, bound in ((1.0, 0.15), (7.3, 0.005)):
        log_q = store.log_probs(idx, t, "arithmetic", approximate=True, dtype=torch.float64).numpy()
        err = kl(arithmetic_ref(v, t), log_q).mean()
        assert 1e-4 < err < bound, (t, err)


def test_single_teacher_geometric_store_serves_both_rules(tmp_path, x):
    one = x[:, 0, :]
    write_store(tmp_path / "k1.zarr", one, layout="zarr", dtype="float32", content="geometric")
    store = st.open_targets(tmp_path / "k1.zarr")
    want = softmax(one.numpy() / 7.3)
    for rule in ("geometric", "arithmetic"):
        assert np.abs(store.probs(np.arange(N), 7.3, rule, dtype=torch.float64).numpy() - want).max() <= F32_ABS


def test_bad_rule_and_temperature_are_refused(per_teacher):
    store = per_teacher[0]
    with pytest.raises(ValueError, match="unknown ensemble rule"):
        store.probs([0], 1.0, "harmonic")
    with pytest.raises(ValueError, match="temperature must be"):
        store.probs([0], 0.0)


# -- float16 range ------------------------------------------------------------------------------


def _huge(n: int = 16) -> torch.Tensor:
    x = teacher_logits(n, k=1, seed=5)[:, 0, :]
    x[3, 2] = 1.0e5  # zero-meaned: 1e5 * (1 - 1/10) = 90000 > 65504
    x[9, 7] = -2.0e5
    return x


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float16_overflow_is_refused_by_default(tmp_path, layout):
    w = st.create_targets(store_path(tmp_path, layout), num_classes=10, layout=layout, dtype="float16",
                          content="geometric", shard_rows=8, block_rows=4)
    with pytest.raises(OverflowError, match=r"exceed float16's range.*overflow='clip'"):
        w.write([str(i) for i in range(16)], _huge())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float16_overflow_clipped_on_request_and_counted(tmp_path, layout):
    m = write_store(store_path(tmp_path, layout), _huge(), layout=layout, dtype="float16", content="geometric",
                    overflow="clip", shard_rows=8, block_rows=4)
    assert m.clipped_values == 2 and m.overflow == "clip"
    assert [s.clipped for s in m.shards] == [1, 1]
    got = st.open_targets(store_path(tmp_path, layout))[:]["logits"]
    assert torch.isfinite(got).all()
    assert got[3, 2].item() == 65504.0 and got[9, 7].item() == -65504.0
    assert got.abs().max().item() == 65504.0


@pytest.mark.parametrize("value", [65504.0, 65503.99, 65504.01, 65519.0, 65520.0])
def test_float16_limit_is_judged_before_rounding(value):
    """Shifted values up to 65504 are stored; beyond it they are refused (or clipped and counted), also
    those that float16 would round back to 65504 (below 65520)."""
    x = torch.tensor([[value, -value], [1.0, -3.0]])  # row means 0 and -1
    shifted = float(torch.tensor(value, dtype=torch.float32))
    if shifted <= 65504.0:
        stored, clipped = encode_logits(x, "float16")
        assert clipped == 0 and stored.tolist() == [[np.float16(shifted), -np.float16(shifted)], [2.0, -2.0]]
        return
    with pytest.raises(OverflowError, match="exceed float16's range"):
        encode_logits(x, "float16")
    stored, clipped = encode_logits(x, "float16", overflow="clip")
    assert clipped == 2 and stored.tolist() == [[65504.0, -65504.0], [2.0, -2.0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_refused_even_with_clip(tmp_path, dtype, bad):
    x = teacher_logits(8, k=1, seed=6)[:, 0, :]
    x[4, 1] = bad
    w = st.create_targets(tmp_path / "nf.zarr", num_classes=10, dtype=dtype, content="geometric", overflow="clip",
                          shard_rows=8, block_rows=4)
    with pytest.raises(ValueError, match=r"NaN or Inf in rows \[4\]"):
        w.write([str(i) for i in range(8)], x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_values_beyond_the_stored_range_never_become_inf(tmp_path, dtype):
    # float64 1e300 overflows float32; float32's max rounds up to inf in bfloat16.
    x = teacher_logits(8, k=1, seed=7)[:, 0, :]
    x[2, 2] = 1e300 if dtype == "float32" else float(torch.finfo(torch.float32).max)
    w = st.create_targets(tmp_path / "big.zarr", num_classes=10, dtype=dtype, content="geometric",
                          normalization="none", shard_rows=8, block_rows=4)
    with pytest.raises(OverflowError, match=f"overflow {dtype}"):
        w.write([str(i) for i in range(8)], x)
