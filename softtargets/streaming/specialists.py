"""Training a specialist (Hinton et al. 2015, §5): half its batches from its subset, half from the rest; its
labels over its subset and a dustbin; its network started from the generalist's weights."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

__all__ = ["SpecialistBatches", "specialist_from_generalist", "specialist_labels"]


class SpecialistBatches(Sampler[list[int]]):
    """A batch sampler: each batch holds ``round(special_share * batch_size)`` rows whose label lies in
    ``classes`` and the rest from rows whose label does not (the paper: half special, half random).

    Special rows are taken in a fresh seeded permutation each pass (each once per pass); the others likewise.
    Use it as ``DataLoader(dataset, batch_sampler=SpecialistBatches(...))``; call :meth:`set_epoch` for another
    order each epoch. The subset is over-represented by :func:`softtargets.math.specialists.oversampling_factor`
    of its share of the rows: give that to the specialist's ``oversample``.

    Args:
        labels: ``[N]`` integer labels of the dataset's rows (``-1`` rows count as "the rest").
        classes: the specialist's subset.
        batch_size: rows per batch (>= 2).
        num_batches: batches per epoch; default enough for each special row once.
        special_share: the fraction of each batch from the subset, in (0, 1).
        seed: base seed; the order depends on ``(seed, epoch)``.

    Raises:
        ValueError: no row of the subset, or none outside it.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, classes: Sequence[int], batch_size: int,
                 *, num_batches: int | None = None, special_share: float = 0.5, seed: int = 0) -> None:
        y = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
        inside = np.isin(y, np.asarray(list(classes), dtype=np.int64))
        self.special, self.rest = np.flatnonzero(inside), np.flatnonzero(~inside)
        if not len(self.special) or not len(self.rest):
            raise ValueError(f"a specialist needs rows of its classes {list(classes)} and rows of others: "
                             f"{len(self.special)} and {len(self.rest)} here")
        if batch_size < 2 or not 0 < special_share < 1:
            raise ValueError("batch_size must be >= 2 and special_share in (0, 1)")
        self.batch_size = int(batch_size)
        self.n_special = min(self.batch_size - 1, max(1, round(special_share * self.batch_size)))
        self.num_batches = int(num_batches) if num_batches is not None else \
            math.ceil(len(self.special) / self.n_special)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        streams = [_cycled(self.special, rng), _cycled(self.rest, rng)]
        for _ in range(self.num_batches):
            batch = [next(streams[0]) for _ in range(self.n_special)]
            batch += [next(streams[1]) for _ in range(self.batch_size - self.n_special)]
            yield [int(i) for i in rng.permutation(batch)]


def _cycled(rows: np.ndarray, rng: np.random.Generator) -> Iterator[int]:
    while True:
        yield from rng.permutation(rows).tolist()


def specialist_labels(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Labels for a specialist's head: a class of the subset -> its position in ``classes``; any other class
    -> ``len(classes)`` (the dustbin); ``-1`` (unlabelled) stays ``-1``. ``[B]`` int64."""
    lut = torch.full((int(max(int(labels.max()) if labels.numel() else 0, max(classes))) + 1,), len(classes),
                     dtype=torch.int64)
    lut[torch.as_tensor(list(classes))] = torch.arange(len(classes))
    out = lut[labels.clamp_min(0)]
    return torch.where(labels < 0, labels, out)


def specialist_from_generalist(generalist: nn.Module, classes: Sequence[int], head: str | None = None) -> nn.Module:
    """A specialist started from the generalist's weights: a deep copy whose final ``nn.Linear`` (``head``, a name
    from ``named_modules()``; default the last Linear) is cut to ``|S| + 1`` outputs: the subset's rows of the
    generalist's head, in the order of ``classes``, then a dustbin row, the mean of the other classes' rows, with
    bias ``mean + log(C - |S|)`` (the log of the other classes' summed ``exp`` where their logits are equal).

    Raises:
        ValueError: no such Linear, or a class outside its outputs.
    """
    model = copy.deepcopy(generalist)
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    name = head if head is not None else (list(linears)[-1] if linears else None)
    if name is None or name not in linears:
        raise ValueError(f"no nn.Linear head {head!r} in {type(generalist).__name__}; Linear modules: {list(linears)}")
    old = linears[name]
    c = old.out_features
    ids = torch.as_tensor([int(i) for i in classes])
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= c or len(set(ids.tolist())) != len(ids):
        raise ValueError(f"classes {list(classes)} must be distinct ids in [0, {c}) (the head's outputs)")
    others = torch.ones(c, dtype=torch.bool)
    others[ids] = False
    new = nn.Linear(old.in_features, len(ids) + 1, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[:-1] = old.weight[ids]
        new.weight[-1] = old.weight[others].mean(0)
        if old.bias is not None:
            new.bias[:-1] = old.bias[ids]
            new.bias[-1] = old.bias[others].mean() + math.log(int(others.sum()))
    _set_module(model, name, new)
    return model


def _set_module(model: nn.Module, name: str, new: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
