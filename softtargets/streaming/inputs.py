"""Inputs beside the targets: members packed in wds samples, or items of a map-style dataset."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset, default_collate

from ..choices import JoinBy, parse_choice
from ..errors import JoinMismatchError
from ..store.wds_layout import npy_load

#: Tensor dtypes read as class labels (a dataset's ``y``) by the join check.
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

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


def item_label(item: Any) -> int:
    """The integer label ``y`` of a dataset item ``(x, y, ...)``, or -1 where there is none to compare
    (not a tuple, or ``y`` not an integer scalar: a one-hot vector, a float, a string)."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        return -1
    y = item[1]
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    if isinstance(y, torch.Tensor) and y.ndim == 0 and y.dtype in INT_DTYPES:
        return int(y)
    if isinstance(y, np.ndarray) and y.ndim == 0 and y.dtype.kind in "iu":
        return int(y)
    return -1


def item_labels(items: Sequence[Any]) -> np.ndarray:
    """:func:`item_label` of each item: int64 ``[B]``, -1 where an item has no integer label."""
    return np.fromiter((item_label(it) for it in items), dtype=np.int64, count=len(items))


def check_labels(stored: np.ndarray, given: np.ndarray, keys: Callable[[np.ndarray], list[str]],
                 where: str) -> None:
    """Refuse a join whose dataset labels ``given`` disagree with the store's labels ``stored`` (both int64
    ``[B]``, -1 = unlabelled) on any row labelled in both: stored labels are copies of the transfer set's.

    ``keys(positions)`` gives the store keys of batch positions, for the message; ``where`` names the store.

    Raises:
        JoinMismatchError: naming how many of how many labelled rows disagree, and the first keys.
    """
    stored, given = np.asarray(stored, dtype=np.int64), np.asarray(given, dtype=np.int64)
    both = (stored >= 0) & (given >= 0)
    bad = np.flatnonzero(both & (stored != given))
    if not len(bad):
        return
    first = bad[:3]
    first_keys = keys(first)
    shown = ", ".join(f"{k!r} (store {a}, dataset {b})" for k, a, b in zip(
        first_keys, stored[first].tolist(), given[first].tolist(), strict=True))
    raise JoinMismatchError(
        f"the joined dataset does not match {where}: {len(bad)} of {int(both.sum())} labelled rows read have "
        f"other labels, first {shown}; join the dataset the targets were computed on, in its order (or by='key'), "
        f"or pass check_join=False to skip this check",
        mismatched=len(bad), compared=int(both.sum()), keys=first_keys,
    )


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
    or the item whose key equals the row's key (``by="key"``). Adds ``input`` (collated ``x``) to batches.

    With ``check``, each batch's dataset labels (``y`` of ``(x, y, ...)`` items, or a ``TensorDataset``'s
    second tensor) are compared with the store's on the rows labelled in both (:func:`check_labels`).
    """

    def __init__(self, dataset: Any, by: JoinBy, num_rows: int, keys: Sequence[str] | Callable | None = None,
                 *, check: bool = True, where: str = "the store"):
        parse_choice("join", by, JoinBy)
        if by == "index" and len(dataset) != num_rows:
            raise ValueError(
                f"cannot join by index: the dataset has {len(dataset)} items, the store {num_rows} rows"
            )
        self.dataset, self.by, self.check, self.where = dataset, by, bool(check), where
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

    def _tensor_labels(self, positions: torch.Tensor) -> np.ndarray | None:
        """A ``TensorDataset``'s labels at ``positions``: its second tensor when that is integer ``[N]``."""
        tensors = self.dataset.tensors
        if len(tensors) < 2 or tensors[1].dim() != 1 or tensors[1].dtype not in INT_DTYPES:
            return None
        return tensors[1][positions].numpy().astype(np.int64, copy=False)

    def __call__(self, index: torch.Tensor, keys: list[str], labels: torch.Tensor | None = None) -> dict[str, Any]:
        """``{"input": ...}`` for the batch's store rows ``index`` int64 [B] / ``keys``; ``labels`` int64 [B]
        (the store's, -1 = unlabelled) are checked against the dataset's when given and ``check`` is on."""
        if isinstance(self.dataset, TensorDataset):  # one gather, not a Python call per row
            at = index if self._position is None else torch.as_tensor(self.positions(index, keys))
            out = {"input": self.dataset.tensors[0][at]}
            given = self._tensor_labels(at) if self.check and labels is not None else None
        else:
            items = fetch(self.dataset, self.positions(index, keys))
            out = {"input": default_collate([first_item(it) for it in items])}
            given = item_labels(items) if self.check and labels is not None else None
        if given is not None and labels is not None:
            check_labels(labels.numpy(), given, lambda at: [keys[i] for i in at.tolist()], self.where)
        return out
