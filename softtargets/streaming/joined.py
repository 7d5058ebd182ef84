"""A map-style dataset joined with its teacher logits: ``with_targets(dataset, store, by=...)``.

For random access by a ``DataLoader`` sampler. Rows are read a whole unit (zarr inner chunk,
wds block) at a time into an LRU cache; ``__getitems__`` groups a batch's rows by unit. Random
access touches a unit per row when the store is larger than the cache, so for big stores prefer
:func:`softtargets.stream` (sequential unit reads), joined to the dataset there. Over a views store
(:class:`ViewTargetJoin`) item ``i`` is sample ``i`` in the view the epoch streams, replayed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..choices import JoinBy, VerifyMode, parse_choice
from ..errors import StoreError
from ..store import TargetStore, open_targets
from ..store.views import ViewParams, split_view_key, views_of
from .inputs import check_labels, dataset_keys, fetch, item_labels
from .plan import Units, unit_rows_for
from .views import Replay, epoch_view


class TargetJoin(Dataset):
    """Item ``i`` -> ``(x, y, teacher_logits)``; see :func:`with_targets`."""

    def __init__(
        self, dataset: Any, store: TargetStore, by: JoinBy = "index",
        keys: Sequence[str] | Callable[[int], str] | None = None, cache_bytes: int = 256 << 20,
        check_join: bool = True,
    ):
        parse_choice("join", by, JoinBy)
        self.dataset, self.by, self.cache_bytes, self.check_join = dataset, by, int(cache_bytes), bool(check_join)
        self.store = store  # pickles as "open again" in each worker
        m = store.manifest
        self.rows: np.ndarray | None = None
        count, what = self._joinable()
        if by == "index":
            if len(dataset) != count:
                raise ValueError(
                    f"cannot join by index: the dataset has {len(dataset)} items, {store.url} has {count} {what}"
                )
        else:
            wanted = dataset_keys(dataset, keys)
            table = {k: i for i, k in enumerate(self._joinable_keys())}
            missing = [k for k in wanted if k not in table]
            if missing:
                raise KeyError(f"{len(missing)} dataset keys are not in {store.url}, e.g. {missing[:5]}")
            self.rows = np.array([table[k] for k in wanted], dtype=np.int64)
        unit_rows = unit_rows_for(m.layout, m.block_rows, m.shard_rows, m.sample_layout)
        self.units = Units.from_shards([(s.start, s.rows) for s in m.shards], unit_rows, grouped=False)
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cached_bytes = 0

    def _joinable(self) -> tuple[int, str]:
        """How many store entries items join to, and what they are called (for messages)."""
        return len(self.store), "rows"

    def _joinable_keys(self) -> list[str]:
        """The keys items join to by key, in entry order."""
        return self.store.keys()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_cached_bytes"] = OrderedDict(), 0
        return state

    def __len__(self) -> int:
        return len(self.dataset)

    def row_of(self, i: int) -> int:
        """Store row joined to dataset item ``i``."""
        return int(i) if self.rows is None else int(self.rows[i])

    def _unit(self, u: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [n, ...] stored dtype, labels int64 [n])`` of unit ``u``, through the LRU cache."""
        hit = self._cache.get(u)
        if hit is not None:
            self._cache.move_to_end(u)
            return hit
        r = self.store.rows(int(self.units.starts[u]), int(self.units.stops[u]))
        entry = (r["logits"], r["label"])
        self._cache[u] = entry
        self._cached_bytes += entry[0].nbytes + entry[1].nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, (lg, lb) = self._cache.popitem(last=False)
            self._cached_bytes -= lg.nbytes + lb.nbytes
        return entry

    def _targets(self, rows: list[int]) -> list[tuple[torch.Tensor, int]]:
        units = np.searchsorted(self.units.starts, np.asarray(rows, dtype=np.int64), side="right") - 1
        out: list[tuple[torch.Tensor, int] | None] = [None] * len(rows)
        for u in np.unique(units).tolist():
            logits, labels = self._unit(u)
            base = int(self.units.starts[u])
            for pos in np.flatnonzero(units == u).tolist():
                off = rows[pos] - base
                out[pos] = (logits[off].clone(), int(labels[off]))
        return out  # type: ignore[return-value]

    def _check(self, rows: list[int], targets: list[tuple[torch.Tensor, int]], items: list[Any]) -> None:
        """The items' labels against the stored labels of ``rows`` (see :func:`with_targets`'s ``check_join``)."""
        if not self.check_join:
            return
        stored = np.fromiter((t[1] for t in targets), dtype=np.int64, count=len(targets))
        check_labels(stored, item_labels(items), lambda at: [str(k) for k in self.store.take(
            np.asarray(rows, dtype=np.int64)[at])["key"]], str(self.store.url))

    @staticmethod
    def _assemble(item: Any, target: tuple[torch.Tensor, int]) -> tuple[Any, Any, torch.Tensor]:
        logits, label = target
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            return item[0], item[1], logits
        return (item[0] if isinstance(item, (tuple, list)) else item), label, logits

    def _join(self, rows: list[int], items: list[Any], targets: list[tuple[torch.Tensor, int]]) -> list[tuple]:
        """The ``(x, y, teacher_logits)`` items of store rows ``rows``."""
        return [self._assemble(it, t) for it, t in zip(items, targets, strict=True)]

    def __getitem__(self, i: int) -> tuple[Any, Any, torch.Tensor]:
        if not -len(self) <= int(i) < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = int(i) % len(self)
        item, rows = self.dataset[i], [self.row_of(i)]
        targets = self._targets(rows)
        self._check(rows, targets, [item])
        return self._join(rows, [item], targets)[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any, torch.Tensor]]:
        indices = [int(i) for i in indices]
        rows = [self.row_of(i) for i in indices]
        targets, items = self._targets(rows), fetch(self.dataset, indices)
        self._check(rows, targets, items)
        return self._join(rows, items, targets)


class ViewTargetJoin(TargetJoin):
    """:class:`TargetJoin` over a views store: item ``i`` is sample ``i`` (or the sample of its key), joined to
    the targets of the view the epoch streams (:func:`~softtargets.streaming.views.epoch_view` of ``seed``
    and the epoch set by :meth:`set_epoch`, as ``stream(..., replay=...)`` chooses it), its ``x`` replayed into
    that view when ``replay`` is given. See :func:`with_targets`."""

    def __init__(self, dataset: Any, store: TargetStore, by: JoinBy = "index",
                 keys: Sequence[str] | Callable[[int], str] | None = None, cache_bytes: int = 256 << 20,
                 check_join: bool = True, *, replay: Replay | None = None, seed: int = 0) -> None:
        views = views_of(store.manifest)
        if views is None:
            raise StoreError(f"{store.url}: not a views store (its manifest declares no views)", path=str(store.url))
        self.views, self.replay, self.seed = views, replay, int(seed)
        # In shared memory: DataLoader workers (persistent ones too) see the epoch set_epoch writes.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        super().__init__(dataset, store, by, keys, cache_bytes, check_join)
        self.params = ViewParams(store)

    def _joinable(self) -> tuple[int, str]:
        return self.views.samples, f"samples ({self.views.count} views each)"

    def _joinable_keys(self) -> list[str]:
        a, b = self.views.rows_of_view(0)
        return [split_view_key(k)[0] for k in self.store.take(np.arange(a, b))["key"]]

    @property
    def epoch(self) -> int:
        """The epoch whose views items join (see :meth:`set_epoch`)."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Join the views of epoch ``epoch``: call it before each epoch's ``iter(loader)``, as with a
        ``DistributedSampler``; the loader's workers, persistent or not, read it from shared memory."""
        self._epoch[0] = int(epoch)

    @property
    def view(self) -> int:
        """The view every item joins in the current epoch."""
        return epoch_view(self.seed, self.epoch, self.views.count)

    def row_of(self, i: int) -> int:
        return int(self.views.row(super().row_of(i), self.view))

    def _join(self, rows: list[int], items: list[Any], targets: list[tuple[torch.Tensor, int]]) -> list[tuple]:
        out = super()._join(rows, items, targets)
        if self.replay is None:
            return out
        xs = self.replay(torch.stack([x for x, _, _ in out]), self.params.take(rows))
        return [(x, y, logits) for x, (_, y, logits) in zip(xs.unbind(0), out, strict=True)]


def with_targets(
    dataset: Any,
    store: str | os.PathLike[str] | TargetStore,
    by: JoinBy = "index",
    *,
    keys: Sequence[str] | Callable[[int], str] | None = None,
    cache_bytes: int = 256 << 20,
    verify: VerifyMode = "lazy",
    check_join: bool = True,
    replay: Replay | None = None,
    seed: int = 0,
) -> TargetJoin:
    """A map-style dataset whose item ``i`` is ``(x, y, teacher_logits)``.

    Over a views store (:mod:`softtargets.store.views`) item ``i`` is sample ``i``, joined to the targets of the
    view the epoch streams and, with ``replay``, its ``x`` replayed into that view (a :class:`ViewTargetJoin`:
    call its ``set_epoch(e)`` before each epoch; the views follow ``seed`` and the epoch exactly as
    ``stream(..., seed=seed, replay=replay)``'s do).

    ``x``, ``y`` come from ``dataset[i]`` (an ``(x, y, ...)`` tuple); when the item is not a
    tuple, ``x`` is the item and ``y`` the store's label (int, -1 = unlabelled).
    ``teacher_logits`` is the joined store row, ``[C]`` or ``[K, C]`` in the stored dtype
    (``default_collate`` stacks them to ``[B, C]`` / ``[B, K, C]``).

    Args:
        by: ``"index"``: item ``i`` <-> store row ``i`` (lengths must match); ``"key"``: item ``i``
            <-> the row whose key is the item's key (from ``keys``, a sequence aligned with the
            dataset or a function ``i -> key``, else the dataset's ``keys`` attribute/method).
            Every item's key must be in the store (checked here, ``KeyError`` naming some missing).
        cache_bytes: LRU budget for read units (whole zarr chunks / wds blocks).
        check_join: refuse items whose label ``y`` (an integer) disagrees with the store's label of the
            joined row, where both are labelled: stored labels are copies of the transfer set's, so any
            disagreement means another dataset, or the same one in another order. ``False`` skips it.
        replay: views stores: ``replay(x, params)`` over a batch (``x`` the items' ``x`` stacked ``[B, ...]``,
            ``params`` ``{name: tensor [B]}``) gives the views the joined targets belong to.
        seed: views stores: the seed of the epoch-to-view schedule (as ``stream``'s ``seed``).

    Raises:
        ValueError: ``replay`` for a store of one target per sample, or lengths that do not join by index.
        JoinMismatchError: (a ``ValueError``, when an item is read) a joined item's label disagrees with
            the store's; the message counts the rows and names the first keys.
    """
    if not isinstance(store, TargetStore):
        store = open_targets(store, verify=verify)
    if views_of(store.manifest) is not None:
        return ViewTargetJoin(dataset, store, by, keys, cache_bytes, check_join, replay=replay, seed=seed)
    if replay is not None:
        raise ValueError(f"replay= is for views stores; {store.url} holds one target per sample")
    return TargetJoin(dataset, store, by, keys, cache_bytes, check_join)
