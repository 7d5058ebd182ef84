"""Target stores: one writer/reader interface, two layouts (``zarr``, ``wds``).

A new layout is one module here plus one entry in :data:`LAYOUTS`: what the layout is (its read unit,
whether it packs inputs, its manifest extras, its card recipes) lives on its store class, found with
:func:`layout_class`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from ..choices import (
    Compressor,
    Content,
    Dtype,
    Layout,
    Normalization,
    Overflow,
    SampleLayout,
    VerifyMode,
    parse_choice,
)
from .base import (
    PENDING_NAME,
    ChecksumError,
    StoreError,
    TargetStore,
    TargetWriter,
    check_rule,
    read_manifest,
)
from .compact_rows import compact_entry
from .files import join, url_to_fs
from .manifest import Manifest
from .wds_layout import WdsStore, WdsWriter
from .zarr_layout import ZarrStore, ZarrWriter

LAYOUTS: dict[str, tuple[type[TargetWriter], type[TargetStore]]] = {
    "zarr": (ZarrWriter, ZarrStore),
    "wds": (WdsWriter, WdsStore),
}


def layout_class(layout: str) -> type[TargetStore]:
    """The store class of ``layout``, which says what the layout is (see :class:`TargetStore`)."""
    parse_choice("layout", layout, Layout)
    return LAYOUTS[layout][1]


BYTES_PER_DTYPE = {"float32": 4, "float16": 2, "bfloat16": 2}
# Default read unit ~4 MiB and shard ~128 MiB: big sequential reads, few files at 10^8 rows.
BLOCK_BYTES = 4 << 20
SHARD_BYTES = 128 << 20


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def default_rows(row_bytes: int, sample_layout: str = "block") -> tuple[int, int]:
    """``(block_rows, shard_rows)`` for rows of ``row_bytes`` bytes: powers of two, shard = whole blocks."""
    block = min(16384, max(64, _pow2_floor(BLOCK_BYTES / row_bytes)))
    if sample_layout == "sample":
        return 1, min(65536, max(256, _pow2_floor(SHARD_BYTES / row_bytes)))
    return block, block * min(256, max(1, _pow2_floor(SHARD_BYTES / (block * row_bytes))))


def infer_layout(url: str) -> Layout:
    """``wds`` for URLs ending in ``.wds``/``.tar`` or a folder of ``.tar`` shards, else ``zarr``."""
    return "wds" if str(url).rstrip("/").endswith((".wds", ".tar")) else "zarr"


def create_targets(
    url: str | os.PathLike[str],
    *,
    num_classes: int,
    content: Content = "per_teacher",
    teachers: Sequence[Any] | None = None,
    num_teachers: int | None = None,
    layout: Layout | None = None,
    dtype: Dtype = "float16",
    temperature: float | None = None,
    normalization: Normalization = "zero_mean",
    overflow: Overflow = "error",
    num_samples: int | None = None,
    shard_rows: int | None = None,
    block_rows: int | None = None,
    sample_layout: SampleLayout = "block",
    inputs: dict[str, str] | None = None,
    class_names: Sequence[str] | None = None,
    transfer_set: dict[str, str] | None = None,
    compressor: Compressor = "none",
    lineage: list[dict[str, Any]] | None = None,
    views: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    storage_options: dict | None = None,
    defer: bool = False,
    compact: Any = None,
    hidden_size: int | None = None,
) -> TargetWriter:
    """Begin a target store at ``url`` (a path or fsspec URL) and return its writer.

    Args:
        num_classes: C, the length of each logit vector.
        content: ``per_teacher`` (write ``[B, K, C]``), ``geometric`` (mean logits ``[B, C]``) or
            ``arithmetic`` (``log mean_k softmax(v_k / T0)`` ``[B, C]``, with ``temperature=T0``).
        teachers: K teacher descriptions (dicts with ``name``, ``sha256``, ``num_params``, or
            objects with an ``info()`` method, or names). Gives ``num_teachers`` when that is omitted.
        layout: ``zarr`` or ``wds``; inferred from the URL's suffix (``.wds``/``.tar`` -> wds).
        dtype: ``float32``, ``float16`` or ``bfloat16`` storage.
        normalization: ``zero_mean`` (subtract each row's mean; softmax is shift invariant) or ``none``.
        overflow: float16 values beyond +-65504: ``error`` (default) or ``clip``.
        num_samples: N when known (parallel writers need it); else the store grows as rows arrive.
        shard_rows: rows per shard file / per read unit; defaults aim at ~128 MiB / ~4 MiB.
        block_rows: see ``shard_rows``.
        sample_layout: wds only: ``block`` (many rows per tar sample) or ``sample`` (one row each).
        inputs: wds ``sample`` layout: tar member extensions of inputs packed beside targets -> description.
        compressor: zarr only: ``none`` (default; logits barely compress), ``zstd`` or ``blosc``.
        views: the manifest's ``views`` (a store of augmented views, rows view-major; see :mod:`.views`).
        overwrite: replace an existing store. resume: continue an unfinished one.
        compact: a compact content (:class:`~softtargets.math.compact.CompactSpec`, a mapping of its fields or
            a kind name: ``topk``, ``sampled``, ``hidden``): each row is then a packed record ``uint8 [B,
            row_bytes]`` (:func:`softtargets.precompute.contents.encode_rows`) summarising the K teachers
            (``per_teacher``) or their geometric mean (``geometric``); ``dtype`` becomes the values' dtype.
        hidden_size: ``hidden``: d, the length of a row's stored hidden vector.
        defer: check the arguments now, touch storage only at the writer's :meth:`~TargetWriter.prepare`
            (or its first write): a caller may fill in ``writer.spec.teachers`` meanwhile.
    """
    layout = layout or infer_layout(str(url))
    parse_choice("layout", layout, Layout)
    parse_choice("content", content, Content)
    parse_choice("dtype", dtype, Dtype)
    parse_choice("overflow policy", overflow, Overflow)
    parse_choice("compressor", compressor, Compressor)
    if content == "arithmetic" and temperature is None:
        raise ValueError("an arithmetic store needs temperature=T0, the temperature its targets were averaged at")
    if content != "arithmetic" and temperature is not None:
        raise ValueError(f"temperature is recorded only for arithmetic stores, not {content}")
    infos = [_teacher_info(t, i) for i, t in enumerate(teachers or ())]
    k = num_teachers or len(infos) or 1
    entry = None
    if compact is not None:
        if content not in ("per_teacher", "geometric"):
            raise ValueError(f"a compact content summarises each teacher (per_teacher) or their geometric mean "
                             f"(geometric), not {content}")
        entry = compact_entry(compact, int(num_classes), k if content == "per_teacher" else 1, hidden_size)
        dtype = "float16" if entry["kind"] == "hidden" else entry["value_dtype"]
        normalization, overflow = "none", "error"
    if infos and len(infos) != k:
        raise ValueError(f"num_teachers={k} but {len(infos)} teachers described")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    row_bytes = BYTES_PER_DTYPE[dtype] * num_classes * (k if content == "per_teacher" else 1)
    if entry is not None:
        row_bytes = entry["row_bytes"]
    store_cls = layout_class(layout)
    recorded = store_cls.sample_layout_of(sample_layout)  # None where the layout has no sample layout
    auto_block, auto_shard = default_rows(row_bytes, recorded or "block")
    if num_samples:  # a small store gets small blocks, not one mostly-empty chunk
        fit = 1 << max(0, int(num_samples) - 1).bit_length()
        auto_block, auto_shard = min(auto_block, fit), min(auto_shard, fit)
    block_rows, shard_rows = _block_and_shard(block_rows, shard_rows, auto_block, auto_shard,
                                              recorded == "sample")
    if shard_rows % block_rows:
        raise ValueError(f"shard_rows={shard_rows} must be a multiple of block_rows={block_rows}")
    spec = Manifest(
        layout=layout, num_samples=int(num_samples or 0), num_classes=int(num_classes), content=content,
        num_teachers=k, dtype=dtype, shard_rows=shard_rows, block_rows=block_rows, teachers=infos,
        temperature=None if temperature is None else float(temperature), normalization=normalization,
        overflow=overflow, sample_layout=recorded,
        inputs=dict(inputs) if inputs else None, class_names=list(class_names) if class_names else None,
        transfer_set=transfer_set, lineage=list(lineage or []),
        extra=store_cls.manifest_extra(compressor), views=dict(views) if views else None, compact=entry,
    )
    mode = "overwrite" if overwrite else "resume" if resume else "create"
    writer_cls = LAYOUTS[layout][0]
    return writer_cls(str(url), spec, mode=mode, fixed_rows=num_samples is not None, storage_options=storage_options,
                      defer=defer)


def _block_and_shard(
    block_rows: int | None, shard_rows: int | None, auto_block: int, auto_shard: int, one_row_samples: bool
) -> tuple[int, int]:
    """``(block_rows, shard_rows)`` from the caller's choices, the defaults filling what was not given: a default
    shard is whole blocks; a default block divides the shard given (the largest that does, up to the default);
    a one-row-per-sample wds store reads blocks of 1."""
    if not block_rows:
        block_rows = 1 if one_row_samples else _largest_divisor(int(shard_rows), auto_block) if shard_rows \
            else auto_block
    block_rows = int(block_rows)
    return block_rows, int(shard_rows or max(auto_shard // block_rows, 1) * block_rows)


def _largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` (>= 1) that is at most ``cap``."""
    if n < 1:
        return 1
    best, d = 1, 1
    while d * d <= n:
        if n % d == 0:
            best = max(best, *(x for x in (d, n // d) if x <= cap), 1)
        d += 1
    return best


def _teacher_info(t: Any, i: int) -> dict[str, Any]:
    if hasattr(t, "info"):
        t = t.info()
    if isinstance(t, str):
        return {"name": t, "sha256": None, "num_params": None}
    if isinstance(t, dict) and "name" in t:
        return {"name": str(t["name"]), "sha256": t.get("sha256"), "num_params": t.get("num_params")}
    raise TypeError(f"teacher {i}: expected a name, a dict with 'name', or an object with info(); got {t!r}")


def attach_writer(url: str, storage_options: dict | None = None) -> TargetWriter:
    """A writer for the unfinished store at ``url`` (created elsewhere): for shard tasks."""
    fs, root = url_to_fs(url, **(storage_options or {}))
    try:
        pending = json.loads(fs.cat_file(join(root, PENDING_NAME)))
    except FileNotFoundError:
        raise StoreError(f"{url}: no unfinished store to attach to ({PENDING_NAME} missing)") from None
    spec = Manifest.from_dict({**pending, "shards": []})
    return LAYOUTS[spec.layout][0](url, spec, mode="attach", storage_options=storage_options)


def open_targets(
    url: str | os.PathLike[str], *, verify: VerifyMode = "lazy", storage_options: dict | None = None
) -> TargetStore:
    """Open a finished store read-only: a local path or fsspec URL (``file://``, ``memory://``,
    ``http(s)://``, ``s3://`` with s3fs).

    The manifest must exist, match the schema and a known ``format_version``; every listed
    file must exist at its recorded size (checked at open where the filesystem can list),
    and match its sha256 (``verify``: ``lazy`` = on first read of each shard, ``full`` = now,
    ``none`` = never). Lazily, a local zarr store of format 2 is checked by the bytes read:
    each file's chunk checksums and index against its ``chunks_sha256``, then each inner chunk
    against its crc32c, as first read (``full`` and ``softtargets verify`` hash every file).
    """
    url = os.fspath(url)
    fs, root = url_to_fs(url, **(storage_options or {}))
    manifest = read_manifest(url, fs, root)
    return LAYOUTS[manifest.layout][1](url, manifest, fs, root, verify)


__all__ = [
    "LAYOUTS", "ChecksumError", "StoreError", "TargetStore", "TargetWriter", "attach_writer", "check_rule",
    "create_targets", "default_rows", "layout_class",
    "open_targets",
]
