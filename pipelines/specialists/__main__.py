"""``python -m pipelines.specialists``: generalist + specialists (Hinton et al. 2015, §5) and FitNets hints on
scikit-learn's digits, through softtargets' stores.

Per seed: a small generalist is trained; ``st.plan_specialists`` picks M confusable subsets of S digits from
its stored predictions; each specialist starts from the generalist's weights and trains on half-subset,
half-other batches (``st.SpecialistBatches``); ``st.precompute`` stores the generalist's logits, each
specialist's logits (dustbin corrected by the log of its oversampling factor), eq. 5's ``log q`` and the
generalist's hidden layer (a hint) for the transfer set (train split) and the test split. Then:

1. test accuracy of the generalist alone vs eq. 5's q, by the number of specialists covering the true class
   (the paper's Table 4 form);
2. a student distilled from eq. 5's q vs one distilled from the generalist alone (same T, alpha, epochs);
3. a thin deep student trained with FitNets' two stages (hint pre-training of its lower layers through a
   regressor, then KD) vs the same student by KD alone.

Writes ``results.json``, ``results.md`` and ``specialists.png`` into ``--out`` (default runs/specialists).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import softtargets as st
from pipelines.digits.data import NUM_CLASSES, DigitsRows, load_split
from pipelines.digits.models import MLP

FULL: dict[str, Any] = {
    "seeds": [0, 1, 2], "specialists": 3, "size": 4, "top": 2,
    "generalist": {"hidden": [24], "epochs": 25, "lr": 3e-3},
    "specialist": {"epochs": 12, "lr": 1e-3, "batch_size": 32},
    "student": {"hidden": [24], "epochs": 40, "lr": 3e-3, "temperature": 2.0, "alpha": 0.7},
    "thin": {"hidden": [12, 12, 12, 12, 12], "guided": 2, "hint_epochs": 30, "epochs": 40, "lr": 3e-3},
}
QUICK: dict[str, Any] = {
    **FULL, "seeds": [0],
    "generalist": {**FULL["generalist"], "epochs": 4}, "specialist": {**FULL["specialist"], "epochs": 1},
    "student": {**FULL["student"], "epochs": 1}, "thin": {**FULL["thin"], "hint_epochs": 1, "epochs": 1},
}


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def _train_specialist(gen: nn.Module, classes: list[int], split: Any, cfg: dict[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    spec = st.specialist_from_generalist(gen, classes)
    batches = st.SpecialistBatches(split.y_train, classes, cfg["batch_size"], seed=seed)
    opt = torch.optim.Adam(spec.parameters(), lr=cfg["lr"])
    spec.train()
    for epoch in range(cfg["epochs"]):
        batches.set_epoch(epoch)
        for idx in batches:
            loss = F.cross_entropy(spec(split.x_train[idx]), st.specialist_labels(split.y_train[idx], classes))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return spec.eval()


def _distil(student: nn.Module, store: Path, data: DigitsRows, target: str, cfg: dict[str, Any], seed: int,
            epochs: int | None = None, params: Sequence[nn.Parameter] | None = None,
            hint: tuple[nn.Module, nn.Module] | None = None) -> nn.Module:
    """Train ``student`` from the store: KD on ``target`` (``"generalist"``: the stored logits; ``"combined"``:
    eq. 5's log q), or, with ``hint=(lower layers, regressor)``, FitNets' hint loss alone."""
    arrays = ["combined"] if target == "combined" else (["hint/hidden"] if hint else [])
    ds = st.stream(store, batch_size=64, seed=seed, dataset=data, arrays=arrays)
    opt = torch.optim.Adam(params if params is not None else student.parameters(), lr=cfg["lr"])
    student.train()
    for epoch in range(epochs if epochs is not None else cfg["epochs"]):
        ds.set_epoch(epoch)
        for batch in ds.loader():
            x = batch["input"]
            if hint is not None:
                lower, regressor = hint
                loss = st.hint_loss(lower(x), batch["hint/hidden"], regressor)
            else:
                teacher = batch["combined"] if target == "combined" else batch["teacher_logits"]
                loss = st.distillation_loss(student(x), teacher, batch["label"], temperature=cfg["temperature"],
                                            alpha=cfg["alpha"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student.eval()


def run_seed(seed: int, cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    split = load_split(seed)
    train_rows, test_rows = DigitsRows(split.idx_train, "digits-train"), DigitsRows(split.idx_test, "digits-test")
    torch.manual_seed(seed)
    gen = _fit(MLP(cfg["generalist"]["hidden"]), split.x_train, split.y_train, cfg["generalist"]["epochs"],
               cfg["generalist"]["lr"], seed)
    plain = out / f"seed{seed}" / "generalist.zarr"
    kw = {"num_workers": 0, "progress": False, "overwrite": True, "device": "cpu"}
    st.precompute([{"name": "generalist", "module": gen}], train_rows, plain, **kw)
    plan = st.plan_specialists(plain, specialists=cfg["specialists"], size=cfg["size"], seed=seed)
    entries = []
    for i, subset in enumerate(plan["subsets"]):
        classes = subset["classes"]
        share = float(np.isin(split.y_train.numpy(), classes).mean())
        spec = _train_specialist(gen, classes, split, cfg["specialist"], seed * 100 + i)
        entries.append({"name": f"s{i}", "module": spec, "classes": classes,
                        "oversample": st.oversampling_factor(share)})
    teachers = [{"name": "generalist", "module": gen}, *entries]
    train_store, test_store = out / f"seed{seed}" / "train.zarr", out / f"seed{seed}" / "test.zarr"
    st.precompute(teachers, train_rows, train_store, specialist_top=cfg["top"], hints={"hidden": "generalist:net.1"},
                  **kw)
    m = st.precompute(teachers, test_rows, test_store, specialist_top=cfg["top"], **kw)
    # 1. Table 4 form, on the test split
    test = st.open_targets(test_store)
    g_logits = test.take(np.arange(len(test)))["logits"].float()[:, 0]
    log_q = torch.from_numpy(st.read_array(test, "combined"))
    y = split.y_test
    covering = torch.tensor([sum(int(c) in s["classes"] for s in plan["subsets"]) for c in y.tolist()])
    by_cover = {}
    for k in range(len(plan["subsets"]) + 1):
        sel = covering == k
        if int(sel.sum()):
            by_cover[k] = {"examples": int(sel.sum()),
                           "generalist_correct": int((g_logits[sel].argmax(1) == y[sel]).sum()),
                           "combined_correct": int((log_q[sel].argmax(1) == y[sel]).sum())}
    # 2. students from eq. 5's q vs from the generalist alone
    s_cfg = cfg["student"]
    students = {}
    for target in ("generalist", "combined"):
        torch.manual_seed(seed + 7)
        model = _distil(MLP(s_cfg["hidden"]), train_store, train_rows, target, s_cfg, seed)
        with torch.no_grad():
            students[target] = _accuracy(model(split.x_test), y)
    # 3. a thin deep student with and without hints
    t_cfg = {**cfg["thin"], "temperature": s_cfg["temperature"], "alpha": s_cfg["alpha"]}
    thin = {}
    for hinted in (False, True):
        torch.manual_seed(seed + 11)
        model = MLP(t_cfg["hidden"])
        if hinted:
            lower = model.net[:2 * t_cfg["guided"]]  # the first `guided` Linear+ReLU blocks
            regressor = nn.Linear(t_cfg["hidden"][t_cfg["guided"] - 1], cfg["generalist"]["hidden"][0])
            _distil(model, train_store, train_rows, "generalist", t_cfg, seed, epochs=t_cfg["hint_epochs"],
                    params=[*lower.parameters(), *regressor.parameters()], hint=(lower, regressor))
        model = _distil(model, train_store, train_rows, "generalist", t_cfg, seed)
        with torch.no_grad():
            thin["hints" if hinted else "kd_only"] = _accuracy(model(split.x_test), y)
    with torch.no_grad():
        spec_acc = {e["name"]: _accuracy(e["module"](split.x_test[np.isin(y.numpy(), e["classes"])]),
                                         st.specialist_labels(y[np.isin(y.numpy(), e["classes"])], e["classes"]))
                    for e in entries}
    return {
        "seed": seed, "plan": plan["subsets"], "test_examples": len(y),
        "generalist_accuracy": _accuracy(g_logits, y), "combined_accuracy": _accuracy(log_q, y),
        "by_covering": by_cover, "specialist_accuracy_on_own_classes": spec_acc,
        "oversample": {e["name"]: e["oversample"] for e in entries},
        "solver": {k: m.specialists["combined"][k] for k in ("solver", "tol", "max_residual", "iterations")},
        "students": students, "thin_students": thin,
    }


def _mean_std(values: Sequence[float]) -> str:
    a = np.asarray(values, dtype=float) * 100
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f} %" if len(a) > 1 else f"{a.mean():.2f} %"


def report(results: dict[str, Any], out: Path) -> None:
    runs = results["runs"]
    lines = [f"# Generalist + specialists and hints on digits ({len(runs)} seeds: "
             f"{', '.join(str(r['seed']) for r in runs)})", "",
             f"Machine: {results['machine']}; commit {results['commit']}; {results['seconds']:.0f} s. "
             f"M = {results['config']['specialists']} specialists of S = {results['config']['size']} digits, "
             f"active when their subset meets the generalist's top {results['config']['top']}; "
             f"{runs[0]['test_examples']} test digits per seed.", "",
             "## Generalist alone vs eq. 5 with the specialists (test), by specialists covering the true class", "",
             "| specialists covering | test examples (all seeds) | generalist correct | with specialists correct | "
             "change |", "| --- | --- | --- | --- | --- |"]
    covers = sorted({int(k) for r in runs for k in r["by_covering"]})
    for k in covers:
        rows = [r["by_covering"].get(str(k), r["by_covering"].get(k)) for r in runs]
        rows = [x for x in rows if x]
        n, g, c = (sum(x[f] for x in rows) for f in ("examples", "generalist_correct", "combined_correct"))
        lines.append(f"| {k} | {n} | {g} ({100 * g / n:.1f} %) | {c} ({100 * c / n:.1f} %) | {c - g:+d} |")
    n = sum(r["test_examples"] for r in runs)
    g = sum(round(r["generalist_accuracy"] * r["test_examples"]) for r in runs)
    c = sum(round(r["combined_accuracy"] * r["test_examples"]) for r in runs)
    lines += [f"| all | {n} | {g} ({100 * g / n:.1f} %) | {c} ({100 * c / n:.1f} %) | {c - g:+d} |", "",
              "## Test accuracy, mean ± std over seeds", "", "| model | test accuracy |", "| --- | --- |",
              f"| generalist | {_mean_std([r['generalist_accuracy'] for r in runs])} |",
              f"| generalist + specialists (eq. 5) | {_mean_std([r['combined_accuracy'] for r in runs])} |",
              f"| student distilled from the generalist | {_mean_std([r['students']['generalist'] for r in runs])} |",
              f"| student distilled from eq. 5's q | {_mean_std([r['students']['combined'] for r in runs])} |",
              f"| thin deep student, KD only | {_mean_std([r['thin_students']['kd_only'] for r in runs])} |",
              f"| thin deep student, hints then KD (FitNets) | "
              f"{_mean_std([r['thin_students']['hints'] for r in runs])} |", "",
              "Subsets chosen (seed, classes, confusability): " + "; ".join(
                  f"{r['seed']}: " + ", ".join(f"{s['classes']} {s['confusability']:.2f}" for s in r["plan"])
                  for r in runs) + ".",
              "Each specialist's accuracy on the test digits of its own classes (its head, dustbin counted wrong): "
              + "; ".join(f"{r['seed']}: " + ", ".join(f"{v * 100:.1f} %" for v in
                                                       r["specialist_accuracy_on_own_classes"].values())
                          for r in runs) + ".",
              "Largest eq. 5 residual: " + ", ".join(f"{r['solver']['max_residual']:.2e}" for r in runs)
              + f" (tolerance {runs[0]['solver']['tol']:.0e}); EM steps at most: "
              + ", ".join(str(r["solver"]["iterations"]) for r in runs) + ".", ""]
    (out / "results.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.38
    for j, (field, label) in enumerate((("generalist_correct", "generalist"), ("combined_correct", "+ specialists"))):
        acc = []
        for k in covers:
            rows = [x for x in (r["by_covering"].get(str(k), r["by_covering"].get(k)) for r in runs) if x]
            acc.append(100 * sum(x[field] for x in rows) / sum(x["examples"] for x in rows))
        ax[0].bar(np.arange(len(covers)) + (j - 0.5) * width, acc, width, label=label)
    ax[0].set_xticks(range(len(covers)), [str(k) for k in covers])
    ax[0].set_xlabel("specialists covering the true class")
    ax[0].set_ylabel("test accuracy (%)")
    ax[0].set_ylim(80, 100)
    ax[0].legend(loc="lower left")
    names = ["student\n(generalist)", "student\n(eq. 5 q)", "thin\n(KD)", "thin\n(hints+KD)"]
    vals = [[r["students"]["generalist"] for r in runs], [r["students"]["combined"] for r in runs],
            [r["thin_students"]["kd_only"] for r in runs], [r["thin_students"]["hints"] for r in runs]]
    for i, v in enumerate(vals):
        ax[1].scatter([i] * len(v), np.asarray(v) * 100, color="C0")
        ax[1].hlines(np.mean(v) * 100, i - 0.25, i + 0.25, color="C1")
    ax[1].set_xticks(range(len(names)), names)
    ax[1].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(out / "specialists.png", dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.specialists", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/specialists"))
    p.add_argument("--quick", action="store_true", help="one seed, few epochs: seconds (for the test)")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in cfg["seeds"]:
        print(f"== seed {seed}", flush=True)
        runs.append(run_seed(seed, cfg, args.out))
        r = runs[-1]
        print(f"   generalist {r['generalist_accuracy']:.4f}  + specialists {r['combined_accuracy']:.4f}  "
              f"students {r['students']}  thin {r['thin_students']}", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    results = {"config": cfg, "quick": args.quick, "runs": runs, "seconds": time.perf_counter() - started,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "commit": commit, "num_classes": NUM_CLASSES}
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    report(results, args.out)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md, specialists.png; {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
