"""End to end: a student epoch trained from a target store vs the same student distilled online.

Synthetic 1000-class data (``--samples`` x 256 float32 inputs, labels from a fixed random linear
map), K=5 MLP teachers (256 -> 2048 -> 2048 -> 1000, random init: the timing does not depend on
their weights) and an MLP student (256 -> 512 -> 1000), CPU, batch 256, SGD, Hinton loss at T=4
(geometric ensemble of the K per-teacher logits), the same student initialisation in both runs.

* ``online``: every step runs the K teachers on the batch (``no_grad``), then the student step.
* ``store nw=N``: the teachers ran once beforehand (timed, not part of the run) into a zarr store
  of per-teacher float16 logits ``[N, 5, 1000]``; each epoch streams them with ``softtargets.stream``
  (default ``verify="lazy"``: each shard's sha256 is checked on its first read, in the first epoch)
  joined to the inputs by row index, ``N`` DataLoader workers.

Each run trains ``--epochs`` epochs (default 2). ``data wait`` = time blocked in ``next(loader)`` /
the run's wall time (the issue's goal: <= 5 %); ``1st batch`` = the wait for the run's first batch
(opening the store, checking the first shards, arranging the first window), a one-off that a longer
run amortises; ``wait % after`` = the rest of the wait / the run's wall time. Speed-up = online time
/ store time.

    python benchmarks/end_to_end.py            # < 2 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from timing import write_report
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import softtargets as st
from softtargets.math.losses import distillation_loss
from softtargets.streaming import stream

D, C, K, BATCH, T, ALPHA = 256, 1000, 5, 256, 4.0, 0.9
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "end_to_end.json"


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs float32 [n, D], labels int64 [n] in [0, C)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    w = torch.randn(D, C, generator=g)
    return x, (x @ w + 0.5 * torch.randn(n, C, generator=g)).argmax(1)


def teachers_logits(teachers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Per-teacher logits float32 [B, K, C]."""
    with torch.no_grad():
        return torch.stack([t(x) for t in teachers], dim=1)


def timed(loader: Iterable[Any]) -> Iterator[tuple[Any, float]]:
    """Items of ``loader`` with the seconds spent waiting for each."""
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        yield item, time.perf_counter() - t0


def run_epochs(student: nn.Module, epochs: Iterable[Iterable[Any]], unpack) -> dict[str, float]:
    """SGD over every batch of every epoch in ``epochs``; ``unpack(batch) -> (x, teacher_logits, labels)``."""
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    wait = teacher_s = 0.0
    first_wait = None
    rows = steps = 0
    loss = torch.zeros(())
    started = time.perf_counter()
    for batches in epochs:
        for batch, waited in timed(batches):
            wait += waited
            first_wait = waited if first_wait is None else first_wait
            t0 = time.perf_counter()
            x, v, y = unpack(batch)
            teacher_s += time.perf_counter() - t0
            loss = distillation_loss(student(x), v, y, T, ALPHA, "geometric")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows += len(y)
            steps += 1
    seconds = time.perf_counter() - started
    after_first = wait - (first_wait or 0.0)
    return {"seconds": seconds, "data_wait_s": wait, "data_wait_fraction": wait / seconds,
            "first_batch_wait_s": first_wait, "wait_after_first_batch_fraction": after_first / seconds,
            "teacher_s": teacher_s, "rows": rows, "steps": steps,
            "rows_per_s": rows / seconds, "final_loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run (the store is opened and "
                        "its shards checked once, in the first)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    n = args.samples
    torch.manual_seed(0)
    x, y = make_data(n)
    teachers = [mlp(D, 2048, 2048, C).eval() for _ in range(K)]
    student_init = mlp(D, 512, C).state_dict()
    tmp = Path(tempfile.mkdtemp(prefix="softtargets-bench-e2e-"))
    results: dict[str, Any] = {}
    try:
        # Stage one, once: the teachers over the transfer set into a store.
        t0 = time.perf_counter()
        w = st.create_targets(tmp / "t.zarr", num_classes=C, content="per_teacher", num_teachers=K,
                              dtype="float16", num_samples=n, shard_rows=4096)
        for a in range(0, n, 4096):
            w.write([f"s{i:06d}" for i in range(a, min(n, a + 4096))], teachers_logits(teachers, x[a:a + 4096]),
                    y[a:a + 4096])
        w.close()
        precompute_s = time.perf_counter() - t0

        def fresh_student() -> nn.Module:
            s = mlp(D, 512, C)
            s.load_state_dict(student_init)
            return s

        online = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        results["online"] = run_epochs(fresh_student(), [online] * args.epochs,
                                       lambda b: (b[0], teachers_logits(teachers, b[0]), b[1]))
        inputs = TensorDataset(x)
        for workers in (0, 1):
            ds = stream(tmp / "t.zarr", batch_size=BATCH, seed=0, dataset=inputs, by="index")
            loader = ds.loader(num_workers=workers)
            results[f"store nw={workers}"] = run_epochs(
                fresh_student(), (loader for _ in range(args.epochs)),  # the stream moves on an epoch each pass
                lambda b: (b["input"], b["teacher_logits"], b["label"]),
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    online_s = results["online"]["seconds"]
    print(f"samples={n} D={D} C={C} K={K} batch={BATCH} epochs={args.epochs}; "
          f"precompute (teachers once -> store): {precompute_s:.1f} s")
    print(f"{'run':<12} {'seconds':>8} {'rows/s':>9} {'data wait s':>12} {'wait %':>7} {'1st batch s':>12} "
          f"{'wait % after':>13} {'teacher s':>10} {'speed-up':>9}")
    for name, r in results.items():
        r["speedup_vs_online"] = online_s / r["seconds"]
        print(f"{name:<12} {r['seconds']:>8.2f} {r['rows_per_s']:>9,.0f} {r['data_wait_s']:>12.3f} "
              f"{100 * r['data_wait_fraction']:>6.1f}% {r['first_batch_wait_s']:>12.3f} "
              f"{100 * r['wait_after_first_batch_fraction']:>12.1f}% {r['teacher_s']:>10.2f} "
              f"{r['speedup_vs_online']:>8.1f}x")
    best = min((r for k, r in results.items() if k != "online"), key=lambda r: r["data_wait_fraction"])
    print(f"goal data wait <= 5 %: {'met' if best['data_wait_fraction'] <= 0.05 else 'NOT met'} "
          f"(best {100 * best['data_wait_fraction']:.1f} % of the run; "
          f"{100 * best['wait_after_first_batch_fraction']:.1f} % after its first batch)")
    report = {
        "benchmark": "end_to_end", "samples": n, "epochs": args.epochs, "input_dim": D, "classes": C, "teachers": K,
        "batch_size": BATCH,
        "temperature": T, "alpha": ALPHA, "teacher": f"MLP {D}-2048-2048-{C}", "student": f"MLP {D}-512-{C}",
        "store": "zarr, per_teacher float16 [N, 5, 1000], inputs joined by index",
        "precompute_seconds": precompute_s, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "torch": torch.__version__, "results": results,
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
