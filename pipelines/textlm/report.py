"""The textlm pipeline's result files: ``results.json``, ``results.md`` (tables) and ``ppl_vs_bytes.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def markdown(r: dict[str, Any]) -> str:
    t = r["text"]
    lines = [
        "# textlm: language-model distillation through softtargets sequence stores", "",
        f"Text: {t['train_files']} training and {t['heldout_files']} held-out files of Python {t['python']}'s standard "
        f"library (fingerprint `{t['fingerprint'][:16]}`), byte-level BPE of {t['vocab_size']} tokens "
        f"({t['text_bytes_per_token']:.2f} text bytes/token). Transfer set: {r['transfer_tokens']} tokens. "
        f"Held-out perplexity over {t['eval_tokens']} tokens.", "",
        "| model | params | held-out perplexity | train s |", "|---|---:|---:|---:|",
    ]
    for x in r["teachers"]:
        lines.append(f"| teacher d={x['d']} L={x['layers']} seed {x['seed']} | {x['params']:,} | {x['ppl']:.1f} | "
                     f"{x['seconds']:.0f} |")
    lines.append(f"| ensemble (geometric mean) | | {r['ensemble_ppl']:.1f} | |")
    lines += ["", "| student trained on | bytes/token | store MB | stage one s | held-out perplexity | gap closed | "
              "train s |", "|---|---:|---:|---:|---:|---:|---:|"]
    stores = {s["name"]: s for s in r["stores"]}
    for s in r["students"]:
        store = stores.get(s["targets"])
        mb = f"{store['bytes'] / 1e6:.1f}" if store else "-"
        made = f"{store['seconds']:.0f}" if store else "-"
        gap = "-" if s["gap_closed"] is None else f"{100 * s['gap_closed']:.0f} %"
        lines.append(f"| {s['targets']} | {s['bytes_per_token']:.0f} | {mb} | {made} | {s['ppl']:.1f} | {gap} | "
                     f"{s['seconds']:.0f} |")
    g = r["goal"]
    verdict = "met" if g["met"] else "not met"
    best = "no compact store within it" if g["best"] is None else \
        f"best within it: {g['best']}, {100 * g['gap_closed']:.0f} %"
    lines += ["", f"Goal (a student from <= {g['bytes_per_token_max']} B/token closes >= "
              f"{100 * g['gap_closed_min']:.0f} % of the dense gain): **{verdict}** ({best})."]
    env = r["environment"]
    lines += ["", "Gap closed: the share of the dense student's gain over the hard-label student, in log perplexity. "
              f"Wall time {r['timings']['total_seconds']:.0f} s on {env['cpu_count']} CPUs "
              f"({env['torch_threads']} torch threads), torch {env['torch']}, softtargets {env['softtargets']}.", ""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(r["students"]):
        if s["bytes_per_token"]:
            ax.scatter(s["bytes_per_token"], s["ppl"])
            ax.annotate(s["targets"], (s["bytes_per_token"], s["ppl"]), xytext=(4, 6 if i % 2 else -10),
                        textcoords="offset points", fontsize=8)
    hard = next(s for s in r["students"] if s["targets"] == "hard labels")
    ax.axhline(hard["ppl"], ls="--", c="gray", label="hard labels")
    ax.axhline(r["ensemble_ppl"], ls=":", c="black", label="teacher ensemble")
    ax.axvline(r["goal"]["bytes_per_token_max"], ls="-.", c="tab:red", lw=0.8,
               label=f"{r['goal']['bytes_per_token_max']} B/token")
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per token")
    ax.set_ylabel("student held-out perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(r: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "ppl_vs_bytes.png"}
    paths["json"].write_text(json.dumps(r, indent=1) + "\n")
    paths["md"].write_text(markdown(r))
    plot(r, paths["png"])
    return paths
