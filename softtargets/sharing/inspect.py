"""What a store holds and what its targets look like.

:func:`describe` reads the manifest only: samples, classes, content, teachers and their
fingerprints, dtype, layout, size, transfer set, provenance, lineage. :func:`target_stats`
streams the rows shard by shard (memory: one shard) and accumulates, where labels exist,
each teacher's and the ensemble's top-1 accuracy and the teachers' agreement, the mean
entropy of the ensemble targets at several temperatures, and a histogram of top-1
confidence at T = 1 (at T0 for an arithmetic store).

Ensemble rules by content: per_teacher stores give both ``geometric`` and ``arithmetic``
(exact at every T); a geometric store gives ``geometric``; an arithmetic store gives
``arithmetic``, exact only at its T0 (other temperatures re-temper it, marked inexact).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..choices import Rule
from ..math.compact import decode_hidden, head_logits
from ..math.temperature import ensemble_log_probs
from ..store import BYTES_PER_DTYPE, TargetStore, open_targets
from ..store.compact_rows import unpack_rows
from ..text import plural
from .compact_inspect import compact_facts, compact_stats, format_compact

DEFAULT_TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
CONFIDENCE_BINS = 20


def describe(store: TargetStore) -> dict[str, Any]:
    """The manifest's facts about ``store`` as a JSON-able dict (no data read)."""
    m = store.manifest
    labeled = sum(s.labeled for s in m.shards)
    logit_bytes = BYTES_PER_DTYPE[m.dtype] * m.num_classes * (m.num_teachers if m.per_teacher else 1)
    if m.compact is not None:
        logit_bytes = int(m.compact["row_bytes"])
    return {
        "url": store.url, "layout": m.layout, "sample_layout": m.sample_layout, "format_version": m.format_version,
        "num_samples": m.num_samples, "num_classes": m.num_classes, "class_names": m.class_names,
        "content": m.content, "temperature": m.temperature, "num_teachers": m.num_teachers,
        "teachers": [{"name": t["name"], "sha256": t.get("sha256"), "num_params": t.get("num_params")}
                     for t in m.teachers],
        "dtype": m.dtype, "normalization": m.normalization, "overflow": m.overflow, "clipped_values": m.clipped_values,
        "compressor": m.extra.get("compressor"), "shard_rows": m.shard_rows, "block_rows": m.block_rows,
        "num_shards": len(m.shards), "bytes": m.nbytes,
        "bytes_per_sample": m.nbytes / m.num_samples if m.num_samples else None,
        "logit_bytes_per_sample": logit_bytes, "labeled": labeled, "inputs": m.inputs,
        "transfer_set": m.transfer_set, "created": m.created, "softtargets_version": m.softtargets_version,
        "provenance": m.provenance, "lineage": m.lineage,
        **({"compact": compact_facts(store)} if m.compact is not None else {}),
    }


def rules_of(store: TargetStore) -> list[Rule]:
    """Ensemble rules the store's content serves (see the module docstring)."""
    m = store.manifest
    if m.content == "per_teacher":
        return ["geometric", "arithmetic"] if m.num_teachers > 1 else ["geometric"]
    return [m.content]


def _log_probs(x: torch.Tensor, store: TargetStore, rule: Rule, temperature: float) -> torch.Tensor:
    """Ensemble log-probabilities ``[B, C]`` (float32) of stored logits ``x`` (float32) at T."""
    m = store.manifest
    t0 = m.temperature  # always recorded for an arithmetic store
    if m.content == "arithmetic" and t0 is not None:  # stored log mean_k softmax(v_k / T0), re-tempered as read
        return torch.log_softmax(x * (t0 / temperature), dim=-1)
    return ensemble_log_probs(x, temperature, rule, per_teacher=m.per_teacher)


class _Accumulator:
    """Running sums over rows; :meth:`result` turns them into means and fractions."""

    def __init__(self, store: TargetStore, temperatures: Sequence[float], bins: int):
        m = store.manifest
        self.store, self.rules = store, rules_of(store)
        self.temperatures = sorted({float(t) for t in temperatures} | ({m.temperature} if m.temperature else set()))
        self.conf_t = (m.temperature or 1.0) if m.content == "arithmetic" else 1.0
        self.edges = np.linspace(0.0, 1.0, bins + 1)
        k = m.num_teachers if m.per_teacher else 0
        self.rows = self.labeled = 0
        self.entropy = {r: np.zeros(len(self.temperatures)) for r in self.rules}
        self.conf_counts = {r: np.zeros(bins, dtype=np.int64) for r in self.rules}
        self.conf_sum = dict.fromkeys(self.rules, 0.0)
        self.ens_correct = dict.fromkeys(self.rules, 0)
        self.teacher_correct = np.zeros(k, dtype=np.int64)
        self.teacher_entropy = np.zeros(k)
        self.pairwise = np.zeros((k, k), dtype=np.int64)
        self.with_ensemble = np.zeros(k, dtype=np.int64)
        self.all_agree = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        x = logits.to(torch.float32)
        y = labels.to(torch.int64)
        has = y >= 0
        self.rows += x.shape[0]
        self.labeled += int(has.sum())
        first_pred = None
        for r in self.rules:
            for j, t in enumerate(self.temperatures):
                lp = _log_probs(x, self.store, r, t)
                self.entropy[r][j] += float(-(lp.exp() * lp).sum(-1).double().sum())
            lp = _log_probs(x, self.store, r, self.conf_t)
            top, pred = lp.exp().max(-1)
            self.conf_counts[r] += np.histogram(top.numpy(), bins=self.edges)[0]
            self.conf_sum[r] += float(top.double().sum())
            self.ens_correct[r] += int((pred[has] == y[has]).sum())
            first_pred = pred if first_pred is None else first_pred
        if self.store.manifest.per_teacher:
            preds = x.argmax(-1)  # [B, K]
            lp1 = torch.log_softmax(x, dim=-1)
            self.teacher_entropy += (-(lp1.exp() * lp1).sum(-1)).double().sum(0).numpy()
            self.teacher_correct += (preds[has] == y[has, None]).sum(0).numpy()
            self.pairwise += (preds[:, :, None] == preds[:, None, :]).sum(0).numpy()
            if first_pred is not None:
                self.with_ensemble += (preds == first_pred[:, None]).sum(0).numpy()
            self.all_agree += int((preds == preds[:, :1]).all(-1).sum())

    def result(self) -> dict[str, Any]:
        m = self.store.manifest
        n, nl = max(self.rows, 1), self.labeled
        exact = {r: [m.content != "arithmetic" or t == m.temperature for t in self.temperatures] for r in self.rules}
        out: dict[str, Any] = {
            "rows": self.rows, "labeled": nl, "temperatures": self.temperatures, "max_entropy": math.log(m.num_classes),
            "entropy": {r: (v / n).tolist() for r, v in self.entropy.items()}, "entropy_exact": exact,
            "confidence": {"temperature": self.conf_t, "bin_edges": self.edges.tolist(),
                           "counts": {r: c.tolist() for r, c in self.conf_counts.items()},
                           "mean": {r: s / n for r, s in self.conf_sum.items()}},
            "accuracy": None, "agreement": None, "teacher_entropy": None,
        }
        if nl:
            out["accuracy"] = {"ensemble": {r: c / nl for r, c in self.ens_correct.items()},
                               "teachers": (self.teacher_correct / nl).tolist() if m.per_teacher else None}
        if m.per_teacher:
            out["teacher_entropy"] = (self.teacher_entropy / n).tolist()
            out["agreement"] = {"pairwise": (self.pairwise / n).tolist(),
                                "with_ensemble": (self.with_ensemble / n).tolist(),
                                "ensemble_rule": self.rules[0], "all": self.all_agree / n}
        return out


def target_stats(
    store: TargetStore, *, limit: int | None = None, temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    bins: int = CONFIDENCE_BINS, progress: bool | None = None,
) -> dict[str, Any]:
    """Accuracy, agreement, entropy and confidence over the first ``limit`` rows (all by default).

    Reads shard by shard; memory holds one shard. Entropies are in nats, averaged over rows.
    """
    m = store.manifest
    hidden = m.compact is not None and m.compact["kind"] == "hidden"
    acc = _Accumulator(store, temperatures, bins)
    n = len(store) if limit is None else min(int(limit), len(store))
    for shard in tqdm(store.shards, desc="inspect", unit="shard", disable=None if progress is None else not progress):
        if shard.start >= n:
            break
        rows = store.rows(shard.start, min(shard.stop, n))
        if hidden:  # the exact logits, h W^T + b
            rows["logits"] = head_logits(decode_hidden(unpack_rows(m, rows["logits"])), *store.head())
        acc.add(rows["logits"], rows["label"])
    result = acc.result()
    result["limit"] = limit
    return result


def inspect_store(
    url: str | os.PathLike[str], *, stats: bool = True, limit: int | None = None,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES, progress: bool | None = None,
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """:func:`describe` of the store at ``url``, with ``"stats"`` from :func:`target_stats` unless ``stats=False``."""
    store = open_targets(url, storage_options=storage_options)
    report = describe(store)
    m = store.manifest
    if m.compact is not None and m.compact["kind"] != "hidden":  # no full distribution: the tail by temperature
        report["stats"] = None
        report["compact_stats"] = compact_stats(store, limit=limit, temperatures=temperatures, progress=progress) \
            if stats else None
        return report
    report["stats"] = target_stats(store, limit=limit, temperatures=temperatures, progress=progress) if stats else None
    return report


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_report(r: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    names = r["class_names"]
    classes = f"{r['num_classes']}" + (f": {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}" if names else
                                        " (no names)")
    shape = "[N, K, C]" if r["content"] == "per_teacher" else "[N, C]"
    t0 = f" at T0 = {r['temperature']}" if r["content"] == "arithmetic" else ""
    ts = r["transfer_set"] or {}
    prov = r["provenance"] or {}
    versions = ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items())
    lines = [
        f"store         {r['url']}",
        f"layout        {r['layout']}{' (' + r['sample_layout'] + ' samples)' if r['sample_layout'] else ''}, "
        f"format version {r['format_version']}",
        f"samples       {r['num_samples']} in {plural(r['num_shards'], 'shard')} of up to "
        f"{plural(r['shard_rows'], 'row')} "
        f"(read unit {r['block_rows']})",
        f"classes       {classes}",
        f"content       {r['content']}{t0} {shape}, K = {plural(r['num_teachers'], 'teacher')}",
        f"dtype         {r['dtype']}, normalization {r['normalization']}, "
        f"{plural(r['clipped_values'], 'value')} clipped",
        f"size          {_size(r['bytes'])} on disk ({r['bytes']} bytes), "
        + (f"{r['bytes_per_sample']:.1f} bytes/sample ({r['logit_bytes_per_sample']} of logits)"
           if r["bytes_per_sample"] else "empty"),
        f"labels        {r['labeled']} of {plural(r['num_samples'], 'row')} labeled",
        f"transfer set  {ts.get('name', '(not recorded)')} (fingerprint {ts.get('fingerprint', '-')})",
        f"made          {r['created']} by softtargets {r['softtargets_version']}",
    ]
    if prov.get("command"):
        lines.append(f"command       {' '.join(map(str, prov['command']))}")
    if versions:
        lines.append(f"versions      {versions}")
    for e in r["lineage"]:
        srcs = ", ".join(f"{s.get('url')} (manifest sha256 {str(s.get('manifest_sha256'))[:12]})"
                         for s in e.get("sources", []))
        lines.append(f"lineage       {e.get('operation')} of {srcs} on {e.get('time')}")
    if r.get("compact"):
        lines += format_compact(r)
    st = r.get("stats")
    if st and not st["rows"]:
        st = None
        lines.append("targets       no rows to compute statistics over")
    acc = (st or {}).get("accuracy") or {}
    agree = (st or {}).get("agreement") or {}
    lines.append("teachers")
    head = f"  {'#':>2}  {'name':<20} {'sha256':<16} {'params':>12}"
    lines.append(head + ("  accuracy" if acc.get("teachers") else "") + ("  agrees w/ ens." if agree else ""))
    for i, t in enumerate(r["teachers"]):
        row = f"  {i:>2}  {t['name']:<20} {(t['sha256'] or '-')[:16]:<16} {t['num_params'] or '-':>12}"
        if acc.get("teachers"):
            row += f"  {acc['teachers'][i]:8.4f}"
        if agree:
            row += f"  {agree['with_ensemble'][i]:14.4f}"
        lines.append(row)
    if not r["teachers"]:
        lines.append("  (not recorded)")
    if st:
        limited = f" (first {plural(st['rows'], 'row')})" if st["limit"] is not None else ""
        lines.append(f"targets over {plural(st['rows'], 'row')}{limited}, {st['labeled']} labeled")
        if acc:
            lines.append("  ensemble accuracy  " + ", ".join(f"{k} {v:.4f}" for k, v in acc["ensemble"].items()))
        if agree:
            lines.append(f"  all teachers agree on top-1 in {agree['all']:.4f} of rows")
        lines.append(f"  mean entropy (nats; uniform = {st['max_entropy']:.3f})")
        lines.append("    " + f"{'T':<12}" + "".join(f"{t:>9g}" for t in st["temperatures"]))
        for rule, vals in st["entropy"].items():
            marks = ["" if e else "~" for e in st["entropy_exact"][rule]]
            lines.append("    " + f"{rule:<12}" + "".join(f"{m + format(v, '.4f'):>9}" for m, v in zip(marks, vals,
                                                                                                     strict=True)))
        if any(not e for v in st["entropy_exact"].values() for e in v):
            lines.append("    (~ re-tempered from T0: approximate)")
        conf = st["confidence"]
        lines.append(f"  top-1 confidence at T = {conf['temperature']:g}: mean "
                     + ", ".join(f"{k} {v:.4f}" for k, v in conf["mean"].items()))
    return "\n".join(lines)


def plot_report(r: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw mean entropy vs temperature and the top-1 confidence histogram to an image file.

    Needs matplotlib (``pip install 'softtargets[plot]'``) and a report with stats.
    """
    figure_cls = require_matplotlib()
    st = r.get("stats")
    if not st or not st["rows"]:
        raise ValueError("the plot needs target statistics over at least one row (and no --no-stats)")
    fig = figure_cls(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for rule, vals in st["entropy"].items():
        ax1.plot(st["temperatures"], vals, marker="o", label=rule)
    ax1.axhline(st["max_entropy"], color="grey", linestyle="--", label="uniform (log C)")
    ax1.set_xscale("log")
    ax1.set_xticks(st["temperatures"], [f"{t:g}" for t in st["temperatures"]])
    ax1.minorticks_off()
    ax1.set_xlabel("temperature T")
    ax1.set_ylabel("mean entropy (nats)")
    ax1.set_title("Target entropy vs temperature")
    ax1.legend()
    conf = st["confidence"]
    edges = np.asarray(conf["bin_edges"])
    for rule, counts in conf["counts"].items():
        ax2.stairs(counts, edges, label=rule, fill=len(conf["counts"]) == 1, alpha=0.8)
    ax2.set_xlabel(f"top-1 probability at T = {conf['temperature']:g}")
    ax2.set_ylabel("samples")
    ax2.set_title("Top-1 confidence")
    ax2.legend()
    fig.suptitle(f"{os.path.basename(str(r['url']).rstrip('/'))}: {st['rows']} rows, {r['content']}")
    fig.savefig(os.fspath(path), dpi=100)


def require_matplotlib() -> Any:
    """matplotlib's ``Figure`` class (no pyplot, no global backend), or a clear error naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plotting needs matplotlib, an optional extra: pip install 'softtargets[plot]'") from None
    return Figure
