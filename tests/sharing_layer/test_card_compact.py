"""The dataset card of compact stores (topk, sampled, hidden), sequence stores and views stores: what it says they
hold, and its plain zarr / webdataset recipes run as written against what softtargets reads."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import softtargets as st
from softtargets.math.compact import decode_hidden, head_logits
from softtargets.math.compact_losses import sampled_weights, topk_log_probs
from softtargets.precompute.sequences import precompute_sequences
from softtargets.store.card import URL_PLACEHOLDER
from softtargets.store.compact_rows import compact_spec_of

N, C = 30, 40


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C)) for _ in range(2)]


def make(tmp_path, teachers, spec, content, layout="zarr"):
    url = tmp_path / f"{spec.kind}-{content}.{layout}"
    ds = TensorDataset(torch.randn(N, 5, generator=torch.Generator().manual_seed(1)), torch.arange(N) % C)
    st.precompute(teachers, ds, url, content=content, compact=spec, progress=False, num_workers=0, layout=layout,
                  shard_rows=16, batch_size=8)
    return url


def blocks(url) -> list[str]:
    text = (url / "README.md").read_text().replace(URL_PLACEHOLDER, str(url))
    return re.findall(r"```python\n(.*?)```", text.split("## Read it without softtargets", 1)[1], flags=re.S)


def run(code: str) -> dict:
    ns: dict = {}
    exec(code, ns)  # noqa: S102 - the recipe under test
    return ns


@pytest.mark.parametrize("content", ["geometric", "per_teacher"])
def test_topk_card_gives_the_probabilities_the_losses_use(tmp_path, teachers, content):
    spec = st.CompactSpec("topk", k=6, temperatures=(0.5, 1.0, 2.0, 4.0))
    url = make(tmp_path, teachers, spec, content)
    text = (url / "README.md").read_text()
    assert "**topk**" in text and "Not logits" in text and "Measured `tail_error`" in text
    (code,) = blocks(url)  # plain zarr only: no dask recipe of bytes
    ns = run(code)
    store = st.open_targets(url)
    fields = store.compact_fields(range(N))
    lp_top, lp_tail = topk_log_probs(fields, compact_spec_of(store.manifest), ns["T"])
    assert np.array_equal(ns["rec"]["ids"], fields["ids"].numpy())
    np.testing.assert_allclose(ns["p_top"], lp_top.exp().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ns["p_tail"], lp_tail.exp().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ns["p_top"].sum(-1) + ns["p_tail"], 1.0, rtol=1e-9)


def test_sampled_card_gives_the_importance_weights(tmp_path, teachers):
    spec = st.CompactSpec("sampled", k=8, temperatures=(1.0, 2.0, 4.0), proposal_temperature=1.0, seed=2)
    url = make(tmp_path, teachers, spec, "geometric")
    ns = run(blocks(url)[0])
    store = st.open_targets(url)
    weights, _ = sampled_weights(store.compact_fields(range(N)), compact_spec_of(store.manifest), ns["T"])
    np.testing.assert_allclose(ns["weights"], weights.numpy(), rtol=1e-6)


@pytest.mark.parametrize(("content", "quant"), [("geometric", "float16"), ("per_teacher", "int8")])
def test_hidden_card_rebuilds_every_logit(tmp_path, teachers, content, quant):
    url = make(tmp_path, teachers, st.CompactSpec("hidden", head="2", quantization=quant), content)
    ns = run(blocks(url)[0])
    store = st.open_targets(url)
    weight, bias = store.head()
    z = head_logits(decode_hidden(store.compact_fields(range(N))), weight, bias)
    np.testing.assert_allclose(ns["z"], z.numpy(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and those are the teachers' logits, to the stored precision
        x = TensorDataset(torch.randn(N, 5, generator=torch.Generator().manual_seed(1))).tensors[0]
        ref = torch.stack([t(x) for t in teachers], 1)
    ref = ref.mean(1) if content == "geometric" else ref
    assert float((torch.from_numpy(ns["z"]) - ref).abs().max()) <= store.manifest.compact["logit_error"] * 1.01 + 1e-6


def test_topk_card_plain_webdataset(tmp_path, teachers):
    spec = st.CompactSpec("topk", k=4, temperatures=(1.0, 2.0))
    url = make(tmp_path, teachers, spec, "geometric", layout="wds")
    (code,) = blocks(url)
    seen: list[dict] = []
    ns = {"seen": seen}
    exec(code.replace("    logz = ", "    seen.append(dict(locals()))\n    logz = "), ns)  # noqa: S102
    store = st.open_targets(url)
    fields = store.compact_fields(range(N))
    assert sum(len(s["index"]) for s in seen) == N
    for s in seen:
        assert np.array_equal(s["rec"]["ids"], fields["ids"][s["index"]].numpy())


def test_sequence_and_views_stores_are_described(tmp_path, teachers):
    seqs = [(f"s{i}", np.arange(i + 1) % C) for i in range(5)]
    lm = nn.Sequential(nn.Embedding(C, 8), nn.Linear(8, C))
    precompute_sequences([lm], seqs, tmp_path / "lm.zarr", vocab_size=C)
    text = (tmp_path / "lm.zarr" / "README.md").read_text()
    assert "**Sequences**: the rows are the token positions of 5 sequences (longest 5)" in text
    offsets = np.load(tmp_path / "lm.zarr" / "sequences" / "offsets.npy")  # the files the card names
    assert offsets.tolist() == [0, 1, 3, 6, 10, 15]

    def jitter(x, rng):
        dx = float(torch.rand((), generator=rng))
        return x + dx, {"dx": dx}

    ds = TensorDataset(torch.randn(6, 5), torch.zeros(6, dtype=torch.long))
    st.precompute(teachers, ds, tmp_path / "v.zarr", views=3, augment=jitter, progress=False, num_workers=0)
    text = (tmp_path / "v.zarr" / "README.md").read_text()
    assert "**Views**: 3 augmented views of each of 6 samples" in text and "parameters (dx)" in text
