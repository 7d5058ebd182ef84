"""Shared data for the target-store tests: deterministic logits and small stores written
through the public writer (real zarr groups, real tar shards), plus float64 numpy references
computed without softtargets.math.temperature."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import softtargets as st

C, K = 10, 3
LAYOUTS = ("zarr", "wds")
DTYPES = ("float32", "float16", "bfloat16")
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
TEMPERATURES = (0.5, 1.0, 2.5, 7.3, 20.0)


def teacher_logits(n: int, k: int = K, c: int = C, seed: int = 0) -> torch.Tensor:
    """float64 ``[n, k, c]``: spread ~2.5 per class plus a per-row offset ~5 (so zero-meaning matters)."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.randn(n, k, c, generator=g, dtype=torch.float64) * 2.5
    return spread + torch.randn(n, 1, 1, generator=g, dtype=torch.float64) * 5.0


def keys(n: int, start: int = 0) -> list[str]:
    return [f"sample-{i:05d}" for i in range(start, start + n)]


def suffix(layout: str) -> str:
    """The folder suffix of a store of ``layout``: ``zarr`` or ``wds``."""
    return "zarr" if layout == "zarr" else "wds"


def store_path(root: Path, layout: str, name: str = "t") -> Path:
    return root / f"{name}.{suffix(layout)}"


def write_store(
    url: str | Path, x: torch.Tensor, *, layout: str, labels: Any = None, batches: Sequence[int] | None = None,
    shard_rows: int = 32, block_rows: int = 8, **kw: Any,
) -> st.Manifest:
    """Write rows ``x`` (``[N, K, C]`` or ``[N, C]``) with keys :func:`keys`, in ``batches`` (sizes) or one go."""
    n = x.shape[0]
    num_teachers = x.shape[1] if x.dim() == 3 else 1
    kw.setdefault("num_teachers", num_teachers)
    writer = st.create_targets(
        url, num_classes=x.shape[-1], layout=layout, shard_rows=shard_rows, block_rows=block_rows, **kw
    )
    pos = 0
    for size in batches or [n]:
        lab = None if labels is None else labels[pos:pos + size]
        writer.write(keys(size, pos), x[pos:pos + size], lab)
        pos += size
    assert pos == n
    return writer.close()


def linear_teachers(
    n: int, d: int, c: int, k: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [n, d], w [d, c], logits [n, k, c])``: inputs, a linear map, and K teachers = the map + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, c, generator=g) * 2
    return x, w, torch.stack([x @ w + 0.3 * torch.randn(n, c, generator=g) for _ in range(k)], dim=1)


def write_packed(path: Path, x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, *,
                 shard_rows: int = 128) -> Path:
    """A wds ``sample`` store of float16 ``logits`` ``[N, K, C]`` with each row's input ``x[i]`` (float32
    ``[D]``) packed beside it as ``input.npy``; keys ``r0``, ``r1``, ..."""
    n, d = x.shape
    writer = st.create_targets(path, num_classes=logits.shape[-1], num_teachers=logits.shape[1], layout="wds",
                               sample_layout="sample", dtype="float16", shard_rows=shard_rows,
                               inputs={"input.npy": f"float32 [{d}]"})
    writer.write([f"r{i}" for i in range(n)], logits, labels, inputs=[{"input.npy": r.numpy()} for r in x])
    writer.close()
    return path


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (bitwise comparison; tells -0.0 from 0.0)."""
    return t.contiguous().view(BITS[t.dtype])


def softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    """float64 softmax over the last axis at temperature ``t`` (reference, without softtargets)."""
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def geometric_ref(v: np.ndarray, t: float) -> np.ndarray:
    """``softmax(mean_k(v) / T)``: ``[N, K, C]`` -> ``[N, C]`` float64."""
    return softmax(v.mean(axis=1) / t)


def arithmetic_ref(v: np.ndarray, t: float) -> np.ndarray:
    """``mean_k softmax(v_k / T)``: ``[N, K, C]`` -> ``[N, C]`` float64."""
    return softmax(v / t).mean(axis=1)


def kl(p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """Per-row ``KL(p || q)`` in nats: ``[N, C]`` -> ``[N]``."""
    return (p * (np.log(p) - log_q)).sum(axis=-1)


def flip_data_byte(path: Path) -> None:
    """Flip one byte of logits data, not of a header or index: wds, the last byte of the first
    ``logits.npy`` member; zarr (uncompressed shard: inner chunks first, index last), byte 0."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".tar":
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            info = next(i for i in tar if i.name.endswith("logits.npy"))
        pos = info.offset_data + info.size - 1  # last byte of the array data
    else:
        pos = 0
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))
