"""Stage one's bookkeeping for compact stores: per runner, the head hooks, the sampled draws' generators and the
measured errors per shard (a side file beside the shard markers, collected into the manifest by the driver,
so shards computed in other processes count too).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

from ..store.base import MARKER_DIR, TargetWriter
from ..store.files import atomic_write, join
from ..store.manifest import Manifest
from .contents import HeadCapture, encode_rows, head_weights

STATS_SUFFIX = ".compact"  # per-shard {"tail_error": ..., "logit_error": ...} beside the shard markers


class CompactRows:
    """Encodes a runner's batches for its compact store, on the device (see :func:`encode_rows`)."""

    def __init__(self, spec: Manifest, modules: Sequence[nn.Module], device: torch.device) -> None:
        assert spec.compact is not None
        self.spec, self.device = spec, device
        self.kind = spec.compact["kind"]
        self.capture: HeadCapture | None = None
        self.head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if self.kind == "hidden":
            name = spec.compact["head"]
            self.capture = HeadCapture(modules, name)
            w, b = head_weights(modules, name, spec.content)
            self.head = (w.to(device), b.to(device))
        self._rows: dict[int, int] = {}  # rows encoded so far per shard (a batch's first row)
        self._stats: dict[int, dict[str, float]] = {}

    def generator(self, first_row: int) -> torch.Generator:
        """The draws' generator of the batch starting at row ``first_row``: the same wherever it is computed."""
        seed = int(self.spec.compact["seed"]) if self.spec.compact else 0
        return torch.Generator(device=self.device).manual_seed((seed * 1_000_003 + first_row) % (1 << 63))

    def encode_at(self, first_row: int, logits: torch.Tensor, select: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """Rows ``first_row, first_row + 1, ...`` (their teachers' logits ``[R, K, C]`` on the device) -> ``(records
        uint8 [R, row_bytes]`` on the device, measured errors). ``select``: a boolean mask picking the R rows out of
        what the heads saw (a language model's ``[B, L]`` real positions), for ``hidden``."""
        hidden = self.capture.take() if self.capture is not None else None
        if hidden is not None and select is not None:
            hidden = [h[select] for h in hidden]
        gen = self.generator(first_row) if self.kind == "sampled" else None
        return encode_rows(logits, self.spec, hidden=hidden, head=self.head, generator=gen)

    def encode(self, shard: int, logits: torch.Tensor) -> torch.Tensor:
        """A batch of ``shard`` (its teachers' logits ``[B, K, C]`` on the device, batches in row order) ->
        records ``uint8 [B, row_bytes]`` on the device; errors measured per shard."""
        first = self.spec.shard_range(shard)[0] + self._rows.get(shard, 0)
        self._rows[shard] = self._rows.get(shard, 0) + len(logits)
        records, stats = self.encode_at(first, logits)
        seen = self._stats.setdefault(shard, {})
        for key, value in stats.items():
            seen[key] = max(seen.get(key, 0.0), value)
        return records

    def close(self) -> None:
        """Remove the head hooks from the teachers (the caller's modules)."""
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    def write_stats(self, writer: TargetWriter, shard: int) -> None:
        """Record shard ``shard``'s measured errors beside its marker (once all its batches are encoded)."""
        stats = self._stats.pop(shard, {})
        self._rows.pop(shard, None)
        path = join(writer.root, f"{MARKER_DIR}/{shard:06d}{STATS_SUFFIX}")
        atomic_write(writer.fs, path, json.dumps(stats, sort_keys=True).encode(), fsync=False)


def collect_stats(writer: TargetWriter) -> None:
    """Put the largest errors the shards measured into the manifest's ``compact`` entry (before it is written)."""
    spec = writer.spec
    if spec.compact is None:
        return
    marker_dir = join(writer.root, MARKER_DIR)
    worst: dict[str, float] = {}
    if writer.fs.exists(marker_dir):
        for path in sorted(writer.fs.ls(marker_dir, detail=False)):
            if path.endswith(STATS_SUFFIX):
                for key, value in json.loads(writer.fs.cat_file(path)).items():
                    worst[key] = max(worst.get(key, 0.0), float(value))
    for key in ("tail_error", "logit_error"):
        if key in worst:
            spec.compact[key] = worst[key]
