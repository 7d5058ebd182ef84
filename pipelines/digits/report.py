"""The run's outputs: ``results.json`` (everything), ``results.md`` (the table) and ``test_error_vs_T.png``.

The table puts the test errors of this run (of 360 test images at the default split) beside
Hinton, Vinyals & Dean's (2015) MNIST figures (of 10 000 test images), as counts and as rates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Hinton et al. 2015, §3 (MNIST, 10 000 test images).
PAPER = {
    "test_images": 10000,
    "big_net": 67,  # one 2x1200 net, dropout + jitter
    "small_net": 146,  # 2x800, no regularisation, hard labels
    "distilled_T20": 74,  # the same small net, soft targets of the big net at T = 20
    "mythical_errors_before": 206,  # distilled without any 3 in the transfer set
    "mythical_digit_errors_before": 133,  # of 1010 threes
    "mythical_errors_after": 109,  # after raising the bias of 3 by 3.5
    "mythical_digit_errors_after": 14,
    "mythical_digit_rows": 1010,
    "mythical_bias_shift": 3.5,
}

TABLE_NAME, JSON_NAME, PLOT_NAME = "results.md", "results.json", "test_error_vs_T.png"


def write_json(results: dict[str, Any], out: Path) -> Path:
    """``results.json``, written to a temporary name and renamed (no half-written file on a crash)."""
    path = out / JSON_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _rate(errors: float, n: int) -> str:
    return f"{100 * errors / n:.2f} %"


def _pm(ms: dict[str, float], digits: int = 2) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def table(results: dict[str, Any]) -> str:
    """The Markdown report: the main comparison table, the mythical digit, timings."""
    cfg, split, teach, stud = results["config"], results["split"], results["teachers"], results["students"]
    n_val, n_test = split["sizes"]["val"], split["sizes"]["test"]
    p_n = PAPER["test_images"]
    seeds = stud["hard"]["seeds"]
    sel = stud["selected"]
    row = "| {} | {} | {} | {} | {} | {} |"
    lines = [
        "# Distillation on scikit-learn digits (Hinton, Vinyals & Dean 2015, §3)",
        "",
        f"Split seed {split['seed']}: {split['sizes']['train']} train (the transfer set) / {n_val} validation / "
        f"{n_test} test images. Teachers: {len(teach['seeds'])} x MLP {tuple(cfg['teacher']['hidden'])} with dropout "
        f"and ±{cfg['teacher']['jitter']} px jitter; student: MLP {tuple(cfg['student']['hidden'])}, no "
        f"regularisation. Students: mean ± std over {len(seeds)} seeds {seeds}. Distilled students learn from the "
        f"stored per-teacher logits ({results['layout']} store, {results['stores']['train']['dtype']}), no teacher "
        f"in the loop. T, alpha and the rule of the headline are chosen on validation errors; test errors are only "
        f"reported. MNIST (the paper) has {p_n} test images, so compare the rates.",
        "",
        row.format("model", f"val errors (of {n_val})", f"test errors (of {n_test})", "test error rate",
                   f"paper, MNIST errors (of {p_n})", "paper rate"),
        row.format(*["---"] * 6),
    ]
    each = ", ".join(map(str, teach["test"]))
    lines.append(row.format(f"single teacher, mean (each: {each})", f"{_mean(teach['val']):.1f}",
                            f"{_mean(teach['test']):.1f}", _rate(_mean(teach["test"]), n_test),
                            f"{PAPER['big_net']} (one big net)", _rate(PAPER["big_net"], p_n)))
    for rule in ("arithmetic", "geometric"):
        e = teach["ensemble"][rule]
        lines.append(row.format(f"teacher ensemble, {rule} mean", e["val"], e["test"], _rate(e["test"], n_test),
                                "–", "–"))
    h = stud["hard"]
    lines.append(row.format("student, hard labels", f"{_mean(h['val']):.2f}", _pm(h["test_mean_std"]),
                            _rate(h["test_mean_std"]["mean"], n_test), PAPER["small_net"],
                            _rate(PAPER["small_net"], p_n)))
    for rule, alpha in stud["per_rule_alpha"].items():
        for e in (e for e in stud["distilled"] if e["rule"] == rule and e["alpha"] == alpha):
            paper = (f"{PAPER['distilled_T20']} (T = 20)", _rate(PAPER["distilled_T20"], p_n)) if e["T"] == 20 \
                else ("–", "–")
            chosen = " **(val-chosen)**" if (rule, alpha, e["T"]) == (sel["rule"], sel["alpha"], sel["T"]) else ""
            lines.append(row.format(f"student distilled, {rule}, α = {alpha:g}, T = {e['T']:g}{chosen}",
                                    f"{e['val_mean']:.2f}", _pm(e["test_mean_std"]),
                                    _rate(e["test_mean_std"]["mean"], n_test), *paper))
    gap = stud["gap_closed"]
    ens = teach["ensemble"][sel["rule"]]["test"]
    frac = "n/a (no gap)" if gap["fraction"] is None else f"{100 * gap['fraction']:.0f} %"
    lines += [
        "",
        f"**Headline** (chosen on validation: {sel['rule']}, α = {sel['alpha']:g}, T = {sel['T']:g}): the distilled "
        f"student makes {_pm(stud['selected_test'])} test errors against {_pm(h['test_mean_std'])} for the same net "
        f"on hard labels and {ens} for the {sel['rule']} teacher ensemble: it closes {frac} of the gap "
        f"(paper: (146 - 74) / (146 - 67) = {100 * (146 - 74) / (146 - 67):.0f} % of the gap to one big net).",
    ]
    lines += mythical_table(results["mythical"])
    lines += timing_lines(results)
    return "\n".join(lines) + "\n"


def mythical_table(myth: dict[str, Any]) -> list[str]:
    d, rows, s = myth["digit"], myth["digit_test_rows"], myth["summary"]
    p = PAPER
    acc_b = 1 - p["mythical_digit_errors_before"] / p["mythical_digit_rows"]
    acc_a = 1 - p["mythical_digit_errors_after"] / p["mythical_digit_rows"]
    row = "| {} | {} | {} | {} |"
    pct = {k: {"mean": 100 * v["mean"], "std": 100 * v["std"]} for k, v in s.items() if "accuracy" in k}
    return [
        "",
        f"## The mythical digit {d}",
        "",
        f"The student distilled (same settings) from a second store whose transfer set has no {d} at all. Its "
        f"{d} logit bias is then raised by the shift that maximises validation accuracy (grid search; the paper "
        f"used +{p['mythical_bias_shift']} on MNIST). {rows} test images of {d}.",
        "",
        row.format("", f"digit {d} test accuracy", "test errors (all digits)", "paper, MNIST (3s; all errors)"),
        row.format(*["---"] * 4),
        row.format("before the bias shift", f"{_pm(pct['digit_test_accuracy_before'], 1)} %",
                   _pm(s["test_errors_before"]), f"{100 * acc_b:.1f} %; {p['mythical_errors_before']}"),
        row.format(f"after a shift of {_pm(s['bias_shift'])}", f"{_pm(pct['digit_test_accuracy_after'], 1)} %",
                   _pm(s["test_errors_after"]), f"{100 * acc_a:.1f} %; {p['mythical_errors_after']}"),
    ]


def timing_lines(results: dict[str, Any]) -> list[str]:
    t, env, cfg = results["timings"], results["environment"], results["config"]
    w = t["stage_wall_seconds"]
    nets = len(t["teachers"]) + len(t["students_hard"]) + len(t["students_distilled"]) + len(t["mythical"])
    return [
        "",
        f"Wall time {t.get('main_seconds', t['total_seconds']):.0f} s on {env['cpu_count']} CPU cores "
        f"({cfg['workers']} training process(es), {cfg['threads']} torch thread(s) each; {nets} nets): teachers "
        f"{w['teachers']:.0f} s, stage one {w['precompute']:.1f} s (both stores), students {w['students']:.0f} s, "
        f"mythical digit {w['mythical']:.0f} s.",
    ]


def write_table(results: dict[str, Any], out: Path) -> Path:
    path = out / TABLE_NAME
    path.write_text(table(results))
    return path


def plot(results: dict[str, Any], out: Path) -> Path:
    """Test errors vs T (log axis) for each rule at its validation-chosen alpha, ±std bars; the hard-label
    student and the ensembles as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stud, teach = results["students"], results["teachers"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    sel = stud["selected"]
    rules = list(stud["per_rule_alpha"].items())
    for j, (rule, alpha) in enumerate(rules):
        entries = sorted((e for e in stud["distilled"] if e["rule"] == rule and e["alpha"] == alpha),
                         key=lambda e: e["T"])
        dodge = 1.04 ** (j - (len(rules) - 1) / 2)  # side by side on the log axis
        line = ax.errorbar([e["T"] * dodge for e in entries], [e["test_mean_std"]["mean"] for e in entries],
                           yerr=[e["test_mean_std"]["std"] for e in entries], marker="o", capsize=3,
                           label=f"distilled, {rule} (α = {alpha:g})")
        if rule == sel["rule"] and alpha == sel["alpha"]:
            best = next(e for e in entries if e["T"] == sel["T"])
            ax.plot(best["T"] * dodge, best["test_mean_std"]["mean"], marker="*", markersize=16, linestyle="none",
                    color=line[0].get_color(), markeredgecolor="black", label="validation's choice")
    h = stud["hard"]["test_mean_std"]
    ax.axhline(h["mean"], color="tab:red", linestyle="--", label=f"student, hard labels ({h['mean']:.1f})")
    ax.axhspan(h["mean"] - h["std"], h["mean"] + h["std"], color="tab:red", alpha=0.1)
    styles = {"arithmetic": ":", "geometric": "-."}
    for rule, e in teach["ensemble"].items():
        ax.axhline(e["test"], color="black", linestyle=styles[rule], label=f"teacher ensemble, {rule} ({e['test']})")
    ax.set_xscale("log")
    temps = sorted({e["T"] for e in stud["distilled"]})
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.minorticks_off()
    ax.set_xlabel("temperature T")
    ax.set_ylabel(f"test errors (of {results['split']['sizes']['test']})")
    ax.set_title(f"digits: student distilled from stored logits\nval-chosen: {sel['rule']}, α = {sel['alpha']:g}, "
                 f"T = {sel['T']:g}; mean ± std over {len(stud['hard']['seeds'])} seeds", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / PLOT_NAME
    fig.savefig(path)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """All three files into ``out``; returns their paths."""
    return {"json": write_json(results, out), "table": write_table(results, out), "plot": plot(results, out)}
