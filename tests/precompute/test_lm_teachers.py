"""Stage one for language-model teachers (softtargets.precompute.sequences): plain modules and a transformers
causal LM built from a config, batched by length, padding-invariant, hidden states captured at the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import softtargets as st
from softtargets.precompute.sequences import length_batches, precompute_sequences
from tests.sequence_data import V, sequences


class TinyLM(nn.Module):
    """A causal LM of embeddings and a running mean over past positions: logits [B, L, V]."""

    def __init__(self, seed: int, d: int = 8):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, d)
        self.lm_head = nn.Linear(d, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return self.lm_head(torch.tanh(h))


def test_length_batches_sorted_and_bounded():
    lengths = [5, 1, 9, 5, 2, 9, 3]
    batches = length_batches(lengths, batch_tokens=10)
    assert sorted(i for b in batches for i in b) == list(range(7))
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths) and flat.index(0) < flat.index(3)  # ties: input order
    assert all(len(b) * max(lengths[i] for i in b) <= 10 or len(b) == 1 for b in batches)


@pytest.mark.parametrize("content", ["geometric", "per_teacher"])
def test_plain_modules_per_sequence_logits(tmp_path, content):
    seqs = sequences(9, seed=2)
    teachers = [TinyLM(0), TinyLM(1)]
    m = precompute_sequences(teachers, seqs, tmp_path / "t.zarr", vocab_size=V, content=content,
                             dtype="float32", batch_tokens=40)
    assert m.sequences["count"] == 9 and [t["name"] for t in m.teachers] == ["TinyLM-0", "TinyLM-1"]
    s = st.open_sequences(tmp_path / "t.zarr")
    by_key = dict(seqs)
    for i in range(len(s)):
        x = s[i]
        ids = torch.from_numpy(by_key[x["key"]])
        assert x["input_ids"].tolist() == ids.tolist()
        with torch.no_grad():  # each sequence alone, unpadded: padding in a batch changed nothing
            ref = torch.stack([t(ids[None])[0] for t in teachers], dim=1)  # [L, K, V]
        ref = ref.mean(1) if content == "geometric" else ref
        torch.testing.assert_close(x["teacher_logits"], ref - ref.mean(-1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert list(s.lengths) == sorted(s.lengths)  # stored in the order run: by length


def test_transformers_causal_lm_from_config_and_head_capture(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    seqs = sequences(6, seed=3)
    w = model.lm_head.weight.detach()

    def via_head(logits: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        assert hidden is not None and hidden.shape == (logits.shape[0], 1, 16)
        return hidden[:, 0] @ w.T  # the head applied to the captured hidden state: the logits again

    precompute_sequences([model], seqs, tmp_path / "h.zarr", vocab_size=V, dtype="float32", encode=via_head,
                         head="lm_head")
    precompute_sequences([model], seqs, tmp_path / "d.zarr", vocab_size=V, dtype="float32")
    h, d = st.open_sequences(tmp_path / "h.zarr"), st.open_sequences(tmp_path / "d.zarr")
    assert h.keys() == d.keys()
    for i in range(len(d)):
        torch.testing.assert_close(h[i]["teacher_logits"], d[i]["teacher_logits"], atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            ref = model(d[i]["input_ids"][None]).logits[0]
        torch.testing.assert_close(d[i]["teacher_logits"], ref - ref.mean(-1, keepdim=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no module named 'head'"):
        precompute_sequences([model], seqs, tmp_path / "x.zarr", vocab_size=V, head="head", encode=via_head)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lm_teachers_on_cuda_match_cpu(tmp_path):
    seqs = sequences(7, seed=4)
    precompute_sequences([TinyLM(0)], seqs, tmp_path / "c.zarr", vocab_size=V, dtype="float32")
    gpu = TinyLM(0).cuda()
    precompute_sequences([gpu], seqs, tmp_path / "g.zarr", vocab_size=V, dtype="float32", device="cuda")
    c, g = st.open_sequences(tmp_path / "c.zarr"), st.open_sequences(tmp_path / "g.zarr")
    for i in range(len(c)):
        torch.testing.assert_close(g[i]["teacher_logits"], c[i]["teacher_logits"], atol=1e-4, rtol=1e-4)
    assert np.array_equal(c.offsets, g.offsets)
