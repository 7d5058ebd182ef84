"""The digits views pipeline's report: ``results.md`` (the table) and ``test_error_vs_views.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_NAME = "test_error_vs_views.png"
LABELS = {"hard": "(d) hard labels", "clean": "(a) clean targets, one per sample", "online": "(c) online teachers"}


def label(variant: str) -> str:
    return LABELS.get(variant) or f"(b) replayed views, V = {variant.removeprefix('views')}"


def table(results: dict[str, Any]) -> str:
    cfg, summary, stores, gaps = results["config"], results["summary"], results["stores"], results["gaps"]
    n_test, env = results["split"]["sizes"]["test"], results["environment"]
    a, s = cfg["augment"], cfg["student"]
    seeds = s["seeds"]
    lines = [
        "# Replayed views on scikit-learn digits",
        "",
        f"{results['split']['sizes']['train']} train / {results['split']['sizes']['val']} val / {n_test} test images. "
        f"Augmentation everywhere (teachers and students): random resized crop (area {a['scale']}, "
        f"ratio {a['ratio']}), "
        f"rotation ±{a['degrees']:g}°, shift ±{a['translate']:g} of the image. Teachers: "
        f"{len(cfg['teacher']['seeds'])} x MLP {tuple(cfg['teacher']['hidden'])} with dropout, test errors "
        f"{results['teachers']['test_errors']}, geometric ensemble "
        f"{results['teachers']['ensemble_test_errors']}. "
        f"Students: MLP {tuple(s['hidden'])}, {s['epochs']} epochs, T = {s['temperature']:g}, α = {s['alpha']:g}, "
        f"geometric rule; mean ± std over seeds {seeds}; test errors on the clean test images. "
        f"{results['layout']} stores; machine {env['machine']} ({env['cpus']} torch threads"
        + (f", {env['cores']} cores" if "cores" in env else "") + f"), commit {env['commit']}"
        + (", load average {:.2f} -> {:.2f} over the students".format(*env["load_average_students"])
           if "load_average_students" in env else "") + ".",
        "",
        f"| student | test errors (of {n_test}) | val errors | wall s / epoch | vs online | gap closed | bytes / view "
        "(targets + params) | bytes / view on disk |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    online = summary["online"]["seconds_per_epoch"]
    for variant, row in summary.items():
        store = stores.get(variant)
        payload = "–" if store is None else (f"{store['bytes_per_view_payload']} ({store['payload_target_bytes']} + "
                                             f"{store['payload_params_bytes']})")
        disk = "–" if store is None else f"{store['bytes_per_view_total']:.1f}"
        g = gaps.get(variant)
        closed = "–" if not g or g["gap_closed"] is None else f"{100 * g['gap_closed']:.0f} %"
        lines.append(f"| {label(variant)} | {row['test_errors_mean']:.2f} ± {row['test_errors_std']:.2f} | "
                     f"{row['val_errors_mean']:.2f} | {row['seconds_per_epoch']:.4f} | "
                     f"{row['seconds_per_epoch'] / online:.3f} | {closed} | {payload} | {disk} |")
    lines += [
        "",
        f"Gap (a) - (c): {gaps['gap_errors']:.2f} test errors. ml-dr stores ≈ {results['ml_dr_bytes_per_view']} B "
        "per view (parameters + top-10 probabilities, ImageNet+). Bytes on disk include each row's int64 label, its "
        "key and the files' framing; the payload is the stored targets and parameters alone.",
        "",
        "Precompute: " + ", ".join(f"{k} {v['precompute_seconds']:.1f} s ({v['rows']} rows)" for k, v in stores.items())
        + ". Stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in results["timings"].items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> Path:
    """Test errors against V (log axis), the other variants as horizontal bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    views = [int(v) for v in results["config"]["store"]["views"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.errorbar(views, [summary[f"views{v}"]["test_errors_mean"] for v in views],
                yerr=[summary[f"views{v}"]["test_errors_std"] for v in views], marker="o", capsize=3,
                label="(b) replayed views")
    for variant, color, style in (("clean", "tab:red", "--"), ("online", "black", "-."), ("hard", "tab:gray", ":")):
        m, sd = summary[variant]["test_errors_mean"], summary[variant]["test_errors_std"]
        ax.axhline(m, color=color, linestyle=style, label=f"{label(variant)} ({m:.1f})")
        ax.axhspan(m - sd, m + sd, color=color, alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_xticks(views, [str(v) for v in views])
    ax.minorticks_off()
    ax.set_xlabel("stored views per sample V")
    ax.set_ylabel(f"test errors (of {results['split']['sizes']['test']})")
    ax.set_title("digits, students trained with augmentation: targets per replayed view", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / PLOT_NAME
    fig.savefig(path)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out: Path) -> dict[str, Path]:
    from .pipeline import write_json

    md = out / "results.md"
    md.write_text(table(results))
    return {"json": write_json(results, out), "table": md, "plot": plot(results, out)}
