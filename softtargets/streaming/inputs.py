"""Inputs beside the targets: members packed in wds samples, or items of a map-style dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset, default_collate

from ..store.wds_layout import npy_load

#: Turns one sample's packed members (member extension -> raw bytes) into named values.
Decoder = Callable[[dict[str, bytes]], dict[str, Any]]


def default_decode(members: dict[str, bytes]) -> dict[str, Any]:
    """``.npy`` members become arrays named without the suffix (``input.npy`` -> ``input``);
    any other member stays raw bytes under its own name (``input.png`` -> ``input.png``)."""
    out: dict[str, Any] = {}
    for ext, raw in members.items():
        if ext.endswith(".npy") or ext == "npy":
            out[ext[:-4].rstrip(".") or "input"] = npy_load(raw)
        else:
            out[ext] = raw
    return out


def collate_packed(raw: Sequence[dict[str, bytes]], decode: Decoder | None = None) -> dict[str, Any]:
    """A batch of packed members -> ``{name: tensor [B, ...] or list}`` via ``decode`` and ``default_collate``.

    Arrays of one shape stack into tensors (``input.npy`` float32 ``[D]`` -> ``input`` ``[B, D]``);
    bytes and strings stay lists of ``B``.
    """
    return default_collate([(decode or default_decode)(dict(m)) for m in raw])


def dataset_keys(dataset: Any, keys: Sequence[str] | Callable[[int], str] | None) -> list[str]:
    """Sample keys of a map-style dataset's items, in item order.

    From ``keys`` (a sequence aligned with the dataset, or a function ``i -> key``), else
    from the dataset's own ``keys`` attribute or ``keys()`` method.
    """
    if keys is None:
        keys = getattr(dataset, "keys", None)
        if keys is None:
            raise ValueError(
                f"joining {type(dataset).__name__} by key needs its sample keys: pass keys=[...] (aligned with "
                "the dataset's items) or give the dataset a 'keys' attribute or method"
            )
        if callable(keys):
            keys = keys()
    out = [str(keys(i)) for i in range(len(dataset))] if callable(keys) else [str(k) for k in keys]
    if len(out) != len(dataset):
        raise ValueError(f"{len(out)} keys for a dataset of {len(dataset)} items")
    return out


def first_item(item: Any) -> Any:
    """The input of a dataset item: ``x`` of an ``(x, y, ...)`` tuple, else the item itself."""
    return item[0] if isinstance(item, (tuple, list)) else item


def fetch(dataset: Any, positions: list[int]) -> list[Any]:
    """Items at ``positions``, through ``__getitems__`` when the dataset batches its reads."""
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is not None:
        return list(getitems(positions))
    return [dataset[i] for i in positions]


class DatasetJoin:
    """Inputs of a batch's store rows from a map-style ``dataset``: item ``i`` is row ``i`` (``by="index"``),
    or the item whose key equals the row's key (``by="key"``). Adds ``input`` (collated ``x``) to batches."""

    def __init__(self, dataset: Any, by: str, num_rows: int, keys: Sequence[str] | Callable | None = None):
        if by not in ("index", "key"):
            raise ValueError(f"unknown join {by!r}; expected 'index' or 'key'")
        if by == "index" and len(dataset) != num_rows:
            raise ValueError(
                f"cannot join by index: the dataset has {len(dataset)} items, the store {num_rows} rows"
            )
        self.dataset, self.by = dataset, by
        # A TensorDataset joins by one gather: cheaper on the calling thread than handed to another.
        self.cheap = isinstance(dataset, TensorDataset)
        self._position: dict[str, int] | None = None
        if by == "key":
            self._position = {k: i for i, k in enumerate(dataset_keys(dataset, keys))}

    def positions(self, index: torch.Tensor, keys: list[str]) -> list[int]:
        if self._position is None:
            return index.tolist()
        try:
            return [self._position[k] for k in keys]
        except KeyError as e:
            raise KeyError(f"store key {e.args[0]!r} has no item in the joined {type(self.dataset).__name__}") from None

    def __call__(self, index: torch.Tensor, keys: list[str]) -> dict[str, Any]:
        if isinstance(self.dataset, TensorDataset):  # one gather, not a Python call per row
            return {"input": self.dataset.tensors[0][torch.as_tensor(self.positions(index, keys))]}
        items = fetch(self.dataset, self.positions(index, keys))
        return {"input": default_collate([first_item(it) for it in items])}
