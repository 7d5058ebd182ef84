"""Image augmentations with explicit parameters: a view is drawn once (``aug(x, rng) -> (x_view, params)``) and
rebuilt anywhere from its parameters (``aug.replay(x, params)``). Pure torch; torchvision is not needed.

:class:`RandomView` is a random resized crop, a horizontal flip and a small affine (rotation, translation),
composed into one affine map and sampled once (``torch.nn.functional.grid_sample``, bilinear, zeros outside).
Coordinates are torch's normalised ones: ``[-1, 1]`` across the image, ``x`` to the right, ``y`` down.

For an output pixel at ``u`` (normalised), the input is sampled at ``c + S F (R(angle) u + t)``: ``R`` the
rotation by ``angle`` degrees, ``t = (tx, ty)``, ``F`` the flip (``x -> -x`` when ``flip = 1``), ``S`` the crop's
half-sizes ``diag(crop_w, crop_h)`` (fractions of the image) and ``c = (crop_x, crop_y)`` its centre.

Parameters (only those of the parts in use are drawn and stored): ``crop_x``, ``crop_y``, ``crop_w``,
``crop_h``, ``flip`` (uint8 0/1), ``angle`` (degrees), ``tx``, ``ty`` (normalised units: 2 = the image's width).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["RandomView"]

_FLOAT = ("float32", "float16")


class RandomView:
    """Random resized crop + horizontal flip + small rotation and translation, with explicit parameters.

    Args:
        scale: the crop's area as a fraction of the image, drawn uniformly in this range; ``(1, 1)`` (and
            ``ratio=(1, 1)``): no crop.
        ratio: the crop's aspect ratio (width / height), drawn log-uniformly in this range.
        flip: probability of a horizontal flip.
        degrees: rotation drawn uniformly in ``[-degrees, degrees]``.
        translate: shift drawn uniformly in ``[-translate, translate]`` of the image's size, per axis.
        size: output ``(H, W)``; default the input's.
        shape: the image shape ``(C, H, W)`` of flat inputs (e.g. ``(1, 8, 8)`` for 64 features): they are viewed
            as images and the views flattened back.
        param_dtype: ``float32`` or ``float16``: the stored dtype of the real-valued parameters. Values are
            drawn, then rounded to it, then applied: the stored parameters rebuild the view exactly.

    Inputs: ``[C, H, W]`` (one image, or ``shape``'s flat ``[C*H*W]``) for ``__call__``; ``[B, C, H, W]`` (or
    ``[B, C*H*W]``) or one image for :meth:`replay`, with parameters as numbers, or numpy arrays or tensors ``[B]``.
    """

    def __init__(self, scale: tuple[float, float] = (1.0, 1.0), ratio: tuple[float, float] = (1.0, 1.0),
                 flip: float = 0.0, degrees: float = 0.0, translate: float = 0.0, size: Sequence[int] | None = None,
                 shape: Sequence[int] | None = None, param_dtype: str = "float32") -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        if param_dtype not in _FLOAT:
            raise ValueError(f"param_dtype must be one of {list(_FLOAT)}, got {param_dtype!r}")
        self.scale, self.ratio, self.flip = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1])), \
            float(flip)
        self.degrees, self.translate = float(degrees), float(translate)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self.param_dtype = param_dtype
        self.crops = self.scale != (1.0, 1.0) or self.ratio != (1.0, 1.0)
        names = (["crop_x", "crop_y", "crop_w", "crop_h"] if self.crops else []) + (["flip"] if self.flip else []) \
            + (["angle"] if self.degrees else []) + (["tx", "ty"] if self.translate else [])
        #: name -> stored dtype, read by ``precompute(views=..., augment=...)`` for the manifest.
        self.param_dtypes = {n: "uint8" if n == "flip" else param_dtype for n in names}

    def __repr__(self) -> str:
        return (f"RandomView(scale={self.scale}, ratio={self.ratio}, flip={self.flip}, degrees={self.degrees}, "
                f"translate={self.translate}, size={self.size}, shape={self.shape}, param_dtype={self.param_dtype!r})")

    def _round(self, v: float) -> float:
        return float(np.dtype(self.param_dtype).type(v))

    def sample(self, rng: torch.Generator) -> dict[str, float | int]:
        """One view's parameters, every random choice drawn from ``rng`` (one draw of 7 uniforms; values exact in
        the stored dtypes)."""
        u = torch.rand(7, generator=rng, dtype=torch.float64).tolist()
        out: dict[str, float | int] = {}
        if self.crops:
            area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
            log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[1]
            w = self._round(min(1.0, math.sqrt(area * math.exp(log_r))))
            h = self._round(min(1.0, math.sqrt(area / math.exp(log_r))))
            out["crop_x"] = self._round((1 - w) * (2 * u[2] - 1))
            out["crop_y"] = self._round((1 - h) * (2 * u[3] - 1))
            out["crop_w"], out["crop_h"] = w, h
        if self.flip:
            out["flip"] = int(u[4] < self.flip)
        if self.degrees:
            out["angle"] = self._round(self.degrees * (2 * u[5] - 1))
        if self.translate:
            v = torch.rand(2, generator=rng, dtype=torch.float64).tolist()
            out["tx"] = self._round(2 * self.translate * (2 * v[0] - 1))
            out["ty"] = self._round(2 * self.translate * (2 * v[1] - 1))
        return out

    def sample_batch(self, n: int, rng: torch.Generator) -> dict[str, torch.Tensor]:
        """Parameters of ``n`` fresh random views at once, ``{name: tensor [n]}`` (for augmenting a batch online:
        ``replay(x, sample_batch(len(x), rng))``). Drawn as :meth:`sample` draws one, from other random numbers."""
        u = torch.rand(n, 9, generator=rng, dtype=torch.float64).numpy()
        out: dict[str, np.ndarray] = {}
        real = np.dtype(self.param_dtype)
        if self.crops:
            area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
            log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
            w = np.minimum(1.0, np.sqrt(area * np.exp(log_r))).astype(real).astype(np.float64)
            h = np.minimum(1.0, np.sqrt(area / np.exp(log_r))).astype(real).astype(np.float64)
            out["crop_x"], out["crop_y"] = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)
            out["crop_w"], out["crop_h"] = w, h
        if self.flip:
            out["flip"] = (u[:, 4] < self.flip).astype(np.uint8)
        if self.degrees:
            out["angle"] = self.degrees * (2 * u[:, 5] - 1)
        if self.translate:
            out["tx"], out["ty"] = (2 * self.translate * (2 * u[:, 6:8] - 1)).T
        return {k: torch.from_numpy(np.ascontiguousarray(v.astype(self.param_dtypes[k]))) for k, v in out.items()}

    def __call__(self, x: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float | int]]:
        """A random view of one input ``x`` and its parameters."""
        params = self.sample(rng)
        return self.replay(x, params), params

    def theta(self, params: Mapping[str, Any], batch: int) -> torch.Tensor:
        """The affine maps ``[B, 2, 3]`` float32 (output to input, normalised coordinates) of ``params``, computed
        in float64 with numpy (one path for one view and for a batch) and rounded once."""
        def get(name: str, default: float) -> np.ndarray | float:
            v = params.get(name)
            if v is None:
                return default
            return (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(np.float64).reshape(-1)

        a = np.deg2rad(get("angle", 0.0))
        cos, sin = np.cos(a), np.sin(a)
        fx = 1 - 2 * get("flip", 0.0)
        sw, sh = get("crop_w", 1.0), get("crop_h", 1.0)
        cx, cy = get("crop_x", 0.0), get("crop_y", 0.0)
        tx, ty = get("tx", 0.0), get("ty", 0.0)
        out = np.empty((batch, 2, 3), np.float64)  # each entry broadcast from a number or a [B] array
        out[:, 0, 0], out[:, 0, 1], out[:, 0, 2] = sw * fx * cos, -sw * fx * sin, sw * fx * tx + cx
        out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = sh * sin, sh * cos, sh * ty + cy
        return torch.from_numpy(out.astype(np.float32))

    def replay(self, x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """The views of ``x`` (one input, or a batch ``[B, ...]``) with parameters ``params`` (numbers, or
        numpy arrays or tensors ``[B]``): the same values as the call that drew them."""
        flat = self.shape is not None and x.dim() in (1, 2)
        single = x.dim() == (1 if flat else 3)
        batch = x.reshape(1, *x.shape) if single else x
        if flat:
            assert self.shape is not None
            batch = batch.reshape(len(batch), *self.shape)
        if batch.dim() != 4:
            raise ValueError(f"RandomView takes images [C, H, W] or [B, C, H, W] (or flat ones with shape=); got "
                             f"{tuple(x.shape)}")
        b, c, h, w = batch.shape
        size = self.size or (h, w)
        grid = F.affine_grid(self.theta(params, b), [b, c, *size], align_corners=False)
        out = F.grid_sample(batch.to(torch.float32), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False).to(x.dtype)
        if flat:
            out = out.reshape(b, -1)
        return out[0] if single else out
