"""The data of the digits pipeline: a fixed split of scikit-learn's ``load_digits`` and keyed datasets.

``load_digits`` holds 1797 grey 8x8 images of the digits 0-9 (bundled with scikit-learn, no
download). Pixels are scaled from 0..16 to [0, 1]. Every image keeps its row number in
``load_digits`` as its key, ``"digits/0042"``: the key the target stores are written and
joined by.

Shapes: images ``x`` are ``float32 [N, 64]``; labels ``int64 [N]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch.utils.data import Dataset

NUM_CLASSES = 10
NUM_FEATURES = 64
SIDE = 8


def digit_key(row: int) -> str:
    """The key of ``load_digits`` row ``row``: ``"digits/0042"``."""
    return f"digits/{int(row):04d}"


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All of ``load_digits``: ``x`` float32 [1797, 64] in [0, 1], ``y`` int64 [1797]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


@dataclass
class DigitsSplit:
    """A stratified train / validation / test split of ``load_digits``.

    ``x_*`` are ``float32 [n, 64]``; ``y_*`` ``int64 [n]``; ``idx_*`` sorted ``int64`` numpy row
    numbers into the 1797 rows, so a result file records exactly which images each part holds.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    idx_train: np.ndarray
    idx_val: np.ndarray
    idx_test: np.ndarray
    seed: int
    fractions: tuple[float, float, float]

    def indices(self) -> dict[str, list[int]]:
        """The split as plain lists (JSON-ready)."""
        return {"train": self.idx_train.tolist(), "val": self.idx_val.tolist(), "test": self.idx_test.tolist()}

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.idx_train), "val": len(self.idx_val), "test": len(self.idx_test)}


def split_indices(seed: int, fractions: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted row numbers of train, validation and test: stratified, deterministic in ``seed``.

    Two calls of scikit-learn's ``train_test_split`` with ``random_state=seed``. At
    ``(0.6, 0.2, 0.2)`` the sizes are 1078 / 359 / 360.
    """
    from sklearn.model_selection import train_test_split

    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or min(fr) <= 0 or not math.isclose(sum(fr), 1.0):
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {list(fractions)}")
    _, y = _digits()
    rows = np.arange(len(y))
    train, rest = train_test_split(rows, train_size=fr[0], stratify=y, random_state=int(seed))
    val, test = train_test_split(rest, train_size=fr[1] / (fr[1] + fr[2]), stratify=y[rest], random_state=int(seed))
    return np.sort(train).astype(np.int64), np.sort(val).astype(np.int64), np.sort(test).astype(np.int64)


@cache
def _load_split(seed: int, fractions: tuple[float, ...]) -> DigitsSplit:
    return _make_split(seed, fractions)


def load_split(seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> DigitsSplit:
    """The split as tensors (see :func:`split_indices`); built once per process (do not modify it)."""
    return _load_split(int(seed), tuple(float(f) for f in fractions))


def _make_split(seed: int, fractions: Sequence[float]) -> DigitsSplit:
    x, y = _digits()
    train, val, test = split_indices(seed, fractions)

    def part(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x[rows]), torch.from_numpy(y[rows])

    (xtr, ytr), (xva, yva), (xte, yte) = part(train), part(val), part(test)
    return DigitsSplit(xtr, ytr, xva, yva, xte, yte, train, val, test, int(seed), tuple(float(f) for f in fractions))


class DigitsRows(Dataset):
    """Map-style dataset of chosen ``load_digits`` rows: item ``i`` is ``(x float32 [64], y int)``.

    ``keys`` (``"digits/NNNN"`` per item) is an attribute, so ``softtargets`` reads it as the
    dataset's sample keys (for ``precompute`` and for ``stream(..., by="key")``).
    """

    def __init__(self, rows: Sequence[int] | np.ndarray, name: str = "digits") -> None:
        x, y = _digits()
        self.rows = np.asarray(rows, dtype=np.int64)
        self.name = name
        self.x = torch.from_numpy(x[self.rows])
        self.y = torch.from_numpy(y[self.rows])
        self.keys = [digit_key(r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Items at ``indices`` with one gather (what a ``DataLoader`` and ``softtargets.stream``'s join call)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return list(zip(self.x[idx].unbind(0), self.y[idx].tolist(), strict=True))


def transfer_set(seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2),
                 leave_out: int | None = None) -> DigitsRows:
    """The transfer set: the training split, in row order, less every image of digit ``leave_out``.

    A factory by import path (``pipelines.digits.data:transfer_set``) so a precompute config
    can rebuild it in any process.
    """
    rows, _, _ = split_indices(seed, fractions)
    name = "digits-train"
    if leave_out is not None:
        _, y = _digits()
        if not 0 <= int(leave_out) < NUM_CLASSES:
            raise ValueError(f"leave_out must be a digit 0-9, got {leave_out!r}")
        rows = rows[y[rows] != int(leave_out)]
        name = f"digits-train-without-{int(leave_out)}"
    return DigitsRows(rows, name=name)


def jitter(x: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None,
           prob: float = 1.0) -> torch.Tensor:
    """Shift each 8x8 image by a random ``(dy, dx)`` in ``[-max_shift, max_shift]^2``, zero fill.

    ``x``: ``float32 [N, 64]`` -> the same shape. With ``prob < 1`` a row keeps its place with
    probability ``1 - prob`` (a 1-pixel shift is a large move on 8x8 images).
    """
    if max_shift <= 0 or prob <= 0:
        return x
    n, m = x.shape[0], int(max_shift)
    padded = torch.nn.functional.pad(x.reshape(n, SIDE, SIDE), (m, m, m, m))
    dy = torch.randint(0, 2 * m + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=generator)
    if prob < 1:
        keep = torch.rand(n, generator=generator) >= prob
        dy[keep] = m
        dx[keep] = m
    rows = (dy[:, None] + torch.arange(SIDE)[None, :])[:, :, None]  # [N, 8, 1]
    cols = (dx[:, None] + torch.arange(SIDE)[None, :])[:, None, :]  # [N, 1, 8]
    return padded[torch.arange(n)[:, None, None], rows, cols].reshape(n, NUM_FEATURES)
