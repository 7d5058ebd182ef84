"""Logits between torch/numpy and their stored bits: zero-meaning, overflow policy, dtype.

Stored forms are numpy arrays: ``float32``, ``float16``, or for ``bfloat16`` the raw
``uint16`` bits (numpy has no bfloat16). Readers get torch tensors of the stored dtype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..choices import Dtype, Normalization, Overflow, parse_choice
from ..errors import NonFiniteLogits

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NUMPY_STORAGE: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("float32"), "float16": np.dtype("float16"), "bfloat16": np.dtype("uint16"),
}
FLOAT16_MAX = 65504.0
# Largest magnitude that survives the cast without becoming inf (round-to-nearest).
DTYPE_MAX = {
    "float32": float(torch.finfo(torch.float32).max),
    "float16": FLOAT16_MAX,
    "bfloat16": float(torch.finfo(torch.bfloat16).max),
}


def as_tensor(x: Any) -> torch.Tensor:
    """A CPU tensor from a tensor, numpy array or nested sequence (no copy where possible)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


def encode_logits(
    logits: Any, dtype: Dtype, normalization: Normalization = "zero_mean", overflow: Overflow = "error", *,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Logits ``[B, C]`` or ``[B, K, C]`` (any float dtype) -> (stored numpy array, values clipped).

    Non-finite input is always refused (:class:`NonFiniteLogits`). ``float16`` values beyond
    +-65504 (after zero-meaning) are refused (``overflow="error"``: ``OverflowError``) or clipped
    (``"clip"``), never inf.

    ``out``: a numpy array of the stored dtype and the logits' shape that receives the result
    (and is returned): it saves an allocation, the stored bits are the same. ``logits`` is not
    modified. Two passes over it (row means; the shifted values cast into place), then one over
    the stored values (their minimum and maximum), whose largest magnitude tells whether all were in
    range: only where it is at the stored dtype's limit (or NaN) are the shifted values looked at again.
    """
    parse_choice("storage dtype", dtype, Dtype)
    t = as_tensor(logits)
    if not t.is_floating_point():
        raise TypeError(f"logits must be floating point, got {t.dtype}")
    work = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    parse_choice("normalization", normalization, Normalization)
    if out is None:
        out = np.empty(tuple(work.shape), NUMPY_STORAGE[dtype])
    elif out.shape != tuple(work.shape) or out.dtype != NUMPY_STORAGE[dtype]:
        raise ValueError(f"out is {out.dtype} {out.shape}; expected {NUMPY_STORAGE[dtype]} {tuple(work.shape)}")
    target = torch.from_numpy(out)
    target = target.view(torch.bfloat16) if dtype == "bfloat16" else target
    shift = work.mean(dim=-1, keepdim=True) if normalization == "zero_mean" else None
    if shift is None:
        target.copy_(work)
    else:
        torch.sub(work, shift, out=target)  # computed in work's dtype, rounded once into the stored dtype
    if work.numel() == 0 or _largest_magnitude(target) < DTYPE_MAX[dtype]:  # NaN compares False
        return out, 0
    amax = _shifted_amax(work, shift)  # the exact largest magnitude, before rounding
    if not math.isfinite(amax):
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten()
        raise NonFiniteLogits(f"logits contain NaN or Inf in rows {bad[:10].tolist()} of this batch",
                              rows=bad[:10].tolist())
    if amax <= DTYPE_MAX[dtype]:  # values that rounded to the limit: stored as they are
        return out, 0
    if dtype != "float16" or overflow != "clip":
        hint = "store as float32/bfloat16 or pass overflow='clip'" if dtype == "float16" else "rescale them"
        raise OverflowError(
            f"logit values exceed {dtype}'s range and would overflow {dtype} to inf (|x| > {DTYPE_MAX[dtype]:g}, "
            f"largest {amax:.4g}); {hint}"
        )
    shifted = work if shift is None else work - shift
    target.copy_(shifted.clamp(-FLOAT16_MAX, FLOAT16_MAX))
    return out, int((shifted.abs() > FLOAT16_MAX).sum())


def at_limit(stored: np.ndarray) -> int:
    """Values of float16 ``stored`` logits at +-65504, float16's limit: what ``overflow="clip"`` clipped
    (and values that rounded there)."""
    return int((np.abs(stored) == FLOAT16_MAX).sum())


def _largest_magnitude(t: torch.Tensor) -> float:
    """``max |t|`` of a non-empty tensor, NaN if it holds one: one pass, no ``|t|`` temporary."""
    lo, hi = torch.aminmax(t)
    return float(torch.maximum(-lo, hi))


def _shifted_amax(work: torch.Tensor, shift: torch.Tensor | None) -> float:
    """``max |work - shift|`` without making ``work - shift``: rounding is monotone, so the largest shifted
    value is the row maximum shifted (likewise the minimum). NaN/Inf anywhere give a non-finite result."""
    if work.numel() == 0:
        return 0.0
    if shift is None:
        return _largest_magnitude(work)
    lo, hi = work.amin(dim=-1, keepdim=True), work.amax(dim=-1, keepdim=True)  # aminmax(dim=) is the slower path
    top, bottom = float((hi - shift).max()), float((shift - lo).max())
    return max(top, bottom) if math.isfinite(top) and math.isfinite(bottom) else math.inf


def decode_logits(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored numpy array -> tensor of the stored dtype (bitwise; bfloat16 from its uint16 bits)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(stored))


def encode_labels(labels: Any, rows: int) -> np.ndarray:
    """Labels ``[B]`` -> int64 numpy, ``-1`` for unlabeled; ``None`` means all unlabeled."""
    if labels is None:
        return np.full(rows, -1, dtype=np.int64)
    out = as_tensor(labels).to(torch.int64).numpy().reshape(-1)
    if out.shape[0] != rows:
        raise ValueError(f"got {out.shape[0]} labels for {rows} logit rows")
    return out


def encode_keys(keys: Any, rows: int) -> np.ndarray:
    """Sample keys ``[B]`` -> numpy unicode array; refuses empty keys and a wrong count."""
    arr = np.asarray(list(map(str, keys)), dtype=str)
    if arr.shape != (rows,):
        raise ValueError(f"got {arr.size} keys for {rows} logit rows")
    if rows and (np.char.str_len(arr) == 0).any():
        raise ValueError("sample keys must be non-empty strings")
    return arr
