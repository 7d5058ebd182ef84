"""Compact rows in a store: the manifest's ``compact`` entry, the packed records, and a ``hidden`` store's head.

A compact store (format 3) keeps one packed record per row in its ``logits`` array, ``uint8 [N, row_bytes]``,
in every layout (zarr arrays, wds ``logits.npy`` members): shards, checksums, verification and streaming are
those of any store. The manifest's ``compact`` entry names the record's fields (:mod:`softtargets.math.compact`).
A ``hidden`` store also holds its output head once, at ``head/weight.npy`` (``float32 [C, d]``, or ``[K, C, d]``
per teacher) and ``head/bias.npy`` (``[C]`` / ``[K, C]``), each listed in ``compact.head_files`` with its size
and sha256, which readers check before use.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ChecksumError, StoreError
from ..math.compact import (
    CompactSpec,
    as_compact_spec,
    decode_hidden,
    encode_hidden,
    encode_sampled,
    encode_topk,
    head_logits,
    pack_record,
    record_fields,
    row_bytes,
    unpack_record,
)
from .files import atomic_write, join, sha256_hex, unsafe_path
from .manifest import Manifest

HEAD_FILES = {"weight": "head/weight.npy", "bias": "head/bias.npy"}


def compact_entry(spec: CompactSpec | Mapping[str, Any] | str, num_classes: int, vectors: int = 1,
                  hidden_size: int | None = None) -> dict[str, Any]:
    """The manifest's ``compact`` entry of a new store: the spec, the record's fields and bytes, the
    temperature range; measured errors (``tail_error``, ``logit_error``) and ``head_files`` filled in later."""
    cs = as_compact_spec(spec)
    fields = record_fields(cs, num_classes, vectors, hidden_size or 0)
    lo, hi = cs.temperature_range
    return {**cs.to_dict(), "vectors": int(vectors), "hidden_size": hidden_size if cs.kind == "hidden" else None,
            "fields": fields, "row_bytes": row_bytes(fields),
            "temperature_range": [lo, None if math.isinf(hi) else hi], "tail_error": None, "logit_error": None,
            "head_files": None}


def compact_spec_of(m: Manifest) -> CompactSpec:
    """The :class:`CompactSpec` of compact store ``m``.

    Raises:
        ValueError: ``m`` holds dense logits.
    """
    if m.compact is None:
        raise ValueError("this store holds dense logits, not a compact content (topk, sampled, hidden)")
    return CompactSpec.from_dict(m.compact)


def compact_records(records: Any, m: Manifest, out: np.ndarray | None = None) -> np.ndarray:
    """Packed records ``uint8 [B, row_bytes]`` (torch or numpy) checked against store ``m``, as numpy (in ``out``
    where given).

    Raises:
        ValueError: not uint8, or not ``row_bytes`` wide (dense logits given to a compact store).
    """
    assert m.compact is not None
    arr = records.detach().cpu().numpy() if isinstance(records, torch.Tensor) else np.asarray(records)
    width = int(m.compact["row_bytes"])
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"this {m.compact['kind']} store takes packed records uint8 [B, {width}] "
                         f"(softtargets.precompute.contents.encode_rows), got {arr.dtype} {list(arr.shape)}")
    if out is None:
        return arr
    if out.shape != arr.shape or out.dtype != arr.dtype:
        raise ValueError(f"out is {out.dtype} {out.shape}; expected uint8 {arr.shape}")
    out[...] = arr
    return out


def unpack_rows(m: Manifest, stored: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
    """A compact store's stored rows ``uint8 [..., row_bytes]`` -> its fields by name (ids as int64)."""
    if m.compact is None:
        raise ValueError("this store holds dense logits, not a compact content (topk, sampled, hidden)")
    return unpack_record(stored, m.compact["fields"])


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def write_head(fs: Any, root: str, m: Manifest, weight: torch.Tensor | np.ndarray,
               bias: torch.Tensor | np.ndarray | None) -> None:
    """Write a ``hidden`` store's output head (``float32``) under its root and record it in ``m.compact``.

    Args:
        weight: ``[C, d]`` (or ``[K, C, d]`` per teacher).
        bias: ``[C]`` (``[K, C]``), or None for a head without bias.
    """
    assert m.compact is not None
    files: dict[str, Any] = {"bias": None}
    for name, value in (("weight", weight), ("bias", bias)):
        if value is None:
            continue
        arr = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        blob = _npy_bytes(arr)
        atomic_write(fs, join(root, HEAD_FILES[name]), blob)
        files[name] = {"path": HEAD_FILES[name], "bytes": len(blob), "sha256": sha256_hex(blob),
                       "shape": list(arr.shape), "dtype": "<f4"}
    m.compact["head_files"] = files


def read_head(fs: Any, root: str, url: str, m: Manifest) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ``hidden`` store's head ``(weight, bias)`` as float32 tensors, each file checked against its size and sha256.

    Raises:
        ValueError: the store is not a ``hidden`` store.
        StoreError: a head file is missing, unsafe or of another size; ChecksumError: another sha256.
    """
    if m.compact is None or m.compact.get("kind") != "hidden" or not m.compact.get("head_files"):
        raise ValueError(f"{url}: only a hidden store holds an output head")
    out: list[torch.Tensor | None] = []
    for name in ("weight", "bias"):
        rec = m.compact["head_files"].get(name)
        if rec is None:
            out.append(None)
            continue
        where = f"{url.rstrip('/')}/{rec['path']}"
        if unsafe_path(rec["path"]) is not None or rec["path"] != HEAD_FILES[name]:
            raise StoreError(f"{where}: the manifest lists the head's {name} at an unexpected path; refused",
                             path=where)
        try:
            blob = fs.cat_file(join(root, rec["path"]))
        except FileNotFoundError:
            raise StoreError(f"{where}: missing (the store's output head)", path=where) from None
        if len(blob) != rec["bytes"]:
            raise StoreError(f"{where}: {len(blob)} bytes, the manifest says {rec['bytes']}", path=where)
        if sha256_hex(blob) != rec["sha256"]:
            raise ChecksumError(f"{where}: sha256 does not match the manifest (corrupt or altered head)", path=where,
                                expected=rec["sha256"], found=sha256_hex(blob))
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
        out.append(torch.from_numpy(np.array(arr, dtype=np.float32)))
    weight = out[0]
    assert weight is not None
    return weight, out[1]


def encode_compact_rows(
    logits: torch.Tensor, store: Manifest, *, hidden: Sequence[torch.Tensor] | torch.Tensor | None = None,
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None, generator: torch.Generator | None = None,
    measure: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`softtargets.precompute.contents.encode_rows` (which see), for every layer above the format."""
    entry = store.compact
    if entry is None:
        raise ValueError("this store holds dense logits; encode_rows makes compact records")
    spec = CompactSpec.from_dict(entry)
    z = logits.float() if logits.dtype != torch.float64 else logits
    if z.dim() == 2:
        z = z[:, None, :]
    z = z.mean(dim=1) if store.content == "geometric" else z
    if z.dim() == 3 and z.shape[1] == 1:
        z = z[:, 0]
    stats: dict[str, float] = {}
    if spec.kind == "topk":
        fields, stats["tail_error"] = encode_topk(z, spec, measure=measure)
    elif spec.kind == "sampled":
        fields = encode_sampled(z, spec, generator)
    else:
        if hidden is None:
            raise ValueError("a hidden store needs the teachers' head inputs (hidden=...)")
        hs = list(hidden.unbind(1)) if isinstance(hidden, torch.Tensor) else list(hidden)
        h = torch.cat(hs, dim=-1) if store.content == "geometric" else torch.stack(hs, dim=1)
        if h.dim() == 3 and h.shape[1] == 1:
            h = h[:, 0]
        fields = encode_hidden(h, spec)
        if head is not None:
            recon = head_logits(decode_hidden(fields), head[0].to(z.device), None if head[1] is None
                                else head[1].to(z.device))
            stats["logit_error"] = float((recon - z.reshape(recon.shape)).abs().max()) if z.numel() else 0.0
    return pack_record(fields, entry["fields"]), stats
