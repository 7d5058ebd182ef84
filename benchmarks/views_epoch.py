"""Where an epoch of the digits_views students goes: replayed stored views against online distillation.

``python -m pipelines.digits_views`` reports each student's wall time per epoch; this script splits it. With the
pipeline's config (teachers, student, augmentation, batch size, one torch thread) and a views store of V = 16
(untrained teachers of the configured sizes: the same arithmetic, seconds to build), it times, interleaved, each
repeat a fresh student of ``--epochs`` epochs (default the pipeline's 64):

* **hard**: fresh random views of in-memory images, cross-entropy on the labels;
* **floor**: the same fresh views and the soft loss against zero targets: what every distilled student pays
  (its step and the augmentation) with no store and no teacher;
* **views**: the pipeline's replayed-view student (stream of the store, joined to the images, replayed), batches
  arranged on the training thread (the pipeline's setting) and with the read-ahead thread (the stream's default);
* **online**: fresh views, the teachers run on them every step;

and the batches alone (no student): fresh views; the views stream with and without replay; online's (views and
teachers). The best (shortest) and the median of ``--repeats`` per case, in ms per epoch, and their ratios to
online's (on a loaded machine the best favours the short cases: they more often find a quiet moment).

    python benchmarks/views_epoch.py            # ~3 min on 2 cores
    python benchmarks/views_epoch.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from timing import write_report

import softtargets as st
from pipelines.digits import models as M
from pipelines.digits.data import DigitsRows, load_split
from pipelines.digits_views import pipeline as P
from pipelines.digits_views.__main__ import load_config

VIEWS = 16


def views_batches(url: str, inputs: Any, aug: Any, epochs: int, batch_size: int, replay: bool,
                  read_ahead: bool) -> Iterator[tuple]:
    """The replayed-view student's batches (as ``pipeline.view_batches``, with the two settings open)."""
    stream = st.stream(url, batch_size=batch_size, seed=0, dataset=inputs, replay=aug.replay if replay else None,
                       read_ahead=read_ahead)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for b in stream:
            yield b["input"], b["teacher_logits"], b["label"]


def drain(batches: Iterable[Any]) -> float:
    """Seconds to draw every batch."""
    t0 = time.perf_counter()
    for _ in batches:
        pass
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=None, help="epochs per student (default the pipeline's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "views_epoch.json")
    args = p.parse_args()
    cfg = load_config(quick=args.quick)
    epochs, repeats = (2, 2) if args.quick else (args.epochs or int(cfg["student"]["epochs"]), args.repeats)
    cfg["student"]["epochs"] = epochs
    torch.set_num_threads(int(cfg["threads"]))
    split = load_split(cfg["split"]["seed"], cfg["split"]["fractions"])
    rows = DigitsRows(split.idx_train, name="digits-train")
    inputs, aug, soft = P.student_inputs(rows), P.make_augment(cfg), P._soft(cfg)
    torch.manual_seed(0)
    t = cfg["teacher"]
    teachers = [M.make_teacher(t["hidden"], t["dropout_in"], t["dropout_hidden"]).eval() for _ in t["seeds"]]
    tmp = Path(tempfile.mkdtemp(prefix="views-epoch-bench-"))
    try:
        url = str(tmp / "views.zarr")
        s = cfg["store"]
        st.precompute(teachers, rows, url, content=s["content"], dtype=s["dtype"], views=VIEWS, augment=aug,
                      seed=s["seed"], batch_size=s["batch_size"], num_workers=0, scheduler="local", progress=False)
        bs = cfg["student"]["batch_size"]

        def fresh() -> Iterator[tuple]:
            return P.hard_batches(cfg, split, aug, 0)

        def zeros(batches: Iterable[tuple]) -> Iterator[tuple]:
            return ((x, torch.zeros(len(x), 10), y) for x, y in batches)

        def train(batches: Iterable[tuple], step: M.Step) -> float:
            return M.fit(P._student(cfg, 0), batches, step, cfg["student"]["lr"])["seconds"]

        cases: dict[str, Callable[[], float]] = {
            "hard": lambda: train(fresh(), M.hard_step),
            "floor": lambda: train(zeros(fresh()), soft),
            "views": lambda: train(views_batches(url, inputs, aug, epochs, bs, True, False), soft),
            "views, read-ahead thread": lambda: train(views_batches(url, inputs, aug, epochs, bs, True, True), soft),
            "online": lambda: train(P.online_batches(cfg, split, aug, 0, teachers), soft),
            "batches: fresh views": lambda: drain(fresh()),
            "batches: views stream, replayed": lambda: drain(views_batches(url, inputs, aug, epochs, bs, True, False)),
            "batches: views stream, not replayed": lambda: drain(
                views_batches(url, inputs, aug, epochs, bs, False, False)),
            "batches: online (fresh views + teachers)": lambda: drain(P.online_batches(cfg, split, aug, 0, teachers)),
        }
        seconds: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):  # interleaved: every case shares the machine's load alike
            for name, fn in cases.items():
                seconds[name].append(fn())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: 1000 * min(v) / epochs for k, v in seconds.items()}
    median = {k: 1000 * statistics.median(v) / epochs for k, v in seconds.items()}
    print(f"| per epoch ({epochs} epochs, {repeats} repeats) | best ms | vs online | median ms | vs online |")
    print("| --- | --- | --- | --- | --- |")
    for k in cases:
        print(f"| {k} | {best[k]:.2f} | {best[k] / best['online']:.3f} | {median[k]:.2f} | "
              f"{median[k] / median['online']:.3f} |")
    write_report(args.out, {"benchmark": "views_epoch", "quick": args.quick, "epochs": epochs, "repeats": repeats,
                            "views": VIEWS, "ms_per_epoch_best": best, "ms_per_epoch_median": median,
                            "seconds": seconds})


if __name__ == "__main__":
    main()
