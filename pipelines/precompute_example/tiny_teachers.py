"""Tiny teachers and a transfer set for the precompute example (scikit-learn's digits).

Imported by path from ``config.toml`` (``"tiny_teachers:mlp"``): ``softtargets precompute``
puts the config's folder on ``sys.path``.

* :func:`digits`: the 1797 8x8 digit images as float32 ``[64]`` in [0, 1], labels 0-9,
  keys ``"digits-0000"``...;
* :func:`mlp`: a small dropout MLP ``[B, 64] -> [B, 10]`` logits; ``make_teachers.py``
  trains K of them and saves their state dicts, which the config loads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

NUM_FEATURES = 64
NUM_CLASSES = 10


class Digits(Dataset):
    """scikit-learn's digits: items ``(x float32 [64], y int)``; ``keys`` names each image."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        self.x = torch.from_numpy((data.data / 16.0).astype(np.float32))
        self.y = torch.from_numpy(data.target.astype(np.int64))
        self.keys = [f"digits-{i:04d}" for i in range(len(self.y))]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def digits() -> Digits:
    """The transfer set of the example (factory for ``[transfer_set]``)."""
    return Digits()


def mlp(hidden: int = 128, dropout: float = 0.3, seed: int = 0) -> nn.Module:
    """``[B, 64] -> [B, 10]`` logits; weights initialised from ``seed`` (then replaced by the config's)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )
    finally:
        torch.random.set_rng_state(gen_state)
