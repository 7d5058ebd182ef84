"""Derive one store from another: change layout or dtype, or reduce per-teacher logits.

Everything streams shard by shard: a source shard is read, re-encoded, and cut into
whole destination shards (:class:`ShardSink`), so memory holds about one source shard
and one destination shard whatever the store's size. Keys, labels, teachers, class names,
the transfer set, a views store's views (parameter files cut at the new shards) and a sequence store's
sequences (its ``sequences/*.npy``, checked, as the rows keep their order) carry over;
the new manifest's ``lineage`` gains one entry naming the source URL, the sha256 of its
``manifest.json``, the operation and its parameters.

Same content, same dtype: the stored bits are copied exactly (no re-normalisation), so a
conversion and its inverse give back the original bits.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..choices import Content, Dtype, Overflow
from ..math.compact import as_compact_spec
from ..math.temperature import reduce_teachers
from ..store import TargetStore, TargetWriter, create_targets, infer_layout, layout_class, open_targets
from ..store.base import PENDING_NAME, delete_store
from ..store.compact_rows import encode_compact_rows
from ..store.encoding import encode_logits
from ..store.files import join, url_to_fs
from ..store.manifest import MANIFEST_NAME, Manifest, utc_now
from ..store.sequences import copy_sequence_files
from ..store.views import ViewParams, views_of, write_params_files
from .unique_keys import str_array


def manifest_sha256(store: TargetStore) -> str:
    """sha256 hex of the store's ``manifest.json`` bytes as they lie on storage."""
    return hashlib.sha256(store.fs.cat_file(join(store.root, MANIFEST_NAME))).hexdigest()


def source_url(url: str) -> str:
    """A store URL as lineage records it: local paths made absolute, URLs unchanged."""
    return url if "://" in url else os.path.abspath(url)


def lineage_entry(operation: str, sources: Sequence[TargetStore], parameters: dict[str, Any]) -> dict[str, Any]:
    """One ``lineage`` record: what was done, to which stores (URL + manifest sha256), with what parameters."""
    return {
        "operation": operation,
        "sources": [{"url": source_url(s.url), "manifest_sha256": manifest_sha256(s), "num_samples": len(s)}
                    for s in sources],
        "parameters": parameters,
        "time": utc_now(),
        "softtargets_version": __version__,
    }


class ShardSink:
    """Buffers encoded rows and writes them as whole destination shards (``write_shard``), then finalizes.

    ``add`` takes keys ``str [n]``, stored logits (the destination's storage dtype) ``[n, ...]``,
    labels ``int64 [n]`` and optionally ``n`` input dicts; rows arrive in destination order.
    """

    def __init__(self, writer: TargetWriter):
        self.writer = writer
        self.next_shard = 0
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, list | None]] = []
        self._rows = 0

    def add(self, keys: np.ndarray, stored: np.ndarray, labels: np.ndarray, inputs: list | None = None) -> None:
        if len(keys):
            self._parts.append((keys, stored, labels, inputs))
            self._rows += len(keys)
        spec = self.writer.spec
        while self.next_shard < spec.num_shards:
            start, stop = spec.shard_range(self.next_shard)
            if self._rows < stop - start:
                break
            self._flush(stop - start)

    def _flush(self, rows: int) -> None:
        keys, stored, labels = (np.concatenate([p[i] for p in self._parts]) for i in range(3))
        inputs = None if self._parts[0][3] is None else [x for p in self._parts for x in (p[3] or [])]
        self.writer.write_shard(self.next_shard, keys[:rows], stored[:rows], labels[:rows],
                                None if inputs is None else inputs[:rows], encoded=True)
        rest = len(keys) - rows
        self._parts = [(keys[rows:], stored[rows:], labels[rows:], None if inputs is None else inputs[rows:])] \
            if rest else []
        self._rows = rest
        self.next_shard += 1

    def close(self) -> Manifest:
        """Write the last shard and the manifest; refuses if rows are missing or left over."""
        if self._rows:
            raise ValueError(f"{self.writer.url}: {self._rows} rows left over after the last shard")
        return self.writer.finalize()


def derive(writer_args: dict[str, Any], fill: Any, dst: str, overwrite: bool,
           storage_options: dict[str, Any] | None = None) -> Manifest:
    """Create the destination with ``create_targets(dst, **writer_args)``, run ``fill(sink)``, finalize.

    On any failure the unfinished destination (ours: it has a pending spec and no manifest) is removed.
    """
    writer = create_targets(dst, overwrite=overwrite, storage_options=storage_options, **writer_args)
    try:
        sink = ShardSink(writer)
        fill(sink)
        return sink.close()
    except BaseException:
        fs, root = writer.fs, writer.root
        if fs.exists(join(root, PENDING_NAME)) and not fs.exists(join(root, MANIFEST_NAME)):
            with contextlib.suppress(FileExistsError):  # refused (not recognisably ours): left as it is
                delete_store(fs, root, writer.url)
        raise


def same_location(a: str, b: str, storage_options: dict[str, Any] | None = None) -> bool:
    fa, ra = url_to_fs(a, **(storage_options or {}))
    fb, rb = url_to_fs(b, **(storage_options or {}))
    return fa.unstrip_protocol(ra) == fb.unstrip_protocol(rb)


def carry_spec(m: Manifest) -> dict[str, Any]:
    """``create_targets`` arguments that every derived store keeps from its source."""
    return {
        "num_classes": m.num_classes, "num_teachers": m.num_teachers, "teachers": m.teachers or None,
        "normalization": m.normalization, "class_names": m.class_names, "transfer_set": m.transfer_set,
    }


def views_declaration(m: Manifest, samples: int | None = None) -> dict[str, Any] | None:
    """``create_targets``' ``views=`` for a store derived from ``m`` (its views, of ``samples`` samples), or None."""
    views = views_of(m)
    return None if views is None else views.declaration(samples)


def carry_views(store: TargetStore, sink: ShardSink, rows: np.ndarray | None = None) -> None:
    """Write the parameter files of a store derived from views store ``store``: destination row ``j`` is source row
    ``rows[j]`` (default ``j``). Nothing for a store without views."""
    if views_of(store.manifest) is None:
        return
    params = ViewParams(store)
    write_params_files(sink.writer, lambda a, b: params.rows(np.arange(a, b) if rows is None else rows[a:b]))


def encode_rows(logits: torch.Tensor, src: Manifest, content: Content, dtype: Dtype, overflow: Overflow,
                temperature: float | None) -> np.ndarray:
    """Stored logits of the source (``[B, C]``/``[B, K, C]``, its dtype) -> the destination's stored array.

    Same content: values pass unchanged (bit-exact when the dtype is the same). Reduction:
    ``reduce_teachers`` in float64, then the source's normalisation and the new dtype.
    """
    if content == src.content:
        return encode_logits(logits, dtype, "none", overflow)[0]
    reduced = reduce_teachers(logits.to(torch.float64), content, temperature or 1.0)
    return encode_logits(reduced, dtype, src.normalization, overflow)[0]


def check_content(src: Manifest, content: str, temperature: float | None) -> float | None:
    """The destination's T0 for a conversion of ``src.content`` to ``content``; refuses what cannot be derived."""
    if content == src.content:
        if content == "arithmetic" and temperature is not None and float(temperature) != src.temperature:
            raise ValueError(f"the source holds arithmetic targets at T0={src.temperature}; they cannot be "
                             f"re-averaged at T0={temperature} (that needs per-teacher logits)")
        return src.temperature
    if src.content != "per_teacher":
        raise ValueError(f"cannot convert {src.content} content to {content}: only per_teacher logits can be "
                         "reduced (a reduced store has lost the individual teachers)")
    if content == "arithmetic":
        if temperature is None:
            raise ValueError("an arithmetic reduction needs --temperature T0 (the targets are exact only at T0)")
        return float(temperature)
    if temperature is not None:
        raise ValueError(f"--temperature applies to arithmetic reductions only; {content} logits serve every T")
    return None


def plan_layout(
    m: Manifest, dst: str, layout: str | None = None, sample_layout: str | None = None, shard_rows: int | None = None,
    block_rows: int | None = None, compressor: str | None = None,
) -> dict[str, Any]:
    """``create_targets`` layout arguments for a store derived from one like ``m``.

    Layout from the argument or ``dst``'s suffix; shard and block rows default to the source's,
    except to or from the one-row-per-sample wds layout (then block 1, or the layout's defaults).
    """
    layout = layout or infer_layout(dst)
    src, dst_cls = layout_class(m.layout), layout_class(layout)
    sample = dst_cls.sample_layout_of(sample_layout or src.sample_layout_of(m.sample_layout) or "block")
    was_sample = src.sample_layout_of(m.sample_layout) == "sample"
    if shard_rows is None and block_rows is None:
        if sample == "sample":
            shard_rows, block_rows = m.shard_rows, 1
        elif not was_sample:
            shard_rows, block_rows = m.shard_rows, m.block_rows
    elif block_rows is None and shard_rows is not None and sample != "sample":
        block_rows = math.gcd(int(shard_rows), m.block_rows if not was_sample else int(shard_rows))
    if compressor is None:
        compressor = src.compressor_of(m)
    return {"layout": layout, "sample_layout": sample, "shard_rows": shard_rows, "block_rows": block_rows,
            "compressor": compressor if dst_cls.compresses else "none"}


def convert_store(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, layout: str | None = None, dtype: Dtype | None = None,
    content: Content | None = None, temperature: float | None = None, shard_rows: int | None = None,
    block_rows: int | None = None, sample_layout: str | None = None, compressor: str | None = None,
    overflow: Overflow | None = None, drop_inputs: bool = False, overwrite: bool = False, progress: bool | None = None,
    storage_options: dict[str, Any] | None = None,
    compact: Any = None,
) -> Manifest:
    """Write a copy of store ``src`` at ``dst`` in another layout, dtype or content. Returns the new manifest.

    Args:
        layout: ``zarr`` or ``wds`` (default: inferred from ``dst``'s suffix, like ``create_targets``).
        dtype: storage dtype (default: the source's). float16 values beyond +-65504 follow ``overflow``.
        content: ``geometric`` (mean of the K teachers' logits) or ``arithmetic`` (``log mean_k
            softmax(v_k / T0)``, with ``temperature=T0``) from a ``per_teacher`` source; default unchanged.
        shard_rows: default the source's (or the layout's defaults when changing to or from
            the one-row-per-sample wds layout).
        block_rows: see ``shard_rows``.
        sample_layout: wds only, ``block`` (default) or ``sample``.
        compressor: zarr only (default: the source's if zarr, else ``none``).
        drop_inputs: a source with packed inputs may only go to a wds ``sample`` store unless this is set.
        storage_options: fsspec options for both ``src``'s and ``dst``'s filesystems (never written into ``dst``).
        compact: a compact content to derive from dense logits (:class:`~softtargets.math.compact.CompactSpec`,
            its fields as a mapping, or ``"topk"`` / ``"sampled"``); ``content`` chooses each teacher
            (``per_teacher``, from a per_teacher source) or their geometric mean. ``hidden`` needs the
            teachers' hidden states and is refused.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if same_location(src, dst, storage_options):
        raise ValueError(f"{dst}: the destination is the source; write the conversion elsewhere")
    store = open_targets(src, storage_options=storage_options)
    m = store.manifest
    if compact is not None or m.compact is not None:
        return convert_compact(store, dst, compact, content=content, layout=layout, shard_rows=shard_rows,
                               block_rows=block_rows, sample_layout=sample_layout, compressor=compressor,
                               drop_inputs=drop_inputs, overwrite=overwrite, progress=progress)
    content = content or m.content
    dtype = dtype or m.dtype
    t0 = check_content(m, content, temperature)
    plan = plan_layout(m, dst, layout, sample_layout, shard_rows, block_rows, compressor)
    carry_inputs = bool(m.inputs) and plan["sample_layout"] == "sample"
    if m.inputs and not carry_inputs and not drop_inputs:
        raise ValueError(f"{src} packs inputs {sorted(m.inputs)} beside its targets; only a wds store with "
                         "sample_layout='sample' can hold them: choose that, or pass drop_inputs=True")
    overflow = overflow or m.overflow
    params = {**plan, "dtype": dtype, "content": content, "temperature": t0, "overflow": overflow,
              "inputs": "carried" if carry_inputs else ("dropped" if m.inputs else None)}
    args = {
        **carry_spec(m), **plan, "content": content, "dtype": dtype, "temperature": t0, "overflow": overflow,
        "num_samples": m.num_samples, "inputs": m.inputs if carry_inputs else None,
        "lineage": [*m.lineage, lineage_entry("convert", [store], params)], "views": views_declaration(m),
    }

    def fill(sink: ShardSink) -> None:
        for shard in tqdm(m.shards, desc="convert", unit="shard", disable=None if progress is None else not progress):
            rows = store.rows(shard.start, shard.stop)
            inputs = store.read_shard(shard.id)["inputs"] if carry_inputs else None
            try:
                stored = encode_rows(rows["logits"], m, content, dtype, overflow, t0)
            except OverflowError as e:
                raise ValueError(f"{src}: shard {shard.id} (rows {shard.start}-{shard.stop - 1}): {e}") from None
            sink.add(str_array(rows["key"]), stored, rows["label"].numpy(), inputs)
        carry_views(store, sink)
        copy_sequence_files(store, sink.writer)

    return derive(args, fill, dst, overwrite, storage_options)


def convert_compact(
    store: TargetStore, dst: str, compact: Any, *, content: Content | None, layout: str | None,
    shard_rows: int | None, block_rows: int | None, sample_layout: str | None, compressor: str | None,
    drop_inputs: bool, overwrite: bool, progress: bool | None,
) -> Manifest:
    """:func:`convert_store` to a compact content (``topk``, ``sampled``) from dense per-teacher or geometric logits."""
    m = store.manifest
    if m.compact is not None:
        raise ValueError(f"{store.url} holds compact {m.compact['kind']} rows; only dense logits convert to a compact "
                         "content (a compact store has lost the full logits)")
    spec = as_compact_spec(compact)
    if spec.kind == "hidden":
        raise ValueError("a hidden store needs the teachers' hidden states, which a logit store does not hold: "
                         "run precompute(..., compact=CompactSpec('hidden', head=...)) instead")
    if m.content == "arithmetic":
        raise ValueError(f"{store.url} holds arithmetic-mean log-probabilities at T0={m.temperature}, exact only at "
                         "T0; a compact content needs per_teacher or geometric logits")
    content = content or ("per_teacher" if m.per_teacher else "geometric")
    if content not in ("per_teacher", "geometric") or (content == "per_teacher" and not m.per_teacher):
        raise ValueError(f"a compact content summarises each teacher (per_teacher, from a per_teacher source) or "
                         f"their geometric mean (geometric); cannot make {content} from {m.content}")
    if m.inputs and not drop_inputs:
        raise ValueError(f"{store.url} packs inputs beside its targets; a compact store does not carry them: "
                         "pass drop_inputs=True")
    plan = plan_layout(m, dst, layout, "block" if sample_layout is None else sample_layout, shard_rows, block_rows,
                       compressor)
    params = {**plan, "content": content, "compact": spec.to_dict()}
    args = {
        **carry_spec(m), **plan, "content": content, "num_samples": m.num_samples, "compact": spec,
        "lineage": [*m.lineage, lineage_entry("convert", [store], params)], "views": views_declaration(m),
    }

    def fill(sink: ShardSink) -> None:
        worst: dict[str, float] = {}
        for shard in tqdm(m.shards, desc="convert", unit="shard", disable=None if progress is None else not progress):
            rows = store.rows(shard.start, shard.stop)
            gen = torch.Generator().manual_seed((spec.seed * 1_000_003 + shard.start) % (1 << 63))
            records, stats = encode_compact_rows(rows["logits"].float(), sink.writer.spec, generator=gen)
            for key, value in stats.items():
                worst[key] = max(worst.get(key, 0.0), value)
            sink.add(str_array(rows["key"]), records.numpy(), rows["label"].numpy())
        carry_views(store, sink)
        copy_sequence_files(store, sink.writer)
        assert sink.writer.spec.compact is not None
        sink.writer.spec.compact.update(worst)

    return derive(args, fill, dst, overwrite)
