"""Compact per-row contents for large vocabularies, computed on the teacher's device: ``topk`` (the k largest
logits, their ids and the tail's log-partition on a grid of temperatures), ``sampled`` (importance samples
drawn at a proposal temperature, with what re-weighting to another temperature needs) and ``hidden`` (the
teacher's last hidden state, from which ``logits = h W^T + b`` at every temperature).

A row of any of them is a fixed-width record of named fields (:func:`record_fields`), packed into bytes
(:func:`pack_record`) so that every store layout keeps it as ``uint8 [rows, row_bytes]``, and read back
with :func:`unpack_record` (or with numpy alone: ``bytes.view(numpy_record_dtype(fields))``).

The tail of a ``topk`` row at temperature ``T`` (``beta = 1 / T``) is carried by its log-partition
``f(beta) = log sum_{j not in top-k} exp(beta * (z_j - z_max))`` and its derivative ``f'(beta)`` (the tail's
expected shifted logit), stored at the grid ``temperatures``; between grid points ``f`` is interpolated by a
cubic Hermite polynomial in ``beta`` (:func:`hermite_log_partition`). The top-k probabilities are exact; the
tail mass errs by the interpolation's error, which stage one measures at the grid's midpoints and records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

CompactKind = Literal["topk", "sampled", "hidden"]
"""What a compact store's rows hold: top-k with its tail, importance samples, or hidden states."""
Quantization = Literal["float16", "int8"]
"""How a ``hidden`` store keeps its hidden states: float16, or int8 with one float32 scale per vector."""
ValueDtype = Literal["float16", "float32"]
"""The dtype of the logit values a ``topk`` or ``sampled`` row stores."""

COMPACT_KINDS: tuple[str, ...] = ("topk", "sampled", "hidden")
#: The temperatures whose tail log-partition a ``topk`` row stores by default (and ``sampled``'s grid).
DEFAULT_TEMPERATURES: tuple[float, ...] = (0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0, 8.0, 20.0)

_NP = {"float16": "<f2", "float32": "<f4", "int8": "i1", "uint8": "u1", "uint16": "<u2", "int32": "<i4"}
_TORCH = {"<f2": torch.float16, "<f4": torch.float32, "i1": torch.int8, "u1": torch.uint8, "<u2": torch.int16,
          "<i4": torch.int32}


@dataclass(frozen=True)
class CompactSpec:
    """What a compact content stores per row, and how.

    Attributes:
        kind: ``topk``, ``sampled`` or ``hidden``.
        k: ``topk``: the largest logits kept per row; ``sampled``: draws per row (ids drawn with replacement;
            distinct ids with their counts are stored, in ``k`` slots).
        temperatures: the grid of temperatures (dimensionless) at which the tail's log-partition (``topk``)
            or the full log-partition (``sampled``) and their derivatives are stored; its span is the
            temperature range the store serves exactly (up to the recorded interpolation error).
        proposal_temperature: ``sampled``: the temperature the ids are drawn at (added to the grid).
        quantization: ``hidden``: ``float16`` or ``int8`` (symmetric, one float32 scale per vector).
        value_dtype: ``topk`` / ``sampled``: the stored logit values' dtype.
        head: ``hidden``: the name of the teacher's output-head module (an ``nn.Linear``) whose input is
            captured by a forward hook, e.g. ``"lm_head"``.
        seed: ``sampled``: the draws' seed; a batch's generator is seeded from it and the batch's first row.
    """

    kind: CompactKind
    k: int = 32
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    proposal_temperature: float = 1.0
    quantization: Quantization = "float16"
    value_dtype: ValueDtype = "float16"
    head: str = "lm_head"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in COMPACT_KINDS:
            raise ValueError(f"unknown compact content {self.kind!r}; expected one of 'topk', 'sampled', 'hidden'")
        if self.kind != "hidden" and int(self.k) < 1:
            raise ValueError(f"{self.kind}: k must be >= 1, got {self.k}")
        if self.quantization not in ("float16", "int8"):
            raise ValueError(f"unknown quantization {self.quantization!r}; expected one of 'float16', 'int8'")
        if self.value_dtype not in ("float16", "float32"):
            raise ValueError(f"unknown value dtype {self.value_dtype!r}; expected one of 'float16', 'float32'")
        temps = tuple(sorted({float(t) for t in self.temperatures}
                             | ({float(self.proposal_temperature)} if self.kind == "sampled" else set())))
        if not temps or temps[0] <= 0 or not all(math.isfinite(t) for t in temps):
            raise ValueError(f"temperatures must be finite and > 0, got {self.temperatures!r}")
        object.__setattr__(self, "temperatures", temps)

    @property
    def temperature_range(self) -> tuple[float, float]:
        """``(lowest, highest)`` temperature served exactly (``hidden``: every T, ``(0, inf)``)."""
        if self.kind == "hidden":
            return (0.0, math.inf)
        return (self.temperatures[0], self.temperatures[-1])

    def betas(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The grid as inverse temperatures, ascending, float64 ``[G]``."""
        return torch.tensor([1.0 / t for t in reversed(self.temperatures)], dtype=torch.float64, device=device)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["temperatures"] = list(self.temperatures)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompactSpec:
        names = {"kind", "k", "temperatures", "proposal_temperature", "quantization", "value_dtype", "head", "seed"}
        kw = {key: d[key] for key in names if key in d}
        if "temperatures" in kw:
            kw["temperatures"] = tuple(kw["temperatures"])
        return cls(**kw)


def as_compact_spec(spec: CompactSpec | Mapping[str, Any] | str) -> CompactSpec:
    """A :class:`CompactSpec` from itself, a mapping of its fields, or a kind name (defaults)."""
    if isinstance(spec, CompactSpec):
        return spec
    if isinstance(spec, str):
        return CompactSpec(kind=spec)  # type: ignore[arg-type]  # checked in __post_init__
    return CompactSpec.from_dict(spec)


# ---------------------------------------------------------------------------------------------------
# The record: named fields packed into bytes


def id_dtype(num_classes: int) -> str:
    """The stored class-id dtype: ``uint16`` up to 65 536 classes, else ``int32``."""
    return "uint16" if num_classes <= 65536 else "int32"


def record_fields(spec: CompactSpec, num_classes: int, vectors: int = 1, hidden_size: int = 0
                  ) -> list[dict[str, Any]]:
    """The fields of one row's record, in stored order: ``{"name", "dtype" (numpy, little-endian), "shape"}``.

    Args:
        spec: the content.
        num_classes: C (chooses the id dtype).
        vectors: the distributions a row holds: K for a per-teacher store, 1 for the geometric mean.
        hidden_size: ``hidden``: d, the length of a stored hidden vector.
    """
    v, g = int(vectors), len(spec.temperatures)
    lead = [v] if v > 1 else []
    val, ids = _NP[spec.value_dtype], _NP[id_dtype(num_classes)]
    if spec.kind == "topk":
        return [{"name": "ids", "dtype": ids, "shape": [*lead, spec.k]},
                {"name": "values", "dtype": val, "shape": [*lead, spec.k]},
                {"name": "tail_logz", "dtype": "<f4", "shape": [*lead, g]},
                {"name": "tail_dlogz", "dtype": "<f4", "shape": [*lead, g]}]
    if spec.kind == "sampled":
        return [{"name": "ids", "dtype": ids, "shape": [*lead, spec.k]},
                {"name": "counts", "dtype": "<u2", "shape": [*lead, spec.k]},
                {"name": "values", "dtype": val, "shape": [*lead, spec.k]},
                {"name": "logz", "dtype": "<f4", "shape": [*lead, g]},
                {"name": "dlogz", "dtype": "<f4", "shape": [*lead, g]}]
    if hidden_size < 1:
        raise ValueError("a hidden content needs hidden_size >= 1")
    if spec.quantization == "int8":
        return [{"name": "hidden", "dtype": "i1", "shape": [*lead, hidden_size]},
                {"name": "scale", "dtype": "<f4", "shape": [*lead, 1]}]
    return [{"name": "hidden", "dtype": "<f2", "shape": [*lead, hidden_size]}]


def field_bytes(f: Mapping[str, Any]) -> int:
    return int(np.dtype(f["dtype"]).itemsize * int(np.prod(f["shape"], dtype=np.int64)))


def row_bytes(fields: Sequence[Mapping[str, Any]]) -> int:
    """Bytes of one record."""
    return sum(field_bytes(f) for f in fields)


def numpy_record_dtype(fields: Sequence[Mapping[str, Any]]) -> np.dtype[Any]:
    """The packed numpy structured dtype of a record: ``stored_bytes.view(numpy_record_dtype(fields))[:, 0]``
    gives each field by name, without softtargets."""
    return np.dtype([(f["name"], f["dtype"], tuple(f["shape"])) for f in fields])


def pack_record(arrays: Mapping[str, torch.Tensor], fields: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Fields ``[R, *shape]`` (any numeric dtype, cast to the stored one; ids as integers) -> ``uint8 [R,
    row_bytes]`` on their device, little-endian (the devices torch runs on are)."""
    parts = []
    rows = next(iter(arrays.values())).shape[0]
    for f in fields:
        x = arrays[f["name"]]
        want = _TORCH[f["dtype"]]
        if f["dtype"] == "<u2":  # unsigned 16-bit ids/counts: their low 16 bits, as int16 bits
            x = x.to(torch.int32)
            x = torch.where(x > 32767, x - 65536, x)
        parts.append(x.to(want).reshape(rows, -1).contiguous().view(torch.uint8))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def unpack_record(stored: torch.Tensor | np.ndarray, fields: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``uint8 [..., row_bytes]`` records -> ``{name: tensor [..., *shape]}``; ids and counts as int64, values in
    their stored float dtype, on the records' device."""
    t = torch.as_tensor(np.ascontiguousarray(stored)) if isinstance(stored, np.ndarray) else stored
    lead = t.shape[:-1]
    flat = t.reshape(-1, t.shape[-1])
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for f in fields:
        nb = field_bytes(f)
        raw = flat[:, offset:offset + nb].contiguous().view(_TORCH[f["dtype"]])
        if f["dtype"] == "<u2":
            raw = raw.to(torch.int64) & 0xFFFF
        elif f["dtype"] == "<i4":
            raw = raw.to(torch.int64)
        out[f["name"]] = raw.reshape(*lead, *f["shape"])
        offset += nb
    if offset != t.shape[-1]:
        raise ValueError(f"records of {t.shape[-1]} bytes do not match their fields ({offset} bytes)")
    return out


# ---------------------------------------------------------------------------------------------------
# Log-partitions on a grid, and their interpolation


def log_partition(z: torch.Tensor, betas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log sum_j exp(beta * z_j)`` and its derivative ``E_beta[z]`` over the last axis, for every beta.

    Args:
        z: ``[..., C]`` logits (float32/float64; ``-inf`` entries are left out).
        betas: ``[G]`` inverse temperatures.

    Returns:
        ``(logz, dlogz)``, each ``[..., G]`` in ``z``'s dtype (``-inf`` and 0 where every entry is ``-inf``).
    """
    finite = torch.isfinite(z)
    zf = torch.where(finite, z, torch.zeros((), dtype=z.dtype, device=z.device))
    logz, dlogz = [], []
    for b in betas.tolist():
        a = z * b
        lse = torch.logsumexp(a, dim=-1)
        w = torch.exp(a - lse.unsqueeze(-1).clamp_min(torch.finfo(z.dtype).min))
        logz.append(lse)
        dlogz.append(torch.nan_to_num((w * zf).sum(dim=-1)))
    return torch.stack(logz, dim=-1), torch.stack(dlogz, dim=-1)


def hermite_log_partition(logz: torch.Tensor, dlogz: torch.Tensor, betas: torch.Tensor, beta: float
                          ) -> torch.Tensor:
    """The log-partition at ``beta`` from its values and derivatives at the grid ``betas`` (ascending):
    cubic Hermite between grid points, exact on them; outside the grid, the tangent at the nearest end
    (a lower bound: the log-partition is convex).

    Args:
        logz: ``[..., G]``. dlogz: ``[..., G]``. betas: ``[G]``. beta: ``1 / T``.

    Returns:
        ``[...]`` in ``logz``'s dtype.
    """
    grid = betas.tolist()
    g = len(grid)
    if beta <= grid[0] or g == 1:
        return logz[..., 0] + dlogz[..., 0] * (beta - grid[0]) if beta != grid[0] else logz[..., 0]
    if beta >= grid[-1]:
        return logz[..., -1] + dlogz[..., -1] * (beta - grid[-1]) if beta != grid[-1] else logz[..., -1]
    i = max(j for j in range(g - 1) if grid[j] <= beta)
    b0, b1 = grid[i], grid[i + 1]
    if beta == b0:
        return logz[..., i]
    h = b1 - b0
    t = (beta - b0) / h
    h00, h10, h01, h11 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t, -2 * t**3 + 3 * t**2, t**3 - t**2
    return (h00 * logz[..., i] + h10 * h * dlogz[..., i] + h01 * logz[..., i + 1] + h11 * h * dlogz[..., i + 1])


def midpoint_error(z: torch.Tensor, betas: torch.Tensor, logz: torch.Tensor, dlogz: torch.Tensor) -> float:
    """The largest ``|interpolated - exact|`` log-partition (nats) of rows ``z [..., C]`` at the midpoints (in
    beta) of the grid's intervals: the interpolation's error where it is largest between two grid points."""
    grid = betas.tolist()
    worst = 0.0
    for b0, b1 in zip(grid, grid[1:], strict=False):
        mid = 0.5 * (b0 + b1)
        exact = torch.logsumexp(z * mid, dim=-1)
        approx = hermite_log_partition(logz, dlogz, betas, mid)
        ok = torch.isfinite(exact)
        if ok.any():
            worst = max(worst, float((approx - exact).abs()[ok].max()))
    return worst


# ---------------------------------------------------------------------------------------------------
# Encoding rows on the device


def encode_topk(logits: torch.Tensor, spec: CompactSpec, *, measure: bool = True
                ) -> tuple[dict[str, torch.Tensor], float]:
    """The ``topk`` fields of rows ``logits [..., C]`` (any float dtype, any device), and the measured tail
    interpolation error (nats; 0 when ``measure`` is False).

    ``ids [..., k]`` (int64, largest logit first), ``values [..., k]`` (``z - z_max``, float32),
    ``tail_logz``, ``tail_dlogz [..., G]`` (float32): the log-partition of the shifted logits outside the
    top k and its derivative at the grid ``spec.betas()``.
    """
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    c = z.shape[-1]
    if spec.k >= c:
        raise ValueError(f"topk: k={spec.k} must be smaller than the {c} classes (store them densely instead)")
    top, ids = z.topk(spec.k, dim=-1)
    zs = z - top[..., :1]
    tail = zs.scatter(-1, ids, float("-inf"))
    betas = spec.betas(z.device)
    logz, dlogz = log_partition(tail, betas.to(tail.dtype))
    err = midpoint_error(tail, betas, logz, dlogz) if measure and len(betas) > 1 else 0.0
    return {"ids": ids, "values": (top - top[..., :1]).float(), "tail_logz": logz.float(),
            "tail_dlogz": dlogz.float()}, err


def encode_sampled(logits: torch.Tensor, spec: CompactSpec, generator: torch.Generator | None = None
                   ) -> dict[str, torch.Tensor]:
    """The ``sampled`` fields of rows ``logits [..., C]``: ``k`` ids drawn with replacement from
    ``softmax(z / T0)`` (``T0 = spec.proposal_temperature``), stored as distinct ``ids [..., k]`` (int64, sorted)
    with ``counts [..., k]`` (int64; unused slots: id 0, count 0), their ``values`` ``z - z_max`` (float32), and
    the full log-partition ``logz``, ``dlogz [..., G]`` (float32) of the shifted logits at the grid."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    lead, c = z.shape[:-1], z.shape[-1]
    zs = (z - z.amax(dim=-1, keepdim=True)).reshape(-1, c)
    probs = torch.softmax(zs / spec.proposal_temperature, dim=-1)
    draws = torch.multinomial(probs, spec.k, replacement=True, generator=generator).sort(dim=-1).values
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = new.long().cumsum(dim=-1) - 1
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    betas = spec.betas(z.device)
    logz, dlogz = log_partition(zs, betas.to(zs.dtype))
    shape = (*lead, spec.k)
    return {"ids": ids.reshape(shape), "counts": counts.reshape(shape),
            "values": zs.gather(1, ids).float().reshape(shape),
            "logz": logz.float().reshape(*lead, -1), "dlogz": dlogz.float().reshape(*lead, -1)}


def encode_hidden(hidden: torch.Tensor, spec: CompactSpec) -> dict[str, torch.Tensor]:
    """The ``hidden`` fields of hidden states ``[..., d]``: float16 (refused beyond +-65504), or int8 with a
    float32 ``scale [..., 1]`` (``h ~ hidden * scale``, ``scale = max|h| / 127``)."""
    h = hidden.float()
    if not torch.isfinite(h).all():
        raise ValueError("hidden states contain NaN or Inf")
    if spec.quantization == "float16":
        if h.numel() and float(h.abs().max()) > 65504:
            raise OverflowError("hidden states exceed float16's range (|h| > 65504); use quantization='int8'")
        return {"hidden": h.half()}
    scale = (h.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    return {"hidden": torch.round(h / scale).clamp(-127, 127).to(torch.int8), "scale": scale}


def decode_hidden(fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Hidden states ``[..., d]`` float32 from a ``hidden`` row's fields."""
    h = fields["hidden"].float()
    return h * fields["scale"].float() if "scale" in fields else h


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden @ weight^T + bias``: ``[R, d] x [C, d] -> [R, C]``, or per teacher ``[R, K, d] x [K, C, d] ->
    [R, K, C]``; float32 (float64 where ``hidden`` is)."""
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h, w = hidden.to(dt), weight.to(device=hidden.device, dtype=dt)
    out = torch.einsum("rkd,kcd->rkc", h, w) if w.dim() == 3 else h @ w.T
    if bias is not None:
        out = out + bias.to(device=hidden.device, dtype=dt)
    return out
