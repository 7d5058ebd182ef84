"""Shared helpers of the sequence-store tests: small sequence stores with known contents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import softtargets as st

V = 37


def sequences(n: int, seed: int = 0, max_len: int = 19) -> list[tuple[str, np.ndarray]]:
    """``n`` sequences of random lengths in ``[1, max_len]`` over a vocabulary of ``V``."""
    rng = np.random.default_rng(seed)
    return [(f"doc{i:03d}", rng.integers(0, V, size=int(rng.integers(1, max_len + 1)))) for i in range(n)]


def seq_logits(key: str, length: int) -> torch.Tensor:
    """Deterministic ``[length, V]`` float32 logits of a sequence (from its key)."""
    g = torch.Generator().manual_seed(int(key[3:]) + 1)
    return torch.randn(length, V, generator=g)


def write_sequences(path: Path | str, seqs: list[tuple[str, np.ndarray]], layout: str = "zarr",
                    shard_rows: int = 32, block_rows: int = 8, dtype: str = "float32") -> str:
    """A geometric sequence store of ``seqs`` (zero-meaned logits, ``dtype``), next_id given for even keys."""
    path = str(path)
    with st.create_sequences(path, vocab_size=V, content="geometric", layout=layout, dtype=dtype,
                             shard_rows=shard_rows, block_rows=block_rows) as w:
        for i, (key, ids) in enumerate(seqs):
            w.write(key, ids, seq_logits(key, len(ids)), next_id=7 if i % 2 == 0 else None)
    return path
