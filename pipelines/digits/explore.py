"""Scratch experiments behind ``models.DEFAULTS`` (may be deleted once the pipeline exists).

Usage::

    python pipelines/digits/explore.py teachers  [--hidden 512 --epochs 150 --jitter-prob 0.5 --k 5]
    python pipelines/digits/explore.py sweep     [--sizes 10,20,30 --alphas 0.5,0.9,1 --copies 0]
    python pipelines/digits/explore.py mythical  [--size 30 --T 8 --alpha 0.9]
    python pipelines/digits/explore.py pipeline  (the full recommended pipeline, timed)

Teacher logits are cached under ``/tmp/digits_cache`` keyed by the teacher config, so the
student sweeps reuse one ensemble. Every selection of T / alpha is made on VALIDATION
errors (mean over student seeds); test errors are only reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models as M  # noqa: E402

CACHE = Path("/tmp/digits_cache")


def _key(cfg: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_ensemble(
    split: M.DigitsSplit, teacher_cfg: dict[str, Any], seeds: list[int], copies: int, kind: str, strength: float
) -> dict:
    """Train K teachers (cached by config), then their per-teacher logits on val/test/transfer."""
    cfg = {"teacher": teacher_cfg, "seeds": seeds, "split": split.seed}
    path = CACHE / f"teachers_{_key(cfg)}.pt"
    if path.exists():
        saved = torch.load(path)
    else:
        CACHE.mkdir(exist_ok=True)
        saved = {"states": [], "times": []}
        for s in seeds:
            t0, c0 = time.perf_counter(), time.process_time()
            m, _ = M.train_teacher(s, split.x_train, split.y_train, **teacher_cfg)
            saved["times"].append((time.perf_counter() - t0, time.process_time() - c0))
            saved["states"].append(m.state_dict())
            print(f"  teacher seed {s}: wall {saved['times'][-1][0]:.1f}s cpu {saved['times'][-1][1]:.1f}s")
        torch.save(saved, path)
    models = []
    for st in saved["states"]:
        m = M.make_teacher(teacher_cfg["hidden"], teacher_cfg["dropout_in"], teacher_cfg["dropout_hidden"])
        m.load_state_dict(st)
        models.append(m.eval())
    x_transfer = M.transfer_set(split.x_train, copies, seed=12345, kind=kind, strength=strength)
    return {
        "models": models,
        "times": saved["times"],
        "val": M.teacher_logits(models, split.x_val),
        "test": M.teacher_logits(models, split.x_test),
        "x_transfer": x_transfer,
        "transfer": M.teacher_logits(models, x_transfer),
    }


def report_ensemble(ens: dict, split: M.DigitsSplit) -> None:
    v, t = ens["val"], ens["test"]
    k = v.shape[1]
    print(
        "  per-teacher val", [M.errors(v[:, i], split.y_val) for i in range(k)],
        "test", [M.errors(t[:, i], split.y_test) for i in range(k)],
    )
    for rule in ("geometric", "arithmetic"):
        print(
            f"  ensemble[{rule}] val {M.ensemble_errors(v, split.y_val, rule)}"
            f" test {M.ensemble_errors(t, split.y_test, rule)}"
        )
    w = [a for a, _ in ens["times"]]
    print(f"  teacher wall s: mean {statistics.mean(w):.1f}")


def ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):6.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:5.2f}"


def eval_student(m: torch.nn.Module, split: M.DigitsSplit) -> tuple[int, int]:
    return (
        M.errors(M.predict_logits(m, split.x_val), split.y_val),
        M.errors(M.predict_logits(m, split.x_test), split.y_test),
    )


def sweep(args: argparse.Namespace) -> None:
    split = M.load_split()
    seeds = list(range(100, 100 + args.k))
    ens = build_ensemble(split, teacher_cfg(args), seeds, args.use_copies, args.kind, args.strength)
    report_ensemble(ens, split)
    ens_test = M.ensemble_errors(ens["test"], split.y_test)
    n = len(split.y_train)
    c = args.use_copies
    x_tr = ens["x_transfer"][: n * (1 + c)]
    v_tr = ens["transfer"][: n * (1 + c)]
    labels = split.y_train.repeat(1 + c)
    if not args.labels_on_copies:
        labels = torch.cat([split.y_train, torch.full((len(x_tr) - n,), -1, dtype=torch.int64)])
    seeds = list(range(args.seeds))
    for size in [int(s) for s in args.sizes.split(",")]:
        hidden = (size,) * args.depth
        st_kw = {"hidden": hidden, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
        hv, ht, secs = [], [], []
        for s in seeds:
            m, st = M.train_student_hard(s, split.x_train, split.y_train, **st_kw)
            a, b = eval_student(m, split)
            hv.append(a)
            ht.append(b)
            secs.append(st["seconds"])
        print(f"size {hidden} HARD  val {ms(hv)} test {ms(ht)}  ({statistics.mean(secs):.2f}s/run)", flush=True)
        if args.hard_on_copies and c:
            hv2, ht2 = [], []
            for s in seeds:
                ep = max(1, args.epochs // (1 + c))
                m, st = M.train_student_hard(s, x_tr, split.y_train.repeat(1 + c), **{**st_kw, "epochs": ep})
                a, b = eval_student(m, split)
                hv2.append(a)
                ht2.append(b)
            print(f"size {hidden} HARD+jittercopies  val {ms(hv2)} test {ms(ht2)}", flush=True)
        results = []
        for rule in args.rules.split(","):
            for alpha in [float(a) for a in args.alphas.split(",")]:
                for temp in [float(t) for t in args.temps.split(",")]:
                    sv, stt, secs = [], [], []
                    for s in seeds:
                        ep = max(1, args.epochs // (1 + c)) if args.same_steps else args.epochs
                        m, st = M.train_student_soft(
                            s, x_tr, v_tr, labels, temp, alpha, rule, **{**st_kw, "epochs": ep}
                        )
                        a, b = eval_student(m, split)
                        sv.append(a)
                        stt.append(b)
                        secs.append(st["seconds"])
                    results.append((statistics.mean(sv), rule, alpha, temp, sv, stt))
                    print(
                        f"size {hidden} {rule[:4]} a={alpha} T={temp:4g} val {ms(sv)} test {ms(stt)}"
                        f"  ({statistics.mean(secs):.2f}s/run)",
                        flush=True,
                    )
        best = min(results, key=lambda r: (r[0], r[3]))
        hard_t = statistics.mean(ht)
        dist_t = statistics.mean(best[5])
        closure = (hard_t - dist_t) / (hard_t - ens_test) * 100 if hard_t != ens_test else float("nan")
        print(
            f"== size {hidden}: val-selected {best[1]} a={best[2]} T={best[3]}: test {ms(best[5])}"
            f" vs hard {ms(ht)} vs ensemble {ens_test}: gap closed {closure:.0f}%",
            flush=True,
        )


def teacher_cfg(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "hidden": (args.hidden, args.hidden),
        "epochs": args.t_epochs,
        "batch_size": 128,
        "jitter": args.jitter,
        "jitter_prob": args.jitter_prob,
        "dropout_in": args.dropout_in,
        "dropout_hidden": args.dropout_hidden,
    }


def teachers(args: argparse.Namespace) -> None:
    split = M.load_split()
    seeds = list(range(100, 100 + args.k))
    ens = build_ensemble(split, teacher_cfg(args), seeds, args.use_copies, args.kind, args.strength)
    print(teacher_cfg(args))
    report_ensemble(ens, split)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("cmd", choices=["teachers", "sweep"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--t-epochs", type=int, default=150)
    p.add_argument("--jitter", type=int, default=1)
    p.add_argument("--jitter-prob", type=float, default=0.5)
    p.add_argument("--dropout-in", type=float, default=0.2)
    p.add_argument("--dropout-hidden", type=float, default=0.5)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--use-copies", type=int, default=0)
    p.add_argument("--kind", default="mixup")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--sizes", default="10,20,30")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--alphas", default="0.5,0.9,1.0")
    p.add_argument("--temps", default="1,2,4,8,20")
    p.add_argument("--rules", default="geometric")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--labels-on-copies", action="store_true")
    p.add_argument("--hard-on-copies", action="store_true")
    p.add_argument("--same-steps", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"teachers": teachers, "sweep": sweep}[args.cmd](args)


if __name__ == "__main__":
    main()
