"""Stage one with views: the teachers run on ``V`` augmented views of every sample; each view's parameters are stored.

:class:`ViewCapture` turns a transfer set of ``N`` samples into one of ``N * V`` rows, view-major (row ``r``
is view ``r // N`` of sample ``r % N``, keyed ``"{key}#{view}"``): its items are ``augment(x, rng)[0]`` with
``rng`` from :func:`softtargets.store.views.view_generator` (store seed, sample key, view). The teachers and the
writer see an ordinary transfer set, so every content, layout, engine and the crash/resume guarantees apply
as they are. Each shard's parameters are computed by calling ``augment`` again on the same inputs with the same
generators (the augmentation is deterministic given its ``rng``; views made in this process keep their parameters
for this, up to ``CACHE_ROWS`` rows) and written to ``views/params-{shard}.npy``
(temporary name, then renamed) before the manifest, which lists them, is written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..store.base import TargetWriter
from ..store.views import ORDER, declare_params, encode_params, view_generator, view_key, write_params_files
from .transfer import TransferSet

CACHE_ROWS = 1 << 20
Augment = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, Mapping[str, Any]]]

__all__ = ["Augment", "ViewCapture", "ViewedDataset"]


def _augment_name(augment: Any) -> str:
    owner = augment if hasattr(augment, "__qualname__") else type(augment)
    return f"{getattr(owner, '__module__', '?')}.{getattr(owner, '__qualname__', type(augment).__name__)}"


class ViewedDataset(Dataset):
    """Map-style dataset of ``N * V`` items: item ``r`` is view ``r // N`` of sample ``r % N`` of ``transfer_set``,
    ``{"x": x_view, "y": label or None, "key": "{key}#{view}"}``."""

    def __init__(self, transfer_set: TransferSet, count: int, augment: Augment, seed: int) -> None:
        self.transfer_set, self.count, self.augment, self.seed = transfer_set, int(count), augment, int(seed)
        self.samples = len(transfer_set)
        self._keys = transfer_set.all_keys()
        # Parameters of the views made in this process (the compute loop's, without DataLoader workers), so the
        # parameter files need no second call of augment for them; at most CACHE_ROWS rows are kept.
        self.made: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.samples * self.count

    def keys(self) -> list[str]:
        return [view_key(k, v) for v in range(self.count) for k in self._keys]

    def view(self, row: int) -> tuple[torch.Tensor, dict[str, Any], int]:
        """``(x_view, params, label)`` of row ``row``."""
        view, i = divmod(int(row), self.samples)
        sample = self.transfer_set[i]
        x, params = self.augment(sample.x, view_generator(self.seed, sample.key, view))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"augment returned {type(x).__name__} for the input; expected (tensor, dict of params)")
        params = dict(params)
        if len(self.made) < CACHE_ROWS:
            self.made[int(row)] = params
        return x, params, sample.label

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "made": {}}

    def params(self, row: int) -> dict[str, Any]:
        """Row ``row``'s parameters: as made by the compute loop in this process, else drawn again."""
        made = self.made.pop(int(row), None)
        return made if made is not None else self.view(row)[1]

    def __getitem__(self, row: int) -> dict[str, Any]:
        x, _, label = self.view(row)
        view, i = divmod(int(row), self.samples)
        return {"x": x, "y": None if label < 0 else label, "key": view_key(self._keys[i], view)}

    @property
    def batched(self) -> bool:
        """The augmentation offers ``sample(rng) -> params`` and ``replay(x_batch, params_batch)`` (as
        :class:`~softtargets.math.augment.RandomView` does): views are then made a batch at a time."""
        return callable(getattr(self.augment, "sample", None)) and callable(getattr(self.augment, "replay", None))

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        """Items ``rows``: with a :attr:`batched` augmentation, every row's parameters drawn from its generator
        by ``sample``, then the views made by one ``replay`` of the batch; else one ``augment`` call per row."""
        if not self.batched:
            return [self[r] for r in rows]
        where = [divmod(int(r), self.samples) for r in rows]
        batch = self.transfer_set.batch([i for _, i in where])
        drawn = [dict(self.augment.sample(view_generator(self.seed, batch.keys[j], v)))  # type: ignore[attr-defined]
                 for j, (v, _) in enumerate(where)]
        if len(self.made) < CACHE_ROWS:
            self.made.update(zip(map(int, rows), drawn, strict=True))
        params = {name: torch.tensor([d[name] for d in drawn]) for name in drawn[0]}
        x = self.augment.replay(batch.x, params)  # type: ignore[attr-defined]
        return [{"x": x[j], "y": None if int(batch.labels[j]) < 0 else int(batch.labels[j]),
                 "key": view_key(batch.keys[j], v)} for j, (v, _) in enumerate(where)]


class ViewCapture:
    """What :func:`~softtargets.precompute.precompute` needs for ``views=V, augment=fn``: the transfer set of
    views, the manifest's ``views`` declaration and the parameter files.

    Args:
        transfer_set: the ``N`` samples.
        count: V >= 1 views per sample.
        augment: ``augment(x, rng) -> (x_view, params)``: ``x`` one sample's input, ``rng`` a ``torch.Generator``
            to draw every random choice from, ``params`` a flat dict of numbers from which the augmentation's
            ``replay(x, params)`` rebuilds ``x_view``. An attribute ``param_dtypes`` (name -> numpy dtype name)
            declares their storage dtypes; else ints are ``int32``, bools ``uint8``, other numbers ``float32``.
        seed: the store seed (>= 0).

    Raises:
        ValueError: bad ``count`` or ``seed``, ``augment`` missing or returning no parameters.
    """

    def __init__(self, transfer_set: TransferSet, count: int, augment: Augment | None, seed: int) -> None:
        if augment is None or not callable(augment):
            raise ValueError("views=V needs augment=fn, fn(x, rng) -> (x_view, params)")
        if int(count) < 1:
            raise ValueError(f"views must be >= 1, got {count}")
        if int(seed) < 0:
            raise ValueError(f"the view seed must be >= 0, got {seed}")
        self.dataset = ViewedDataset(transfer_set, int(count), augment, int(seed))
        _, example, _ = self.dataset.view(0)
        self.params = declare_params(example, getattr(augment, "param_dtypes", None))
        encode_params([example], self.params)  # refuse parameters the store would change, before any teacher runs
        self.declaration: dict[str, Any] = {
            "count": int(count), "samples": len(transfer_set), "seed": int(seed), "order": ORDER,
            "params": self.params, "augment": _augment_name(augment),
        }
        self.transfer_set = TransferSet(self.dataset, name=f"{transfer_set.name}[views={int(count)}]")

    def shard_params(self, start: int, stop: int) -> np.ndarray:
        """The parameters of rows ``[start, stop)``, structured ``[rows]``, checked (:func:`encode_params`)."""
        return encode_params([self.dataset.params(r) for r in range(start, stop)], self.params)

    def write_params(self, writer: TargetWriter) -> None:
        """Write every shard's parameter file (atomically; the same bytes on every run) and record them in
        ``writer.spec.views["files"]``, for the manifest written next."""
        write_params_files(writer, self.shard_params)
