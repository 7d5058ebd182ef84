"""The pipeline's stages, in order; :func:`run` chains them and returns the results dict.

1. split ``load_digits`` (train / validation / test, fixed seed);
2. train the teacher ensemble; save each ``state_dict`` under ``<out>/teachers/``;
3. stage one: ``softtargets.precompute`` writes the teachers' per-teacher logits of the transfer
   set (the training split, keys ``"digits/NNNN"``) into a store, and of the transfer set without
   the "mythical" digit into a second store (teachers loaded by factory + weights);
4. stage two: the student on hard labels, and distilled FROM THE STORE (``softtargets.stream``
   joined by key with the training images; ``softtargets.distillation_loss``) for every rule,
   alpha and T, over every student seed; the headline (rule, alpha, T) is chosen on validation;
5. the mythical digit: the student distilled from the second store at the chosen settings, the
   digit's logit bias shifted by the amount that maximises validation accuracy.

Only ``softtargets``' public API is used (``import softtargets as st``). Modules: ``data`` (split,
datasets), ``models`` (nets, training loops), ``teachers``, ``stores`` (stage one), ``students``
(stage two, mythical digit), ``parallel`` (worker processes), ``report`` (results files).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import softtargets as st

from .data import DigitsRows, load_split
from .parallel import TaskRunner
from .stores import LAYOUT_SUFFIX, build_stores
from .students import gap_closed, mythical, train_students
from .teachers import teacher_results, train_teachers


def header(step: int, total: int, text: str) -> None:
    print(f"\n== [{step}/{total}] {text}", flush=True)


def environment(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "softtargets": st.__version__, "python": platform.python_version(), "platform": platform.platform()}


def run(cfg: dict[str, Any], out: Path, layout: str = "zarr", progress: bool = True) -> dict[str, Any]:
    """All five stages; returns the results dict (see :mod:`pipelines.digits.report` for the files).

    Nets are trained on ``cfg["workers"]`` processes (one pool for the run), ``cfg["threads"]`` torch
    threads each; stage one runs as ``cfg["store"]["scheduler"]`` says.
    """
    if layout not in LAYOUT_SUFFIX:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUT_SUFFIX)}")
    started = time.perf_counter()
    torch.set_num_threads(cfg["threads"])
    with TaskRunner(cfg["workers"], cfg["threads"], progress) as runner:
        results = _stages(cfg, out, layout, runner, progress)
    results["timings"]["total_seconds"] = time.perf_counter() - started
    return results


def _stages(cfg: dict[str, Any], out: Path, layout: str, runner: TaskRunner, progress: bool) -> dict[str, Any]:
    wall: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        wall[name], clock = now - clock, now

    header(1, 5, "split load_digits")
    split = load_split(cfg["split"]["seed"], cfg["split"]["fractions"])
    print(f"seed {split.seed}, fractions {list(split.fractions)}: {split.sizes()}")
    lap("split")

    k, t = len(cfg["ensemble"]["seeds"]), cfg["teacher"]
    header(2, 5, f"teachers: {k} x MLP{tuple(t['hidden'])}, dropout {t['dropout_in']}/{t['dropout_hidden']}, "
                 f"jitter +-{t['jitter']} px, {t['epochs']} epochs; {cfg['workers']} process(es)")
    teachers, teacher_seconds = train_teachers(cfg, out, runner)
    teachers_res = teacher_results(teachers, split, cfg)
    print(f"test errors: each {teachers_res['test']}, ensemble " + ", ".join(
        f"{r} {v['test']}" for r, v in teachers_res["ensemble"].items()))
    lap("teachers")

    digit = cfg["mythical"]["digit"]
    header(3, 5, f"stage one: st.precompute -> {layout} stores of the training split, and of it without digit {digit}")
    stores = build_stores(cfg, out, layout, teachers, DigitsRows(split.idx_train), progress)
    lap("precompute")

    d = cfg["distill"]
    header(4, 5, f"stage two: students MLP{tuple(cfg['student']['hidden'])} on hard labels, and distilled from the "
                 f"store (rules {d['rules']}, alphas {d['alphas']}, T {d['temperatures']}), seeds "
                 f"{cfg['student']['seeds']}")
    students = train_students(stores["train"]["url"], cfg, runner)
    sel = students["selected"]
    hard_mean, dist_mean = students["hard"]["test_mean_std"]["mean"], students["selected_test"]["mean"]
    gaps = {r: gap_closed(hard_mean, dist_mean, v["test"]) for r, v in teachers_res["ensemble"].items()}
    students["gap_closed"] = {"vs_ensemble": sel["rule"], "fraction": gaps[sel["rule"]], "by_rule": gaps}
    print(f"validation chose {sel['rule']} alpha={sel['alpha']} T={sel['T']:g}: test errors {dist_mean:.2f} "
          f"vs hard {hard_mean:.2f} vs ensemble {teachers_res['ensemble'][sel['rule']]['test']}")
    lap("students")

    header(5, 5, f"mythical digit {digit}: distilled without any {digit}, its bias fitted on validation")
    myth = mythical(split, stores[f"train-without-{digit}"]["url"], sel, cfg, runner)
    ms = myth["summary"]
    print(f"digit {digit} test accuracy {100 * ms['digit_test_accuracy_before']['mean']:.1f}% -> "
          f"{100 * ms['digit_test_accuracy_after']['mean']:.1f}% after a bias shift of {ms['bias_shift']['mean']:.2f}")
    lap("mythical")

    timings = {
        "stage_wall_seconds": wall,
        "precompute": {n: s["precompute_seconds"] for n, s in stores.items()},
        "teachers": teacher_seconds,
        "students_hard": students["hard"]["seconds"],
        "students_distilled": [s for e in students["distilled"] for s in e["seconds"]],
        "mythical": [r["seconds"] for r in myth["per_seed"]],
    }
    return {
        "format": "pipelines.digits/1",
        "config": cfg,
        "layout": layout,
        "split": {"seed": split.seed, "fractions": list(split.fractions), "sizes": split.sizes(),
                  "indices": split.indices(), "test_class_counts": torch.bincount(split.y_test, minlength=10).tolist()},
        "teachers": teachers_res,
        "stores": stores,
        "students": students,
        "mythical": myth,
        "timings": timings,
        "environment": environment(cfg),
    }
