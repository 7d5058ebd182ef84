"""Stage two with views: each epoch streams one view of every sample, and the student sees that very view.

Schedule: epochs run in cycles of V; cycle ``c`` visits the views in the order of a permutation drawn from
``numpy.random.default_rng([seed, c, 2])``, so epoch ``e`` streams view ``perm_c[e mod V]`` (``c = e // V``)
of **every** sample, and each V consecutive epochs of a cycle cover all V views of every sample. One view
index for all samples costs nothing in randomness (each sample's view ``v`` is its own independent draw:
its generator is seeded from the sample's key) and lets an epoch read one contiguous run of ``N`` rows
(the store is view-major): the read speed of a store of one target per sample.

Batches are those of :class:`~softtargets.streaming.dataset.TargetStream` over the epoch's rows, plus
``sample`` int64 [B] (the sample's number, ``0 .. N-1``), ``view`` int64 [B] and ``view_params``
``{name: tensor [B]}``; a joined ``dataset`` is joined by sample (its item ``i``
is sample ``i``, or by key), and ``replay(input, view_params)`` rebuilds each row's view from it as ``input``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..choices import JoinBy
from ..errors import StoreError
from ..store import TargetStore, layout_class
from ..store.views import ViewParams, Views, split_view_key, views_of
from .dataset import TargetStream
from .inputs import DatasetJoin
from .plan import EpochPlan, Units, batches_per_rank, unit_rows_for

Replay = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]

__all__ = ["Replay", "ViewStream", "epoch_view", "view_schedule"]


@functools.lru_cache(maxsize=64)
def _cycle(seed: int, cycle: int, count: int) -> tuple[int, ...]:
    """The order of the views in cycle ``cycle`` (kept: a generator costs more than an epoch's batches of digits)."""
    return tuple(np.random.default_rng([seed, cycle, 2]).permutation(count).tolist())


def epoch_view(seed: int, epoch: int, count: int) -> int:
    """The view every sample gets in epoch ``epoch`` (see the module docstring)."""
    cycle, step = divmod(int(epoch), int(count))
    return _cycle(int(seed), cycle, int(count))[step]


def view_schedule(seed: int, epochs: int, count: int) -> list[int]:
    """The views of epochs ``0 .. epochs-1``."""
    return [epoch_view(seed, e, count) for e in range(int(epochs))]


class ViewJoin:
    """What a :class:`ViewStream` adds to each batch, from its store rows: ``sample``, ``view``, ``view_params``,
    and with a joined dataset ``input`` (replayed when ``replay`` is given). Plays the part of the stream's
    dataset join, so batches are made where a joined stream makes them (in order on the batch thread when the
    work is cheap: no dataset, or a ``TensorDataset``)."""

    def __init__(self, views: Views, params: ViewParams, dataset: DatasetJoin | None, replay: Replay | None) -> None:
        self.views, self.params, self.dataset, self.replay = views, params, dataset, replay
        self.cheap = dataset is None or dataset.cheap

    def __call__(self, index: torch.Tensor, keys: list[str], labels: torch.Tensor) -> dict[str, Any]:
        rows = index.numpy()
        sample, view = self.views.split(rows)
        params = self.params.take(rows)
        out: dict[str, Any] = {"sample": torch.from_numpy(sample), "view": torch.from_numpy(view),
                               "view_params": params}
        if self.dataset is not None:
            sample_keys = [split_view_key(k)[0] for k in keys] if self.dataset.by == "key" else keys
            out.update(self.dataset(sample, sample_keys, labels))
            if self.replay is not None:
                out["input"] = self.replay(out["input"], params)
        return out


class ViewStream(TargetStream):
    """A :class:`TargetStream` over a views store: epoch ``e`` streams view :func:`epoch_view` of every sample.

    Args:
        store: an open views store.
        replay: ``replay(x, params) -> x_view`` over a batch (``x`` the joined inputs ``[B, ...]``, ``params``
            ``{name: tensor [B]}``); applied to ``input`` when a ``dataset`` is joined.
        dataset: a map-style dataset of the ``N`` samples (item ``i`` = sample ``i``, ``by="index"``; or by key).
        by: see ``dataset``.
        dataset_keys: the dataset's keys for ``by="key"``.
        check_join: compare the dataset's labels with the store's (as :func:`~softtargets.stream`).
        kwargs: as :class:`TargetStream` (batch size, seed, ranks, buffer, ...).

    Raises:
        StoreError: the store holds no views.
    """

    # The seed and the view count choose each epoch's view: a resumed epoch must stream the same view.
    FIXED_ON_RESUME = (*TargetStream.FIXED_ON_RESUME, (("seed", "views"), "another view schedule"))

    def __init__(self, store: TargetStore, *, replay: Replay | None = None, dataset: Any = None,
                 by: JoinBy = "index", dataset_keys: Sequence[str] | Callable[[int], str] | None = None,
                 check_join: bool = True, **kwargs: Any) -> None:
        views = views_of(store.manifest)
        if views is None:
            raise StoreError(f"{store.url}: not a views store (its manifest declares no views)", path=str(store.url))
        super().__init__(store, check_join=check_join, **kwargs)
        self.views: Views = views
        joined = None if dataset is None else DatasetJoin(
            dataset, by, views.samples, dataset_keys, check=check_join, where=str(store.url))
        self.join = ViewJoin(views, ViewParams(store), joined, replay)  # type: ignore[assignment]
        m = store.manifest
        self._unit_rows = unit_rows_for(m.layout, m.block_rows, m.shard_rows, m.sample_layout)
        self._grouped = layout_class(m.layout).grouped_units
        self._units: dict[int, Units] = {}

    def view_of(self, epoch: int | None = None) -> int:
        """The view streamed in ``epoch`` (default: the current one)."""
        return epoch_view(self.config.seed, self.epoch if epoch is None else epoch, self.views.count)

    def _units_of(self, view: int) -> Units:
        """Read units of view ``view``'s rows: the store's units cut at the view's bounds."""
        got = self._units.get(view)
        if got is None:
            a, b = self.views.rows_of_view(view)
            pieces = [(max(s.start, a), min(s.stop, b) - max(s.start, a)) for s in self.manifest.shards
                      if s.start < b and s.stop > a]
            got = self._units[view] = Units.from_shards(pieces, self._unit_rows, grouped=self._grouped)
        return got

    def plan(self, epoch: int | None = None) -> EpochPlan:
        e = self.epoch if epoch is None else epoch
        return EpochPlan(self._units_of(self.view_of(e)), self.config, e, self.rank)

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_rank(self.views.samples, self.config)

    def _fingerprint(self) -> dict[str, Any]:
        return {**super()._fingerprint(), "views": self.views.count}
