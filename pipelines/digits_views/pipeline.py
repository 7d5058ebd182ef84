"""The digits views pipeline: teachers trained with augmentation; students trained with the same augmentation
from clean stored targets, from V replayed stored views, online from the teachers, and from hard labels.

Stages: [1/4] teachers, [2/4] stores (one clean, one per V), [3/4] students (every variant, every seed,
run one after another in this process so their wall times compare), [4/4] the summary. Every student sees
augmented inputs: a fresh random view per step (hard, clean, online) or the epoch's stored view, replayed
(views). Test errors are on the clean test images.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import softtargets as st
from pipelines.digits import models as M
from pipelines.digits.data import DigitsRows, DigitsSplit, load_split
from softtargets.math.augment import RandomView

# Students' streams arrange batches on the training thread: 9 batches of 128 tiny rows an epoch, read from the
# page cache, cost less than handing each over from a thread (docs/views.md has both, measured).
READ_AHEAD = False
ML_DR_BYTES_PER_VIEW = 73  # ml-dr's ImageNet+ views: parameters + top-10 probabilities, as published


def header(step: int, total: int, text: str) -> None:
    print(f"== [{step}/{total}] {text}", flush=True)


def make_augment(cfg: dict[str, Any]) -> RandomView:
    """The augmentation every teacher and student uses (``[augment]``), on flat 8x8 images."""
    a = cfg["augment"]
    return RandomView(scale=tuple(a["scale"]), ratio=tuple(a["ratio"]), degrees=a["degrees"],
                      translate=a["translate"], shape=(1, 8, 8), param_dtype=a["param_dtype"])


def random_views(aug: RandomView, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A fresh random view of every row of ``x`` ``[B, 64]``, drawn from ``g`` (online augmentation, batched)."""
    return aug.replay(x, aug.sample_batch(len(x), g))


def train_teachers(cfg: dict[str, Any], split: DigitsSplit, aug: RandomView) -> list[nn.Module]:
    t = cfg["teacher"]
    out = []
    for seed in t["seeds"]:
        torch.manual_seed(int(seed))
        model = M.make_teacher(t["hidden"], t["dropout_in"], t["dropout_hidden"])
        batches = M.tensor_batches((split.x_train, split.y_train), t["batch_size"], t["epochs"], seed,
                                   transform=lambda b, g: random_views(aug, b, g))
        M.fit(model, batches, M.hard_step, t["lr"])
        out.append(model.eval())
    return out


@torch.no_grad()
def ensemble(teachers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The geometric ensemble's logits ``[B, C]``: the mean of the teachers' logits."""
    return torch.stack([m(x) for m in teachers], dim=1).mean(dim=1)


def build_stores(cfg: dict[str, Any], out: Path, layout: str, teachers: Sequence[nn.Module], rows: DigitsRows,
                 aug: RandomView) -> dict[str, dict[str, Any]]:
    """The clean store and one views store per V; each with its path, bytes and precompute seconds."""
    s = cfg["store"]
    stores: dict[str, dict[str, Any]] = {}
    for v in [None, *s["views"]]:
        name = "clean" if v is None else f"views{v}"
        url = out / "stores" / f"{name}.{layout}"
        if url.exists():
            shutil.rmtree(url)
        t0 = time.perf_counter()
        extra: dict[str, Any] = {} if v is None else {"views": int(v), "augment": aug, "seed": s["seed"]}
        m = st.precompute(list(teachers), rows, url, content=s["content"], dtype=s["dtype"], layout=layout,
                          batch_size=s["batch_size"], num_workers=0, scheduler="local", progress=False, **extra)
        seconds = time.perf_counter() - t0
        rows_stored = m.num_samples
        targets = sum(f.stat().st_size for f in url.rglob("*") if f.is_file() and "views" not in f.parts)
        params = sum(f.stat().st_size for f in (url / "views").rglob("*") if f.is_file()) if v else 0
        payload_target = 2 * m.num_classes if s["dtype"] != "float32" else 4 * m.num_classes
        payload_params = sum(np.dtype(p["dtype"]).itemsize for p in m.views["params"]) if v else 0
        stores[name] = {
            "url": str(url), "views": v, "rows": rows_stored, "precompute_seconds": seconds,
            "bytes_total": targets + params, "bytes_params_files": params,
            "bytes_per_view_total": (targets + params) / rows_stored,
            "bytes_per_view_payload": payload_target + payload_params,
            "payload_target_bytes": payload_target, "payload_params_bytes": payload_params,
        }
    return stores


def _errors(model: nn.Module, split: DigitsSplit) -> tuple[int, int]:
    return (M.errors(M.predict_logits(model, split.x_val), split.y_val),
            M.errors(M.predict_logits(model, split.x_test), split.y_test))


def _student(cfg: dict[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(int(seed))
    return M.make_student(cfg["student"]["hidden"])


def _soft(cfg: dict[str, Any]) -> M.Step:
    s = cfg["student"]
    return M.soft_step(s["temperature"], s["alpha"], "geometric")


def hard_batches(cfg: dict[str, Any], split: DigitsSplit, aug: RandomView, seed: int) -> Iterator[tuple]:
    s = cfg["student"]
    yield from M.tensor_batches((split.x_train, split.y_train), s["batch_size"], s["epochs"], seed,
                                transform=lambda b, g: random_views(aug, b, g))


def online_batches(cfg: dict[str, Any], split: DigitsSplit, aug: RandomView, seed: int,
                   teachers: Sequence[nn.Module]) -> Iterator[tuple]:
    """Fresh views each step, the teachers run on them: ``(x_view, ensemble logits, y)``."""
    for x, y in hard_batches(cfg, split, aug, seed):
        yield x, ensemble(teachers, x), y


def student_inputs(rows: DigitsRows) -> TensorDataset:
    """The transfer set's images and labels as the students' joined dataset: in memory, as the hard and online
    students read them, so a stream joins a batch with one gather."""
    return TensorDataset(rows.x, rows.y)


def clean_batches(cfg: dict[str, Any], url: str, rows: TensorDataset, aug: RandomView, seed: int
                  ) -> Iterator[tuple]:
    """Clean targets from the store, the student's input a fresh random view of the clean image."""
    s = cfg["student"]
    stream = st.stream(url, batch_size=s["batch_size"], seed=seed, dataset=rows, read_ahead=READ_AHEAD)
    g = torch.Generator().manual_seed(int(seed) + 10_000)
    for epoch in range(s["epochs"]):
        stream.set_epoch(epoch)
        for b in stream:
            yield random_views(aug, b["input"], g), b["teacher_logits"], b["label"]


def view_batches(cfg: dict[str, Any], url: str, rows: TensorDataset, aug: RandomView, seed: int) -> Iterator[tuple]:
    """The epoch's stored view of every sample: its targets, and its input replayed from its parameters."""
    s = cfg["student"]
    stream = st.stream(url, batch_size=s["batch_size"], seed=seed, dataset=rows, replay=aug.replay,
                       read_ahead=READ_AHEAD)
    for epoch in range(s["epochs"]):
        stream.set_epoch(epoch)
        for b in stream:
            yield b["input"], b["teacher_logits"], b["label"]


def train_variant(cfg: dict[str, Any], name: str, batches: Iterator[tuple], seed: int, soft: bool,
                  split: DigitsSplit) -> dict[str, Any]:
    model = _student(cfg, seed)
    fit = M.fit(model, batches, _soft(cfg) if soft else M.hard_step, cfg["student"]["lr"])
    val, test = _errors(model, split)
    return {"variant": name, "seed": seed, "val_errors": val, "test_errors": test, "seconds": fit["seconds"],
            "seconds_per_epoch": fit["seconds"] / cfg["student"]["epochs"], "steps": fit["steps"]}


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        errs = np.array([r["test_errors"] for r in rs], dtype=float)
        secs = np.array([r["seconds_per_epoch"] for r in rs], dtype=float)
        out[v] = {"test_errors_mean": float(errs.mean()), "test_errors_std": float(errs.std(ddof=1)) if len(rs) > 1
                  else 0.0, "val_errors_mean": float(np.mean([r["val_errors"] for r in rs])),
                  "seconds_per_epoch": float(secs.mean()), "seeds": len(rs)}
    return out


def gaps(summary: dict[str, dict[str, float]], views: Sequence[int]) -> dict[str, Any]:
    """Per V: the share of the (clean - online) test-error gap the replayed views close, and the wall time per
    epoch against online's."""
    clean, online = summary["clean"]["test_errors_mean"], summary["online"]["test_errors_mean"]
    out: dict[str, Any] = {"gap_errors": clean - online}
    for v in views:
        s = summary[f"views{v}"]
        out[f"views{v}"] = {
            "gap_closed": None if clean == online else (clean - s["test_errors_mean"]) / (clean - online),
            "time_vs_online": s["seconds_per_epoch"] / summary["online"]["seconds_per_epoch"],
        }
    return out


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "softtargets": st.__version__,
            "machine": platform.machine(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
            "cores": os.cpu_count(), "commit": commit}


def run(cfg: dict[str, Any], out: Path, layout: str = "zarr") -> dict[str, Any]:
    timings: dict[str, float] = {}
    torch.set_num_threads(int(cfg["threads"]))
    t0 = time.perf_counter()
    split = load_split(cfg["split"]["seed"], cfg["split"]["fractions"])
    rows = DigitsRows(split.idx_train, name="digits-train")
    inputs = student_inputs(rows)
    aug = make_augment(cfg)

    header(1, 4, f"{len(cfg['teacher']['seeds'])} teachers, trained with augmentation")
    teachers = train_teachers(cfg, split, aug)
    teacher_test = [M.errors(M.predict_logits(m, split.x_test), split.y_test) for m in teachers]
    ens_test = M.errors(ensemble(teachers, split.x_test), split.y_test)
    timings["teachers"] = time.perf_counter() - t0
    print(f"   teacher test errors {teacher_test}, ensemble {ens_test}", flush=True)

    header(2, 4, f"stores: clean, views {cfg['store']['views']} ({layout})")
    t1 = time.perf_counter()
    stores = build_stores(cfg, out, layout, teachers, rows, aug)
    timings["stores"] = time.perf_counter() - t1
    for name, s in stores.items():
        print(f"   {name}: {s['rows']} rows, {s['bytes_per_view_payload']} B/view payload, "
              f"{s['bytes_per_view_total']:.1f} B/view on disk, {s['precompute_seconds']:.1f} s", flush=True)

    views = [int(v) for v in cfg["store"]["views"]]
    variants = ["hard", "clean", *(f"views{v}" for v in views), "online"]
    header(3, 4, f"students: {', '.join(variants)} x seeds {cfg['student']['seeds']}")
    t2 = time.perf_counter()
    load = [os.getloadavg()[0]]  # the machine's 1-minute load average around the timed students
    runs = []
    for seed in cfg["student"]["seeds"]:  # variants interleaved per seed: their wall times share the machine's load
        runs.append(train_variant(cfg, "hard", hard_batches(cfg, split, aug, seed), seed, False, split))
        runs.append(train_variant(cfg, "clean", clean_batches(cfg, stores["clean"]["url"], inputs, aug, seed), seed,
                                  True, split))
        for v in views:
            runs.append(train_variant(cfg, f"views{v}", view_batches(cfg, stores[f"views{v}"]["url"], inputs, aug,
                                                                     seed), seed, True, split))
        runs.append(train_variant(cfg, "online", online_batches(cfg, split, aug, seed, teachers), seed, True, split))
        print("   seed", seed, {r["variant"]: r["test_errors"] for r in runs if r["seed"] == seed}, flush=True)
    timings["students"] = time.perf_counter() - t2
    load.append(os.getloadavg()[0])

    header(4, 4, "summary")
    summary = summarize(runs, variants)
    results = {
        "config": cfg, "layout": layout,
        "split": {"seed": split.seed, "sizes": split.sizes(), "indices": split.indices()},
        "teachers": {"test_errors": teacher_test, "ensemble_test_errors": ens_test},
        "stores": stores, "students": runs, "summary": summary, "gaps": gaps(summary, views),
        "ml_dr_bytes_per_view": ML_DR_BYTES_PER_VIEW, "timings": timings,
        "environment": {**environment(), "load_average_students": load},
    }
    return results


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path
