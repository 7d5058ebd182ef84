"""Compact per-token targets of language-model teachers: precompute_sequences(compact=...) writes topk, sampled and
hidden sequence stores encoded on the device; stream_sequences carries their records; the losses read them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import softtargets as st
from softtargets.math.compact import CompactSpec
from softtargets.precompute.sequences import precompute_sequences
from softtargets.store.compact_rows import compact_spec_of
from tests.precompute.test_lm_teachers import TinyLM
from tests.sequence_data import V, sequences

GRID = (0.5, 1.0, 2.0, 4.0, 8.0)


@pytest.fixture(scope="module")
def setup():
    seqs = sequences(11, seed=5)
    teachers = [TinyLM(0), TinyLM(1)]
    with torch.no_grad():
        ref = {key: torch.stack([t(torch.from_numpy(ids)[None])[0] for t in teachers], 1).mean(1)
               for key, ids in seqs}  # each sequence alone: the geometric mean's logits [L, V]
    return seqs, teachers, ref


def write(tmp_path, setup, spec, layout="zarr", name=None):
    seqs, teachers, _ = setup
    url = tmp_path / f"{name or spec.kind}.{'zarr' if layout == 'zarr' else 'wds'}"
    m = precompute_sequences(teachers, seqs, url, vocab_size=V, compact=spec, batch_tokens=48, layout=layout)
    return url, m


def bucketed_kl(teacher: torch.Tensor, student: torch.Tensor, ids: torch.Tensor, t: float) -> float:
    """T^2 KL over the k ids and one tail bucket, both sides normalised over the whole vocabulary first,
    averaged over rows: the loss a topk store must give."""
    p, q = (torch.softmax(x.double() / t, -1) for x in (teacher, student))
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    pt, qt = 1 - pk.sum(-1), 1 - qk.sum(-1)
    kl = (pk * (pk / qk).log()).sum(-1) + pt * (pt / qt).log()
    return float(kl.mean()) * t * t


def by_sequence(store: st.SequenceStore) -> dict[str, dict[str, torch.Tensor]]:
    return {store[i]["key"]: st.unpack_rows(store.manifest, store[i]["teacher_logits"]) for i in range(len(store))}


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_topk_sequences_hold_the_mean_top_ids_and_an_exact_loss(tmp_path, setup, layout):
    _, teachers, ref = setup
    url, m = write(tmp_path, setup, CompactSpec("topk", k=6, temperatures=GRID), layout)
    assert m.compact["kind"] == "topk" and m.logits_shape == (m.num_samples, m.compact["row_bytes"])
    assert 0 < m.compact["tail_error"] < 1e-2  # measured over every row written, in nats
    assert st.verify_store(url).ok
    store = st.open_sequences(url, verify="full")
    spec = compact_spec_of(m)
    for key, fields in by_sequence(store).items():
        assert torch.equal(fields["ids"], ref[key].topk(6, -1).indices)
        for t in (0.5, 2.0, 8.0):  # the teacher as student: zero at every T of the range, on the same support
            assert abs(float(st.topk_kd_loss(ref[key], fields, spec, t))) < 1e-4
        student = torch.randn(ref[key].shape, generator=torch.Generator().manual_seed(len(key)))
        assert float(st.topk_kd_loss(student, fields, spec, 2.0)) == pytest.approx(
            bucketed_kl(ref[key], student, fields["ids"], 2.0), rel=1e-3)
    assert not any(t.lm_head._forward_hooks for t in teachers)  # nothing left on the caller's modules


def test_stream_batches_carry_records_the_losses_read(tmp_path, setup):
    _, _, ref = setup
    url, m = write(tmp_path, setup, CompactSpec("topk", k=6, temperatures=GRID))
    stream = st.stream_sequences(url, batch_size=3, seed=0)
    seen = 0
    for batch in stream:
        mask = batch["attention_mask"]
        records = batch["teacher_logits"]
        assert records.dtype == torch.uint8 and records.shape == (*mask.shape, m.compact["row_bytes"])
        fields = st.unpack_rows(stream.store.manifest, records[mask])
        student = torch.cat([ref[k][:int(n)] for k, n in zip(batch["key"], mask.sum(1), strict=True)])
        assert abs(float(st.compact_kd_loss(student, fields, m.compact, 1.0))) < 1e-4
        seen += int(mask.sum())
    assert seen == m.num_samples


@pytest.mark.parametrize("quantization", ["float16", "int8"])
def test_hidden_sequences_give_every_logit(tmp_path, setup, quantization):
    _, teachers, ref = setup
    url, m = write(tmp_path, setup, CompactSpec("hidden", head="lm_head", quantization=quantization),
                   name=f"hidden-{quantization}")
    d = sum(t.lm_head.in_features for t in teachers)
    assert m.compact["hidden_size"] == d
    assert m.compact["row_bytes"] == (2 * d if quantization == "float16" else d + 4)
    store = st.open_sequences(url)
    weight, bias = store.head()
    torch.testing.assert_close(weight, torch.cat([t.lm_head.weight for t in teachers], 1).detach() / 2)
    bound = m.compact["logit_error"]
    assert 0 < bound < (2e-3 if quantization == "float16" else 5e-2)
    for key, fields in by_sequence(store).items():
        logits = st.math.compact.head_logits(st.math.compact.decode_hidden(fields).float(), weight, bias)
        assert float((logits - ref[key]).abs().max()) <= bound * 1.01 + 1e-5
        assert abs(float(st.hidden_kd_loss(ref[key], fields, weight, bias, 4.0))) < 1e-3


def test_sampled_sequences_are_reproducible(tmp_path, setup):
    spec = CompactSpec("sampled", k=8, temperatures=GRID, proposal_temperature=1.0, seed=3)
    a_url, a = write(tmp_path, setup, spec, name="a")
    b_url, _ = write(tmp_path, setup, spec, name="b")
    a_rows = st.open_sequences(a_url).store.rows(0, a.num_samples)["logits"]
    assert torch.equal(a_rows, st.open_sequences(b_url).store.rows(0, a.num_samples)["logits"])
    fields = st.unpack_rows(a, a_rows)
    assert int(fields["counts"].sum(-1).min()) == 8 == int(fields["counts"].sum(-1).max())


def test_compact_refusals(tmp_path, setup):
    seqs, teachers, _ = setup
    with pytest.raises(ValueError, match="not both"):
        precompute_sequences(teachers, seqs, tmp_path / "x.zarr", vocab_size=V, compact="topk",
                             encode=lambda z, h: z)
    with pytest.raises(ValueError, match="no submodule 'head'"):
        precompute_sequences(teachers, seqs, tmp_path / "y.zarr", vocab_size=V,
                             compact=CompactSpec("hidden", head="head"))
    url, m = write(tmp_path, setup, CompactSpec("topk", k=4, temperatures=(1.0, 2.0)))
    fields = st.unpack_rows(m, st.open_sequences(url).store.rows(0, 5)["logits"])
    with pytest.raises(ValueError, match="outside the temperature range"):
        st.topk_kd_loss(torch.zeros(5, V), fields, compact_spec_of(m), 8.0)
    dense = precompute_sequences(teachers, seqs, tmp_path / "dense.zarr", vocab_size=V)
    with pytest.raises(ValueError, match="dense logits"):
        st.unpack_rows(dense, np.zeros((1, 4), np.uint8))
