"""Stage one for language-model teachers: token sequences in, a sequence store of per-token targets out.

A teacher is any ``nn.Module`` mapping token ids ``[B, L]`` (int64) to logits ``[B, L, V]``, or to an object
with a ``.logits`` attribute (a ``transformers`` ``CausalLMOutput``) or a tuple whose first item is the logits.
Sequences are batched by length (sorted, then cut into batches of at most ``batch_tokens`` padded tokens), run
on the teachers' device under ``torch.inference_mode``, padded on the right (a causal model's logits at a real
position do not depend on padding after it), reduced there (the geometric mean's logits, or all K), and written
as rows of a :mod:`~softtargets.store.sequences` store. Dense content has to come to the CPU whole; a compact
content (``compact=``: ``topk``, ``sampled``, ``hidden``; see :mod:`softtargets.math.compact`), or a caller's own
``encode``, keeps ``[B, L, V]`` on the device and copies only the per-row records.

The store holds the sequences in the order they were run: by length, ties in input order. Keys name them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..choices import Content, Dtype, Layout
from ..math.compact import CompactSpec, as_compact_spec
from ..store.compact_rows import write_head
from ..store.manifest import Manifest
from ..store.sequences import create_sequences
from .compact_run import CompactRows
from .contents import head_weights, hidden_size_of
from .teachers import TeacherSpec, load_teachers

__all__ = ["lm_logits", "length_batches", "precompute_sequences"]

Encoder = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``encode(logits [R, K, V] on the device, hidden [R, K, d] or None) -> records [R, ...]`` (any dtype)."""


def lm_logits(output: Any) -> torch.Tensor:
    """The logits ``[B, L, V]`` of a teacher's output: a tensor, an object with ``.logits``, or a tuple's first item.

    Raises:
        TypeError: none of these, or not 3-dimensional.
    """
    if isinstance(output, torch.Tensor):
        logits = output
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise TypeError(f"a language-model teacher returns logits [B, L, V] (or .logits); got {type(output).__name__}")
    if logits.dim() != 3:
        raise TypeError(f"a language-model teacher returns logits [B, L, V]; got shape {tuple(logits.shape)}")
    return logits


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of sequences grouped into batches of similar length: sorted by ``(length, index)``, each batch at most
    ``batch_tokens`` padded tokens (``len(batch) * longest``), at least one sequence."""
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * int(lengths[i]) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _head_inputs(module: nn.Module, head: str | None) -> tuple[list[torch.Tensor], Any]:
    """A forward hook on the named submodule that records its input (the final hidden state)."""
    if head is None:
        return [], None
    try:
        sub = module.get_submodule(head)
    except AttributeError:
        raise ValueError(f"the teacher has no module named {head!r} (its output head) to capture hidden "
                         "states from") from None
    seen: list[torch.Tensor] = []
    handle = sub.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    return seen, handle


def precompute_sequences(
    teachers: Sequence[TeacherSpec] | TeacherSpec,
    sequences: Iterable[tuple[str, Sequence[int]]] | Iterable[tuple[str, Sequence[int], int | None]],
    url: str | os.PathLike[str],
    *,
    vocab_size: int,
    content: Content = "geometric",
    dtype: Dtype = "float16",
    layout: Layout | None = None,
    batch_tokens: int = 4096,
    device: str | torch.device | None = None,
    compact: CompactSpec | dict[str, Any] | str | None = None,
    encode: Encoder | None = None,
    head: str | None = None,
    overwrite: bool = False,
    **store_kwargs: Any,
) -> Manifest:
    """Run language-model teachers over token sequences and write a sequence store.

    Args:
        teachers: modules (or teacher specs as :func:`~softtargets.precompute` takes) mapping ``[B, L]`` ids to
            ``[B, L, V]`` logits (or ``.logits``).
        sequences: ``(key, ids)`` or ``(key, ids, next_id)``; ``ids`` int ``[L]``, ``next_id`` the token after
            the sequence (the last row's label) or ``None``.
        url: the store to create.
        vocab_size: V, the logits' last dimension and the token ids' range.
        content: ``geometric`` (mean logits ``[V]`` per row) or ``per_teacher`` (``[K, V]`` per row).
        dtype: the storage dtype, as :func:`~softtargets.create_targets`.
        layout: ``zarr`` or ``wds`` (default: from the URL), as :func:`~softtargets.create_targets`.
        batch_tokens: padded tokens per teacher batch.
        device: where the teachers run (moved there; default: where their parameters are).
        compact: a compact content (:class:`~softtargets.CompactSpec`, its fields as a mapping, or a kind name),
            encoded per batch on the device (``hidden``: the input of the head module ``compact.head``, captured
            by a forward hook; the head's weights stored once). The manifest's ``compact`` entry records the
            measured ``tail_error`` (topk) or ``logit_error`` (hidden) over every row written.
        encode: compact rows: called with the ``[R, K, V]`` logits of a batch's real positions (and the
            captured hidden states ``[R, K, d]`` when ``head`` is given), on the device; its ``[R, ...]``
            records go to the store instead of the logits.
        head: the name of each teacher's output-head module (e.g. ``"lm_head"``): its input is captured with a
            forward hook and passed to ``encode``.
        overwrite: replace an existing store.
        **store_kwargs: further :func:`~softtargets.create_targets` arguments (``shard_rows``, ``transfer_set``...).

    Returns:
        The store's manifest.

    Raises:
        TypeError: a teacher's output is not ``[B, L, V]`` logits.
        ValueError: logits of the wrong vocabulary size, ``head`` names no module, or both ``compact`` and
            ``encode`` given.
    """
    if compact is not None and (encode is not None or head is not None):
        raise ValueError("give compact= (the store's own compact content) or encode=/head= (your own records), "
                         "not both")
    specs = [teachers] if isinstance(teachers, nn.Module) or not isinstance(teachers, Sequence) else list(teachers)
    loaded = load_teachers(specs)
    modules = [t.module for t in loaded]
    if device is not None:
        modules = [m.to(device) for m in modules]
    dev = next((p.device for p in modules[0].parameters()), torch.device("cpu")) if device is None \
        else torch.device(device)
    items = [(str(s[0]), np.asarray(s[1], dtype=np.int64).reshape(-1), s[2] if len(s) > 2 else None)
             for s in sequences]
    store_kwargs.setdefault("num_samples", sum(len(ids) for _, ids, _ in items))  # small stores get small blocks
    spec = None if compact is None else as_compact_spec(compact)
    hidden_size = hidden_size_of(modules, spec.head, content) if spec is not None and spec.kind == "hidden" \
        else None
    writer = create_sequences(url, vocab_size=vocab_size, content=content, teachers=loaded, dtype=dtype,
                              layout=layout, overwrite=overwrite, compact=spec, hidden_size=hidden_size,
                              **store_kwargs)
    manifest = writer.writer.spec
    rows_enc = None if spec is None else CompactRows(manifest, modules, dev)
    if spec is not None and spec.kind == "hidden":
        write_head(writer.writer.fs, writer.writer.root, manifest, *head_weights(modules, spec.head, content))
    worst: dict[str, float] = {}
    hooks = [_head_inputs(m, head) for m in modules]
    try:
        for batch in length_batches([len(ids) for _, ids, _ in items], batch_tokens):
            longest = max(len(items[i][1]) for i in batch)
            ids = torch.zeros((len(batch), longest), dtype=torch.int64)
            for r, i in enumerate(batch):
                ids[r, :len(items[i][1])] = torch.from_numpy(items[i][1])
            ids = ids.to(dev)
            mask = torch.arange(longest, device=dev)[None, :] < torch.tensor(
                [len(items[i][1]) for i in batch], device=dev)[:, None]
            per_teacher = []
            hidden = []
            with torch.inference_mode():
                for m, (seen, _) in zip(modules, hooks, strict=True):
                    seen.clear()
                    logits = lm_logits(m(ids)).float()
                    if logits.shape[-1] != vocab_size:
                        raise ValueError(f"a teacher returned logits over {logits.shape[-1]} tokens; "
                                         f"vocab_size is {vocab_size}")
                    per_teacher.append(logits[mask])  # [R, V], real positions only
                    if seen:
                        hidden.append(seen[-1][mask].float())
                stacked = torch.stack(per_teacher, dim=1)  # [R, K, V]
                if rows_enc is not None:
                    rows, stats = rows_enc.encode_at(writer.rows_written, stacked, select=mask)
                    for name, value in stats.items():
                        worst[name] = max(worst.get(name, 0.0), float(value))
                elif encode is not None:
                    rows = encode(stacked, torch.stack(hidden, dim=1) if hidden else None)
                else:
                    rows = stacked.mean(dim=1) if content == "geometric" else stacked
                rows_cpu = rows.cpu()
            lengths = mask.sum(dim=1).tolist()
            start = 0
            for r, i in enumerate(batch):
                key, seq_ids, next_id = items[i]
                n = int(lengths[r])
                writer.write(key, seq_ids, rows_cpu[start:start + n], next_id=next_id)
                start += n
    finally:
        for _, handle in hooks:
            if handle is not None:
                handle.remove()
        if rows_enc is not None:
            rows_enc.close()
    if manifest.compact is not None:
        manifest.compact.update(worst)  # the largest errors measured over every row
    return writer.close()
