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

Only ``softtargets``' public API is used (``import softtargets as st``).
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import softtargets as st

from . import models as M
from .data import DigitsRows, DigitsSplit, load_split

LAYOUT_SUFFIX = {"zarr": ".zarr", "wds": ".wds"}


def header(step: int, total: int, text: str) -> None:
    print(f"\n== [{step}/{total}] {text}", flush=True)


def mean_std(xs: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std"}`` (sample std; 0 for one value)."""
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


# --------------------------------------------------------------------------- stage 2: teachers


def teacher_paths(out: Path, seeds: Iterable[int]) -> list[Path]:
    return [out / "teachers" / f"teacher-{s}.pt" for s in seeds]


def train_teachers(split: DigitsSplit, cfg: dict[str, Any], out: Path, progress: bool
                   ) -> tuple[list[torch.nn.Module], list[float]]:
    """Train one teacher per ensemble seed; save each ``state_dict`` (written to a temp name, then renamed)."""
    seeds = cfg["ensemble"]["seeds"]
    teachers, seconds = [], []
    for seed, path in zip(tqdm(seeds, desc="teachers", unit="net", disable=not progress),
                          teacher_paths(out, seeds), strict=True):
        model, stats = M.train_teacher(seed, split.x_train, split.y_train, cfg["teacher"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        teachers.append(model)
        seconds.append(stats["seconds"])
    return teachers, seconds


def teacher_results(teachers: Sequence[torch.nn.Module], split: DigitsSplit, cfg: dict[str, Any]) -> dict[str, Any]:
    """Validation and test errors of each teacher and of the ensemble under both rules."""
    v_val, v_test = M.teacher_logits(teachers, split.x_val), M.teacher_logits(teachers, split.x_test)
    k = v_val.shape[1]
    return {
        "seeds": list(cfg["ensemble"]["seeds"]),
        "val": [M.errors(v_val[:, i], split.y_val) for i in range(k)],
        "test": [M.errors(v_test[:, i], split.y_test) for i in range(k)],
        "ensemble": {
            rule: {"val": M.ensemble_errors(v_val, split.y_val, rule),
                   "test": M.ensemble_errors(v_test, split.y_test, rule)}
            for rule in ("arithmetic", "geometric")
        },
    }


# --------------------------------------------------------------------------- stage 3: stores


def teacher_specs(cfg: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Teachers for ``st.precompute`` by import path + saved weights (what a precompute config holds)."""
    t = cfg["teacher"]
    kwargs = {"hidden": list(t["hidden"]), "dropout_in": t["dropout_in"], "dropout_hidden": t["dropout_hidden"]}
    seeds = cfg["ensemble"]["seeds"]
    return [{"name": f"teacher-{s}", "factory": "pipelines.digits.models:make_teacher", "kwargs": kwargs,
             "weights": str(p)} for s, p in zip(seeds, teacher_paths(out, seeds), strict=True)]


def transfer_spec(cfg: dict[str, Any], leave_out: int | None) -> dict[str, Any]:
    """The transfer set for ``st.precompute`` by import path: the training split (less ``leave_out``)."""
    kwargs: dict[str, Any] = {"seed": cfg["split"]["seed"], "fractions": list(cfg["split"]["fractions"])}
    if leave_out is not None:
        kwargs["leave_out"] = leave_out
    name = "digits-train" if leave_out is None else f"digits-train-without-{leave_out}"
    return {"factory": "pipelines.digits.data:transfer_set", "kwargs": kwargs, "name": name}


def precompute_store(cfg: dict[str, Any], out: Path, name: str, layout: str, leave_out: int | None,
                     progress: bool) -> tuple[str, float]:
    """Stage one into ``<out>/stores/<name>.<layout>``; returns ``(url, seconds)``."""
    s = cfg["store"]
    url = str(out / "stores" / f"{name}{LAYOUT_SUFFIX[layout]}")
    scheduler = None if s["scheduler"] == "dask" else s["scheduler"]
    t0 = time.perf_counter()
    st.precompute(
        teacher_specs(cfg, out), transfer_spec(cfg, leave_out), url, content=s["content"], layout=layout,
        dtype=s["dtype"], shard_rows=s["shard_rows"], class_names=[str(c) for c in range(10)],
        batch_size=s["batch_size"], num_workers=s["num_workers"], device="cpu", scheduler=scheduler,
        workers=1 if scheduler is None else None, overwrite=True, progress=progress,
    )
    return url, time.perf_counter() - t0


def store_summary(url: str, seconds: float) -> dict[str, Any]:
    """What results.json records of a store: its URL and the manifest's main facts."""
    store = st.open_targets(url, verify="full")
    m = store.manifest
    return {
        "url": url, "layout": m.layout, "content": m.content, "dtype": m.dtype,
        "logits_shape": list(m.logits_shape), "num_shards": m.num_shards, "shard_rows": m.shard_rows,
        "bytes": m.nbytes, "transfer_set": m.transfer_set,
        "teachers": [{"name": t["name"], "sha256": t["sha256"]} for t in m.teachers],
        "labeled": sum(s.labeled for s in m.shards), "clipped_values": m.clipped_values,
        "precompute_seconds": seconds,
    }


def store_matches_teachers(url: str, teachers: Sequence[torch.nn.Module], rows: DigitsRows) -> float:
    """Largest |stored - direct| over the store's rows: teachers run here on the rows' images, zero-meaned."""
    store = st.open_targets(url)
    got = store[:]
    position = {k: i for i, k in enumerate(rows.keys)}
    x = rows.x[[position[k] for k in got["key"]]]
    direct = M.teacher_logits(teachers, x)
    return float((got["logits"].float() - direct).abs().max())


# --------------------------------------------------------------------------- stage 4: students


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


def select(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """The grid entry with the fewest mean VALIDATION errors; ties go to the higher T (the paper's
    regime), then to the smaller alpha, then to the rule named first in the config."""
    return min(enumerate(grid), key=lambda e: (e[1]["val_mean"], -e[1]["T"], e[1]["alpha"], e[0]))[1]


def train_students(split: DigitsSplit, url: str, cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Hard-label students and the distilled grid (rules x alphas x temperatures x seeds)."""
    s, d = cfg["student"], cfg["distill"]
    inputs = DigitsRows(split.idx_train)
    combos = list(itertools.product(d["rules"], d["alphas"], d["temperatures"]))
    bar = tqdm(total=len(s["seeds"]) * (1 + len(combos)), desc="students", unit="net", disable=not progress)
    hard: dict[str, Any] = {"seeds": list(s["seeds"]), "val": [], "test": [], "seconds": []}
    for seed in s["seeds"]:
        batches = M.tensor_batches((split.x_train, split.y_train), s["batch_size"], s["epochs"], seed)
        model, stats = M.train_student(seed, batches, M.hard_step, s)
        for key, value in zip(("val", "test"), evaluate(model, split), strict=True):
            hard[key].append(value)
        hard["seconds"].append(stats["seconds"])
        bar.update()
    hard["test_mean_std"] = mean_std(hard["test"])
    bar.set_postfix_str(f"hard: test {hard['test_mean_std']['mean']:.2f}")
    grid = []
    for rule, alpha, temp in combos:
        entry: dict[str, Any] = {"rule": rule, "alpha": alpha, "T": temp, "val": [], "test": [], "seconds": []}
        for seed in s["seeds"]:
            model, stats = distill_from_store(url, inputs, seed, temp, alpha, rule, cfg)
            for key, value in zip(("val", "test"), evaluate(model, split), strict=True):
                entry[key].append(value)
            entry["seconds"].append(stats["seconds"])
            bar.update()
        entry["val_mean"] = statistics.mean(entry["val"])
        entry["test_mean_std"] = mean_std(entry["test"])
        bar.set_postfix_str(f"{rule[:5]} a={alpha} T={temp:g}: val {entry['val_mean']:.2f} "
                            f"test {entry['test_mean_std']['mean']:.2f}")
        grid.append(entry)
    bar.close()
    best = select(grid)
    per_rule = {r: select([e for e in grid if e["rule"] == r])["alpha"] for r in d["rules"]}
    return {"hard": hard, "distilled": grid, "per_rule_alpha": per_rule,
            "selected": {k: best[k] for k in ("rule", "alpha", "T")}, "selected_test": best["test_mean_std"]}


def gap_closed(hard_mean: float, distilled_mean: float, ensemble: float) -> float | None:
    """``(hard - distilled) / (hard - ensemble)``: 1 = the student matches the ensemble; None if no gap."""
    gap = hard_mean - ensemble
    return None if gap == 0 else (hard_mean - distilled_mean) / gap


# --------------------------------------------------------------------------- stage 5: mythical digit


def mythical(split: DigitsSplit, url: str, selected: dict[str, Any], cfg: dict[str, Any], progress: bool
             ) -> dict[str, Any]:
    """Students distilled without any image of the digit; the digit's bias fitted on validation."""
    digit = cfg["mythical"]["digit"]
    grid = M.bias_grid(*cfg["mythical"]["bias_grid"])
    inputs = DigitsRows(split.idx_train)
    rows = []
    for seed in tqdm(cfg["student"]["seeds"], desc=f"without {digit}", unit="net", disable=not progress):
        model, stats = distill_from_store(url, inputs, seed, selected["T"], selected["alpha"], selected["rule"], cfg)
        zv, zt = M.predict_logits(model, split.x_val), M.predict_logits(model, split.x_test)
        shift, val_acc = M.fit_bias_shift(zv, split.y_val, digit, grid)
        shifted = zt.clone()
        shifted[:, digit] += shift
        rows.append({
            "seed": seed, "bias_shift": shift, "val_accuracy_after": val_acc,
            "test_errors_before": M.errors(zt, split.y_test), "test_errors_after": M.errors(shifted, split.y_test),
            "digit_test_accuracy_before": M.class_accuracy(zt, split.y_test, digit),
            "digit_test_accuracy_after": M.class_accuracy(zt, split.y_test, digit, shift),
            "digit_test_errors_before": int(((zt.argmax(-1) != split.y_test) & (split.y_test == digit)).sum()),
            "digit_test_errors_after": int(((shifted.argmax(-1) != split.y_test) & (split.y_test == digit)).sum()),
            "seconds": stats["seconds"],
        })
    summary = {k: mean_std([r[k] for r in rows]) for k in (
        "bias_shift", "test_errors_before", "test_errors_after", "digit_test_accuracy_before",
        "digit_test_accuracy_after")}
    return {"digit": digit, "digit_test_rows": int((split.y_test == digit).sum()),
            "settings": dict(selected), "per_seed": rows, "summary": summary}


# --------------------------------------------------------------------------- the whole run


def environment(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "softtargets": st.__version__, "python": platform.python_version(), "platform": platform.platform()}


def run(cfg: dict[str, Any], out: Path, layout: str = "zarr", progress: bool = True) -> dict[str, Any]:
    """All five stages; returns the results dict (see :mod:`pipelines.digits.report` for the files)."""
    if layout not in LAYOUT_SUFFIX:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUT_SUFFIX)}")
    started = time.perf_counter()
    torch.set_num_threads(cfg["threads"])
    timings: dict[str, Any] = {}
    total = 5

    header(1, total, "split load_digits")
    t0 = time.perf_counter()
    split = load_split(cfg["split"]["seed"], cfg["split"]["fractions"])
    timings["split"] = time.perf_counter() - t0
    print(f"seed {split.seed}, fractions {list(split.fractions)}: {split.sizes()}")

    k, t = len(cfg["ensemble"]["seeds"]), cfg["teacher"]
    header(2, total, f"teachers: {k} x MLP{tuple(t['hidden'])}, dropout {t['dropout_in']}/{t['dropout_hidden']}, "
                     f"jitter +-{t['jitter']} px, {t['epochs']} epochs")
    teachers, seconds = train_teachers(split, cfg, out, progress)
    timings["teachers"] = seconds
    teachers_res = teacher_results(teachers, split, cfg)
    print(f"test errors: each {teachers_res['test']}, ensemble " + ", ".join(
        f"{r} {v['test']}" for r, v in teachers_res["ensemble"].items()))

    digit = cfg["mythical"]["digit"]
    header(3, total, f"stage one: st.precompute -> {layout} stores (transfer set: the training split; and without "
                     f"digit {digit})")
    train_rows = DigitsRows(split.idx_train)
    stores = {}
    for name, leave_out in (("train", None), (f"train-without-{digit}", digit)):
        url, secs = precompute_store(cfg, out, name, layout, leave_out, progress)
        stores[name] = store_summary(url, secs)
        stores[name]["max_abs_diff_vs_teachers"] = store_matches_teachers(url, teachers, train_rows)
        print(f"{url}: {stores[name]['logits_shape']} {stores[name]['dtype']} in {stores[name]['num_shards']} shards, "
              f"{secs:.2f} s; max |stored - teachers| {stores[name]['max_abs_diff_vs_teachers']:.2e}")
    timings["precompute"] = {n: s["precompute_seconds"] for n, s in stores.items()}

    d = cfg["distill"]
    header(4, total, f"stage two: students {tuple(cfg['student']['hidden'])}, hard labels and distilled from the "
                     f"store (rules {d['rules']}, alphas {d['alphas']}, T {d['temperatures']}), "
                     f"seeds {cfg['student']['seeds']}")
    students = train_students(split, stores["train"]["url"], cfg, progress)
    timings["students_hard"] = students["hard"]["seconds"]
    timings["students_distilled"] = [s for e in students["distilled"] for s in e["seconds"]]
    sel = students["selected"]
    hard_mean = students["hard"]["test_mean_std"]["mean"]
    dist_mean = students["selected_test"]["mean"]
    gaps = {r: gap_closed(hard_mean, dist_mean, v["test"]) for r, v in teachers_res["ensemble"].items()}
    students["gap_closed"] = {"vs_ensemble": sel["rule"], "fraction": gaps[sel["rule"]], "by_rule": gaps}
    print(f"validation chose {sel['rule']} alpha={sel['alpha']} T={sel['T']:g}: test errors {dist_mean:.2f} "
          f"vs hard {hard_mean:.2f} vs ensemble {teachers_res['ensemble'][sel['rule']]['test']}")

    header(5, total, f"mythical digit {digit}: distilled without any {digit}, its bias fitted on validation")
    myth = mythical(split, stores[f"train-without-{digit}"]["url"], sel, cfg, progress)
    timings["mythical"] = [r["seconds"] for r in myth["per_seed"]]
    ms = myth["summary"]
    print(f"digit {digit} test accuracy {100 * ms['digit_test_accuracy_before']['mean']:.1f}% -> "
          f"{100 * ms['digit_test_accuracy_after']['mean']:.1f}% after a bias shift of {ms['bias_shift']['mean']:.2f}")

    timings["total_seconds"] = time.perf_counter() - started
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
