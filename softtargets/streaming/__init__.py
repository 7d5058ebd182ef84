"""Stage two: stream a target store into training.

:func:`stream` gives a ``torch.utils.data.IterableDataset`` of whole batches, split across
DDP ranks and DataLoader workers, shuffled deterministically per ``(seed, epoch)``, and
resumable mid-epoch. See :mod:`softtargets.streaming.plan` for the splitting rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..choices import JoinBy, Remainder, VerifyMode
from ..store import TargetStore, open_targets
from ..store.views import views_of
from .dataset import StreamLoader, TargetStream, resolve_rank
from .inputs import Decoder, JoinMismatchError, default_decode
from .plan import EpochPlan, SplitConfig
from .views import Replay, ViewStream, epoch_view, view_schedule


def stream(
    url_or_store: str | os.PathLike[str] | TargetStore,
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    remainder: Remainder = "pad",
    drop_last: bool = False,
    buffer_size: int | None = None,
    inputs: bool = True,
    decode: Decoder | None = None,
    dataset: Any = None,
    by: JoinBy = "index",
    dataset_keys: Sequence[str] | Callable[[int], str] | None = None,
    read_ahead: bool = True,
    check_join: bool = True,
    verify: VerifyMode = "lazy",
    arrays: Sequence[str] = (),
    storage_options: dict | None = None,
    replay: Replay | None = None,
) -> TargetStream:
    """Stream a target store as batches for one training rank.

    Use ``DataLoader(ds, batch_size=None, num_workers=n)`` or ``ds.loader(num_workers=n)``.

    Args:
        url_or_store: a store URL/path (opened with ``verify`` and ``storage_options``) or an open store.
        batch_size: B, rows per batch.
        shuffle: permute read units and rows within each shuffle buffer, per ``(seed, epoch)``.
        seed: base seed (>= 0); the same on every rank.
        rank: this rank; default from ``torch.distributed`` when initialised, else 0.
        world_size: the number of ranks; default from ``torch.distributed`` when initialised, else 1.
        remainder: ``"pad"`` (each rank gets ``ceil(N / W)`` rows; the extra ``W ceil(N / W) - N``
            positions repeat rows from the start of the epoch's order) or ``"drop"`` (``floor(N / W)``
            rows each; ``N mod W`` rows skipped this epoch). Every rank yields the same number of batches.
        drop_last: drop each rank's final short batch.
        buffer_size: rows shuffled together in memory (rounded down to whole batches); default
            ~64 MiB of logits.
        inputs: stream the inputs a wds ``sample`` store packs beside the targets (``.npy`` members
            become tensors named without the suffix, e.g. ``input``; others stay lists of bytes).
        decode: per-sample ``{member: bytes} -> {name: value}`` for packed inputs (default
            :func:`default_decode`); values are batched with ``default_collate``.
        dataset: join a map-style dataset's items as ``input``: item ``i`` for
            store row ``i`` (``by="index"``), or the item whose key (``dataset_keys`` or the
            dataset's ``keys``) equals the row's key (``by="key"``).
        by: see ``dataset``.
        dataset_keys: see ``dataset``.
        check_join: refuse a joined dataset whose labels (``y`` of its ``(x, y)`` items) disagree with the
            store's on any row read that both label (``JoinMismatchError``: the wrong dataset, or the
            right one in another order). ``False`` skips the check.
        read_ahead: read and arrange the next shuffle window (and fetch a joined dataset's next batch)
            on a thread while the current one is handed out, and the next epoch's first window during an
            epoch's last: the training step then rarely waits. ``False``: all on the calling thread
            (one core; a little faster when nothing else runs between batches).
        verify: how an opened store checks its files (see :func:`softtargets.open_targets`).
        storage_options: fsspec options for the store's URL.
        arrays: arrays the store holds beside its logits, by name (``hint/fc1``, ``specialist/s0``,
            ``combined``: see :mod:`softtargets.store.sidecars`), added to each batch under that name as
            ``[B, D]`` tensors in the stored dtype.

        replay: views stores (:mod:`softtargets.streaming.views`): ``replay(x, params)`` rebuilds each row's view
            from the joined ``dataset``'s input; each epoch streams one view of every sample.

    Batches: ``key`` list[str], ``index`` int64 [B], ``teacher_logits`` [B, C] / [B, K, C] in the
    stored dtype, ``label`` int64 [B] (-1 unlabelled), ``epoch`` and ``batch_idx`` ints, plus inputs.
    """
    store = url_or_store if isinstance(url_or_store, TargetStore) else open_targets(
        url_or_store, verify=verify, storage_options=storage_options
    )
    kind: type[TargetStream] = TargetStream
    extra: dict[str, Any] = {}
    if views_of(store.manifest) is not None:
        kind, extra = ViewStream, {"replay": replay}
    elif replay is not None:
        raise ValueError(f"replay= is for views stores; {store.url} holds one target per sample")
    return kind(
        store, batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
        remainder=remainder, drop_last=drop_last, buffer_size=buffer_size, inputs=inputs, decode=decode,
        dataset=dataset, by=by, dataset_keys=dataset_keys, read_ahead=read_ahead, check_join=check_join,
        arrays=arrays,
        **extra,
    )


__all__ = [
    "Decoder", "EpochPlan", "JoinMismatchError", "SplitConfig", "StreamLoader", "TargetStream", "default_decode",
    "ViewStream", "epoch_view", "resolve_rank", "stream", "view_schedule",
]
