"""``softtargets train CONFIG.toml``: distil a student from a target store.

An earlier run in OUT (student.pt, metrics.json, checkpoint.pt) is refused: ``--resume`` continues
it up to ``--epochs`` epochs in all (a run that has them trains nothing and says so), ``--overwrite``
deletes those three files (nothing else) and starts afresh.

Config (relative paths are relative to the config file; its folder is appended to
``sys.path`` so factories next to it import)::

    [student]
    factory = "models:make_student"       # import path of a function returning an nn.Module
    kwargs = { hidden = [64] }

    [data]
    store = "data/targets.wds"            # store URL or path
    inputs = "packed"                     # "packed" (inputs in the store) | "dataset" (joined)
    input_key = "input"                   # packed: the batch key the student reads
    # dataset = "data:transfer_set"       # inputs = "dataset": factory of a map-style dataset
    # dataset_kwargs = {}
    # by = "key"                          # "index" | "key"
    # buffer_size = 16384                 # rows shuffled together (default ~64 MiB of logits)

    [loss]
    kind = "hinton"                       # "hinton" | "logit_matching"
    temperature = 4.0                     # or { start = 8.0, end = 2.0, schedule = "linear" } or "module:fn"
    alpha = 0.9                           # weight of the soft term
    rule = "geometric"                    # "geometric" | "arithmetic" (per-teacher stores)

    [train]
    epochs = 10
    batch_size = 64
    lr = 1e-3
    weight_decay = 0.0
    seed = 0
    num_workers = 0
    device = "cpu"                        # "cpu" | "cuda" | "cuda:1" | "auto"
    out = "runs/student"                  # student.pt, metrics.json, checkpoint.pt
    checkpoint_every = 0                  # also checkpoint every N steps (0: epoch ends only)

    [eval]                                # optional: accuracy on a map-style dataset of (x, y)
    dataset = "data:test_set"
    kwargs = {}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...text import plural
from ..config import read_toml, resolve_path, validate_config
from ..storage import add_storage_args, storage_options

if TYPE_CHECKING:
    from ...streaming.train import TrainConfig

SECTIONS: dict[str, dict[str, str]] = {
    # section -> {toml key: TrainConfig field}
    "student": {"factory": "student", "kwargs": "student_kwargs"},
    "data": {"store": "store", "inputs": "inputs", "input_key": "input_key", "dataset": "dataset",
             "dataset_kwargs": "dataset_kwargs", "by": "by", "buffer_size": "buffer_size"},
    "loss": {"kind": "loss", "temperature": "temperature", "alpha": "alpha", "rule": "rule"},
    "train": {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
              "seed": "seed", "num_workers": "num_workers", "device": "device", "out": "out",
              "checkpoint_every": "checkpoint_every"},
    "eval": {"dataset": "eval_dataset", "kwargs": "eval_kwargs"},
}
REQUIRED = {("student", "factory"), ("data", "store")}


def load_config(path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
    """A :class:`softtargets.streaming.train.TrainConfig` from a TOML file; ``overrides`` (not None) replace fields."""
    from ...streaming.train import TrainConfig

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    raw = read_toml(path)
    validate_config(raw, "train-config", path)  # schemas/train-config.schema.json
    base = path.resolve().parent
    storage = raw.pop("storage", None)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    fields: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{section}] must be a table")
        bad = sorted(set(table) - set(keys))
        if bad:
            raise ValueError(f"{path}: unknown key(s) {bad} in [{section}]; allowed: {sorted(keys)}")
        fields.update({keys[k]: v for k, v in table.items()})
    for section, key in sorted(REQUIRED):
        if SECTIONS[section][key] not in fields:
            raise ValueError(f"{path}: [{section}] needs {key}")
    fields["store"] = resolve_path(str(fields["store"]), base)
    fields["out"] = resolve_path(str(fields.get("out", "runs/student")), base)
    if storage:
        fields["storage_options"] = dict(storage)
    fields.update({k: v for k, v in overrides.items() if v is not None})  # command-line values: as given
    if str(base) not in sys.path:
        sys.path.append(str(base))
    try:
        return TrainConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def summary(metrics: dict[str, Any], metrics_path: Path, requested: int, seconds: float) -> dict[str, Any]:
    """What ``softtargets train`` reports: paths, epochs asked for, done in all, run now; the last epoch's numbers."""
    last = metrics["epochs"][-1]
    out = {"out": str(metrics_path.parent), "student": metrics["student"], "metrics": str(metrics_path),
           "epochs_requested": requested, "epochs_done": metrics["epochs_done"], "epochs_run": metrics["epochs_run"],
           "nothing_to_do": metrics["epochs_run"] == 0, "seconds": seconds, "final_loss": last["loss"],
           "accuracy_labelled": last["accuracy_labelled"], "samples_per_s": last["samples_per_s"]}
    if "eval_accuracy" in last:
        out["eval_accuracy"] = last["eval_accuracy"]
    return out


def summary_line(s: dict[str, Any]) -> str:
    """The one-line human summary of :func:`summary`."""
    done, run = s["epochs_done"], s["epochs_run"]
    if s["nothing_to_do"]:
        more = s["epochs_requested"]
        hint = "" if more >= done else f" (--epochs counts all epochs: --epochs {done + more} trains {more} more)"
        return f"train: already trained {plural(done, 'epoch')}; nothing to do{hint}; student -> {s['student']}"
    line = f"train: {plural(run, 'epoch')}" + (f" (epochs {done - run + 1}-{done} of {done})" if run != done else "")
    line += f", final loss {s['final_loss']:.4f}"
    if s["accuracy_labelled"] is not None:
        line += f", accuracy on labelled rows {s['accuracy_labelled']:.3f}"
    if "eval_accuracy" in s:
        line += f", eval accuracy {s['eval_accuracy']:.3f}"
    return f"{line}; {s['samples_per_s']:,.0f} samples/s; student -> {s['student']}"


def run(args: argparse.Namespace) -> int:
    from ...streaming.train import METRICS, TrainOutputExists, train

    cfg = load_config(args.config, store=args.store, out=args.out, epochs=args.epochs, device=args.device,
                      num_workers=args.num_workers)
    cfg.storage_options = storage_options(args, cfg.storage_options)
    started = time.perf_counter()
    try:
        metrics = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=False if args.quiet else None)
    except TrainOutputExists as e:
        raise FileExistsError(f"{e.out} holds a training run ({', '.join(e.found)}); pass --resume to continue it "
                              "or --overwrite to replace it") from None
    s = summary(metrics, Path(cfg.out) / METRICS, cfg.epochs, time.perf_counter() - started)
    print(json.dumps(s, indent=1) if args.json else summary_line(s))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a student from a target store (TOML config)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="TOML config file (format above)")
    parser.add_argument("--store", help="override [data] store")
    parser.add_argument("--out", help="override [train] out")
    parser.add_argument("--epochs", type=int, help="override [train] epochs")
    parser.add_argument("--device", help="override [train] device")
    parser.add_argument("--num-workers", type=int, help="override [train] num_workers")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue from OUT/checkpoint.pt up to --epochs in all (a run already there trains nothing)")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete OUT's student.pt, metrics.json and checkpoint.pt (nothing else) and start afresh")
    add_storage_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(run=run)
    return parser
