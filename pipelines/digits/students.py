"""Stage two: the student on hard labels, and distilled from a store (``softtargets.stream`` +
``softtargets.distillation_loss``, no teacher in the loop); the validation choice of (rule, alpha, T);
the mythical digit.

Each ``*_task`` function trains one net and returns plain numbers, so it can run in a worker process.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any

import torch

import softtargets as st

from . import models as M
from .data import DigitsRows, DigitsSplit, load_split
from .parallel import TaskRunner


def mean_std(xs: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std"}`` (sample std; 0 for one value)."""
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def evaluate(model: torch.nn.Module, split: DigitsSplit) -> tuple[int, int]:
    """``(val errors, test errors)``."""
    return (M.errors(M.predict_logits(model, split.x_val), split.y_val),
            M.errors(M.predict_logits(model, split.x_test), split.y_test))


def distill_from_store(url: str, inputs: DigitsRows, seed: int, temperature: float, alpha: float, rule: str,
                       cfg: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, float]]:
    """A student trained on the store's logits joined by key with ``inputs``' images; no teacher runs."""
    s = cfg["student"]
    stream = st.stream(url, batch_size=s["batch_size"], shuffle=True, seed=seed, dataset=inputs, by="key")
    return M.train_student(seed, M.store_batches(stream, s["epochs"]), M.soft_step(temperature, alpha, rule), s)


def hard_task(seed: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """The student on hard labels (in-memory batches): ``{"val", "test", "seconds"}``."""
    split = load_split(cfg["split"]["seed"], cfg["split"]["fractions"])
    s = cfg["student"]
    batches = M.tensor_batches((split.x_train, split.y_train), s["batch_size"], s["epochs"], seed)
    model, stats = M.train_student(seed, batches, M.hard_step, s)
    val, test = evaluate(model, split)
    return {"val": val, "test": test, "seconds": stats["seconds"]}


def distill_task(url: str, seed: int, temperature: float, alpha: float, rule: str, cfg: dict[str, Any]
                 ) -> dict[str, Any]:
    """The student distilled from the store at ``url``: ``{"val", "test", "seconds"}``."""
    split = load_split(cfg["split"]["seed"], cfg["split"]["fractions"])
    model, stats = distill_from_store(url, DigitsRows(split.idx_train), seed, temperature, alpha, rule, cfg)
    val, test = evaluate(model, split)
    return {"val": val, "test": test, "seconds": stats["seconds"]}


def select(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid entry with the fewest mean VALIDATION errors; ties go to the higher T (the paper's
    regime), then to the smaller alpha, then to the rule named first in the config."""
    return min(enumerate(grid), key=lambda e: (e[1]["val_mean"], -e[1]["T"], e[1]["alpha"], e[0]))[1]


def train_students(url: str, cfg: dict[str, Any], runner: TaskRunner) -> dict[str, Any]:
    """Hard-label students and the distilled grid (rules x alphas x temperatures x seeds)."""
    s, d = cfg["student"], cfg["distill"]
    seeds = list(s["seeds"])
    combos = list(itertools.product(d["rules"], d["alphas"], d["temperatures"]))
    tasks: list[tuple] = [("hard", seed) for seed in seeds]
    tasks += [("distill", rule, alpha, temp, seed) for rule, alpha, temp in combos for seed in seeds]
    results = runner.map(student_task, [(t, url, cfg) for t in tasks], "students",
                         postfix=lambda r: f"{r['name']}: val {r['val']} test {r['test']}")
    by_task = dict(zip(tasks, results, strict=True))
    hard: dict[str, Any] = {"seeds": seeds, **{k: [by_task[("hard", sd)][k] for sd in seeds]
                                               for k in ("val", "test", "seconds")}}
    hard["test_mean_std"] = mean_std(hard["test"])
    grid = []
    for rule, alpha, temp in combos:
        runs = [by_task[("distill", rule, alpha, temp, sd)] for sd in seeds]
        entry: dict[str, Any] = {"rule": rule, "alpha": alpha, "T": temp,
                                 **{k: [r[k] for r in runs] for k in ("val", "test", "seconds")}}
        entry["val_mean"] = statistics.mean(entry["val"])
        entry["test_mean_std"] = mean_std(entry["test"])
        grid.append(entry)
    best = select(grid)
    per_rule = {r: select([e for e in grid if e["rule"] == r])["alpha"] for r in d["rules"]}
    return {"hard": hard, "distilled": grid, "per_rule_alpha": per_rule,
            "selected": {k: best[k] for k in ("rule", "alpha", "T")}, "selected_test": best["test_mean_std"]}


def student_task(task: tuple, url: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``("hard", seed)`` or ``("distill", rule, alpha, T, seed)`` -> the run's numbers and a ``name``."""
    if task[0] == "hard":
        return {"name": f"hard seed {task[1]}", **hard_task(task[1], cfg)}
    _, rule, alpha, temp, seed = task
    return {"name": f"{rule[:5]} a={alpha:g} T={temp:g} seed {seed}", **distill_task(url, seed, temp, alpha, rule, cfg)}


def gap_closed(hard_mean: float, distilled_mean: float, ensemble: float) -> float | None:
    """``(hard - distilled) / (hard - ensemble)``: 1 = the student matches the ensemble; None if no gap."""
    gap = hard_mean - ensemble
    return None if gap == 0 else (hard_mean - distilled_mean) / gap


# --------------------------------------------------------------------------- stage 5: mythical digit


def mythical_task(url: str, seed: int, selected: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """One student distilled without the digit; its bias shift fitted on validation, applied on test."""
    split = load_split(cfg["split"]["seed"], cfg["split"]["fractions"])
    digit = cfg["mythical"]["digit"]
    model, stats = distill_from_store(url, DigitsRows(split.idx_train), seed, selected["T"], selected["alpha"],
                                      selected["rule"], cfg)
    zv, zt = M.predict_logits(model, split.x_val), M.predict_logits(model, split.x_test)
    shift, val_acc = M.fit_bias_shift(zv, split.y_val, digit, M.bias_grid(*cfg["mythical"]["bias_grid"]))
    shifted = zt.clone()
    shifted[:, digit] += shift
    wrong_digit = split.y_test == digit
    return {
        "seed": seed, "bias_shift": shift, "val_accuracy_after": val_acc,
        "test_errors_before": M.errors(zt, split.y_test), "test_errors_after": M.errors(shifted, split.y_test),
        "digit_test_accuracy_before": M.class_accuracy(zt, split.y_test, digit),
        "digit_test_accuracy_after": M.class_accuracy(zt, split.y_test, digit, shift),
        "digit_test_errors_before": int(((zt.argmax(-1) != split.y_test) & wrong_digit).sum()),
        "digit_test_errors_after": int(((shifted.argmax(-1) != split.y_test) & wrong_digit).sum()),
        "seconds": stats["seconds"],
    }


def mythical(split: DigitsSplit, url: str, selected: dict[str, Any], cfg: dict[str, Any], runner: TaskRunner
             ) -> dict[str, Any]:
    """Students distilled from the store without the digit, one per student seed; summary over seeds."""
    digit = cfg["mythical"]["digit"]
    rows = runner.map(mythical_task, [(url, seed, selected, cfg) for seed in cfg["student"]["seeds"]],
                      f"without {digit}")
    summary = {k: mean_std([r[k] for r in rows]) for k in (
        "bias_shift", "test_errors_before", "test_errors_after", "digit_test_accuracy_before",
        "digit_test_accuracy_after")}
    return {"digit": digit, "digit_test_rows": int((split.y_test == digit).sum()),
            "settings": dict(selected), "per_seed": rows, "summary": summary}
