"""sklearn's 8x8 digits for the training example: a fixed split, and map-style datasets over it.

Transfer (train) split: 1297 images; test split: 500 images. Features are the 64 pixel
intensities scaled to [0, 1] (float32); labels 0-9. Sample keys are ``digit-NNNN`` (the row of
``load_digits()``), so a store written from them can be joined back by key.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

TEST_ROWS = 500


@cache
def split(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x float32 [n, 64], y int64 [n], row numbers int64 [n])`` of the ``train`` or ``test`` split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    rows = np.sort(order[TEST_ROWS:] if name == "train" else order[:TEST_ROWS])
    x = (d.data[rows] / 16.0).astype(np.float32)
    return x, d.target[rows].astype(np.int64), rows


def keys(rows: np.ndarray) -> list[str]:
    return [f"digit-{int(r):04d}" for r in rows]


class DigitsInputs(Dataset):
    """Map-style dataset of a split's ``(x [64] float32, y int)``; ``keys`` for joining by key.

    ``reverse=True`` lists the items in reverse order (to show that a join by key does not
    depend on the order of the dataset).
    """

    def __init__(self, split_name: str = "train", reverse: bool = False):
        x, y, rows = split(split_name)
        idx = np.arange(len(y))[::-1] if reverse else np.arange(len(y))
        self.x, self.y, self.keys = torch.from_numpy(x[idx].copy()), torch.from_numpy(y[idx].copy()), keys(rows[idx])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def test_set() -> TensorDataset:
    """The 500 held-out digits as ``(x [64], y)``."""
    x, y, _ = split("test")
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
