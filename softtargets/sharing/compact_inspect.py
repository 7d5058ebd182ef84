"""What a compact store's rows cost and hold: bytes per row, and the tail's mass by temperature.

``topk``: the mean and largest mass outside the stored top k at each temperature (from the stored tail
log-partition; temperatures outside the store's range are extrapolated and marked). ``sampled``: distinct ids
per row, and the mass they cover at each temperature. ``hidden`` stores are inspected as dense logits
(``h W^T + b``) by :func:`softtargets.sharing.inspect.target_stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..math.compact_losses import sampled_weights, topk_log_probs
from ..store import TargetStore
from ..store.compact_rows import compact_spec_of, unpack_rows


def compact_facts(store: TargetStore) -> dict[str, Any]:
    """The manifest's ``compact`` entry, summarised: kind, bytes per row, range, measured errors."""
    m = store.manifest
    c = m.compact or {}
    return {"kind": c.get("kind"), "row_bytes": c.get("row_bytes"), "k": c.get("k"),
            "temperatures": c.get("temperatures"), "temperature_range": c.get("temperature_range"),
            "tail_error": c.get("tail_error"), "logit_error": c.get("logit_error"),
            "quantization": c.get("quantization") if c.get("kind") == "hidden" else None,
            "hidden_size": c.get("hidden_size"),
            "dense_float16_bytes": 2 * m.num_classes * (m.num_teachers if m.per_teacher else 1)}


def compact_stats(store: TargetStore, *, limit: int | None, temperatures: Sequence[float],
                  progress: bool | None = None) -> dict[str, Any]:
    """Tail mass (``topk``) or covered mass (``sampled``) at each temperature, mean and largest over rows."""
    m = store.manifest
    spec = compact_spec_of(m)
    lo, hi = spec.temperature_range
    temps = sorted({float(t) for t in temperatures})
    n = len(store) if limit is None else min(int(limit), len(store))
    sums = torch.zeros(len(temps), dtype=torch.float64)
    worst = torch.zeros(len(temps), dtype=torch.float64)
    distinct = 0.0
    rows = 0
    for shard in tqdm(store.shards, desc="inspect", unit="shard", disable=None if progress is None else not progress):
        if shard.start >= n:
            break
        f = unpack_rows(m, store.rows(shard.start, min(shard.stop, n))["logits"])
        rows += len(f["ids"])
        for j, t in enumerate(temps):
            if spec.kind == "topk":
                _, lp_tail = topk_log_probs(f, spec, t, approximate=True)
                mass = lp_tail.exp()
            else:
                _, lp = sampled_weights(f, spec, t, approximate=True)
                mass = torch.where(f["counts"] > 0, lp.exp(), torch.zeros_like(lp)).sum(-1)
            mass = mass.reshape(len(f["ids"]), -1).mean(-1) if mass.dim() > 1 else mass
            sums[j] += mass.sum()
            worst[j] = max(float(worst[j]), float(mass.max())) if mass.numel() else worst[j]
        if spec.kind == "sampled":
            distinct += float((f["counts"] > 0).sum(-1).double().mean(-1).sum() if f["counts"].dim() > 2
                              else (f["counts"] > 0).sum(-1).double().sum())
    what = "tail_mass" if spec.kind == "topk" else "covered_mass"
    out: dict[str, Any] = {
        "rows": rows, "temperatures": temps, "exact": [lo - 1e-12 <= t <= hi + 1e-12 for t in temps],
        what: {"mean": (sums / max(rows, 1)).tolist(), "max": worst.tolist()}, "limit": limit,
    }
    if spec.kind == "sampled":
        out["distinct_ids_per_row"] = distinct / max(rows, 1)
    return out


def format_compact(r: dict[str, Any]) -> list[str]:
    """Report lines for a compact store."""
    c = r["compact"]
    lines = [f"compact       {c['kind']}: {c['row_bytes']} bytes/row (dense float16: {c['dense_float16_bytes']})"
             + (f", k = {c['k']}" if c["kind"] != "hidden" else f", d = {c['hidden_size']} {c['quantization']}")]
    if c["kind"] != "hidden":
        t_lo, t_hi = c["temperature_range"]
        grid = ", ".join(f"{t:g}" for t in c["temperatures"])
        lines.append(f"              temperatures {t_lo:g}..{t_hi:g} (grid {grid})"
                     + (f", tail log-partition error <= {c['tail_error']:.2g} nats" if c["tail_error"] is not None
                        else ""))
    elif c["logit_error"] is not None:
        lines.append(f"              largest logit error |h W^T + b - logits| = {c['logit_error']:.3g}")
    st = r.get("compact_stats")
    if st and st["rows"]:
        what = "tail_mass" if "tail_mass" in st else "covered_mass"
        label = "mass outside top-k" if what == "tail_mass" else "mass of sampled ids"
        lines.append(f"  {label} over {st['rows']} rows" + (" (~ extrapolated)" if not all(st["exact"]) else ""))
        lines.append("    " + f"{'T':<8}" + "".join(f"{t:>9g}" for t in st["temperatures"]))
        for key in ("mean", "max"):
            lines.append("    " + f"{key:<8}" + "".join(
                f"{('' if e else '~') + format(v, '.4f'):>9}" for e, v in zip(st["exact"], st[what][key], strict=True)))
        if "distinct_ids_per_row" in st:
            lines.append(f"  distinct sampled ids per row: {st['distinct_ids_per_row']:.1f}")
    return lines
