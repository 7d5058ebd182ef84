"""Stage two's side of the arrays a store holds beside its logits (FitNets hints, specialists' logits, eq. 5's
combination): rows joined to each batch by its ``index``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..store import TargetStore
from ..store.sidecars import SidecarReader


class ArrayJoin:
    """``join(index) -> {name: [B, D] tensor}`` for the arrays ``names`` of ``store`` (stored dtype).

    Raises:
        KeyError: a name the store does not declare (the message lists those it does).
    """

    def __init__(self, store: TargetStore, names: Sequence[str]) -> None:
        self.reader = SidecarReader(store)
        self.names = list(names)
        for name in self.names:
            self.reader.record(name)

    def __call__(self, index: Any) -> dict[str, torch.Tensor]:
        idx = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64)
        return {name: torch.from_numpy(self.reader.take(name, idx)) for name in self.names}
