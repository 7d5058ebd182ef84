"""Sequence stores: rows grouped into token sequences, input ids beside the targets (softtargets.store.sequences)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

import softtargets as st
from softtargets.errors import ChecksumError, StoreError
from tests.sequence_data import V, seq_logits, sequences, write_sequences
from tests.store_data import LAYOUTS, store_path, write_store


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_ids_labels_and_logits(tmp_path, layout):
    seqs = sequences(11)
    url = write_sequences(store_path(tmp_path, layout), seqs, layout=layout)
    s = st.open_sequences(url)
    assert len(s) == 11 and s.num_tokens == sum(len(ids) for _, ids in seqs)
    assert s.keys() == [k for k, _ in seqs]
    assert s.manifest.format_version == 3 and s.manifest.num_classes == V
    for i, (key, ids) in enumerate(seqs):
        x = s[i]
        assert x["key"] == key
        assert x["input_ids"].tolist() == ids.tolist()
        # row t's label is the token after position t; the last is next_id (even) or unknown (-1)
        assert x["label"].tolist() == ids[1:].tolist() + [7 if i % 2 == 0 else -1]
        ref = seq_logits(key, len(ids))
        torch.testing.assert_close(x["teacher_logits"], ref - ref.mean(-1, keepdim=True), atol=1e-6, rtol=0)
    # rows are ordinary store rows, keyed "sequence/t"
    row = s.store[int(s.offsets[2]) + 1]
    assert row["key"] == f"{seqs[2][0]}/1"


def test_plain_numpy_and_zarr_read_every_array(tmp_path):
    seqs = sequences(5)
    url = write_sequences(tmp_path / "t.zarr", seqs)
    offsets = np.load(tmp_path / "t.zarr/sequences/offsets.npy")
    tokens = np.load(tmp_path / "t.zarr/sequences/tokens.npy")
    keys = np.load(tmp_path / "t.zarr/sequences/keys.npy")
    logits = zarr.open_group(url, mode="r")["logits"]
    a, b = offsets[3], offsets[4]
    assert keys[3] == seqs[3][0] and tokens[a:b].tolist() == seqs[3][1].tolist()
    ref = seq_logits(seqs[3][0], b - a)
    np.testing.assert_allclose(logits[a:b], (ref - ref.mean(-1, keepdim=True)).numpy(), atol=1e-6)


def test_stores_without_sequences_have_no_field(tmp_path):
    path = tmp_path / "plain.zarr"
    write_store(str(path), torch.randn(10, 4), layout="zarr", content="geometric")
    d = json.loads((path / "manifest.json").read_text())
    assert "sequences" not in d and d["format_version"] == 3
    with pytest.raises(StoreError, match="not a sequence store"):
        st.open_sequences(path)


def test_damaged_sequence_file_is_named(tmp_path):
    url = write_sequences(tmp_path / "t.zarr", sequences(4))
    p = tmp_path / "t.zarr/sequences/tokens.npy"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    s = st.open_sequences(url)
    with pytest.raises(ChecksumError, match="tokens.npy"):
        s[0]
    st.open_sequences(url, verify="none")[0]  # verify="none" reads it anyway


def test_writer_refusals(tmp_path):
    w = st.create_sequences(tmp_path / "t.zarr", vocab_size=V, content="geometric")
    w.write("a", [1, 2, 3], torch.zeros(3, V))
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", [1], torch.zeros(1, V))
    with pytest.raises(ValueError, match=r"lie in \[0, 37\)"):
        w.write("b", [1, V], torch.zeros(2, V))
    with pytest.raises(ValueError, match="2 token ids but 3 logit rows"):
        w.write("b", [1, 2], torch.zeros(3, V))
    with pytest.raises(ValueError, match="empty"):
        w.write("b", [], torch.zeros(0, V))
