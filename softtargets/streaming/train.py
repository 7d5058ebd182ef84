"""Train a student from a target store: the loop behind ``softtargets train``.

Generic by design: the student comes from a factory import path, its inputs either packed in
the store (wds ``sample`` layout) or from a map-style dataset joined by row index or sample key,
the teacher logits from :func:`softtargets.stream`, the loss from :mod:`softtargets.math.losses`.
Per epoch it logs the loss, the accuracy on labelled rows and samples/s; it checkpoints the
student, optimizer, loss step counter and stream position (atomically) so a crashed run
resumes with exactly the batches it had not trained on. An earlier run's files in the output
folder are never replaced unless asked (``overwrite``), and then only those files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..choices import JoinBy, Loss, Rule, ScheduleKind, choices, parse_choice
from ..errors import TrainOutputExists
from ..importing import import_object
from ..math.losses import DistillationLoss, logit_matching_loss
from ..store import open_targets
from . import stream
from .dataset import TargetStream

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
STUDENT = "student.pt"
OUTPUTS = (STUDENT, METRICS, CHECKPOINT)  # everything train writes in ``out`` (and their ``.tmp`` while saving)
LOSSES = choices(Loss)
SCHEDULES = choices(ScheduleKind)


@dataclass
class TrainConfig:
    """Everything one training run needs. Paths are used as given (the CLI resolves them).

    ``student``, ``dataset``, ``eval_dataset``: import paths ``"package.module:attr"`` of factories
    (called with the matching ``*_kwargs``). ``inputs``: ``"packed"`` (the store's packed inputs,
    batch key ``input_key``) or ``"dataset"`` (``dataset`` joined ``by`` ``"index"`` or ``"key"``).
    ``temperature``: a number, ``{"start", "end", "schedule": linear|cosine|exponential}`` over all
    steps, or an import path of a function ``step -> T``. ``loss``: ``"hinton"`` (``alpha * T^2 *
    soft CE + (1 - alpha) * hard CE`` on labelled rows) or ``"logit_matching"``.
    """

    store: str
    student: str
    out: str
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: str = "packed"
    input_key: str = "input"
    dataset: str | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    by: JoinBy = "index"
    temperature: float | dict[str, Any] | str = 4.0
    alpha: float = 0.9
    rule: Rule = "geometric"
    loss: Loss = "hinton"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    num_workers: int = 0
    buffer_size: int | None = None
    device: str = "cpu"
    checkpoint_every: int = 0
    eval_dataset: str | None = None
    eval_kwargs: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # never recorded (credentials)

    def record(self) -> dict[str, Any]:
        """The config as ``metrics.json`` records it: every field but ``storage_options``."""
        out = dataclasses.asdict(self)
        out.pop("storage_options", None)
        return out

    def __post_init__(self) -> None:
        if self.inputs not in ("packed", "dataset"):
            raise ValueError(f"inputs must be 'packed' or 'dataset', got {self.inputs!r}")
        if self.inputs == "dataset" and not self.dataset:
            raise ValueError("inputs = 'dataset' needs dataset = 'package.module:factory'")
        parse_choice("loss", self.loss, Loss)
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")


def make_temperature(spec: float | dict[str, Any] | str, total_steps: int) -> float | Callable[[int], float]:
    """A fixed T, a schedule ``{"start", "end", "schedule"}`` over ``total_steps``, or an imported ``step -> T``."""
    if isinstance(spec, str):
        fn = import_object(spec, "temperature schedule")
        if not callable(fn):
            raise ValueError(f"temperature schedule {spec!r} is not callable")
        return fn
    if isinstance(spec, dict):
        unknown = set(spec) - {"start", "end", "schedule"}
        if unknown or not {"start", "end"} <= set(spec):
            raise ValueError(f"a temperature schedule is {{start, end, schedule}}, got {spec!r}")
        return Schedule(float(spec["start"]), float(spec["end"]), spec.get("schedule", "linear"), total_steps)
    return float(spec)


@dataclass(frozen=True)
class Schedule:
    """T from ``start`` (step 0) to ``end`` (the last step): linear, cosine or exponential."""

    start: float
    end: float
    kind: ScheduleKind
    total_steps: int

    def __post_init__(self) -> None:
        parse_choice("temperature schedule", self.kind, ScheduleKind)
        if min(self.start, self.end) <= 0:
            raise ValueError(f"temperatures must be > 0, got start={self.start}, end={self.end}")

    def __call__(self, step: int) -> float:
        f = min(max(step / max(self.total_steps - 1, 1), 0.0), 1.0)
        if self.kind == "cosine":
            f = 0.5 - 0.5 * math.cos(math.pi * f)
        if self.kind == "exponential":
            return self.start * (self.end / self.start) ** f
        return self.start + (self.end - self.start) * f


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def build_stream(cfg: TrainConfig) -> TargetStream:
    """The training stream: packed inputs, or the joined dataset's items as ``input``."""
    store = open_targets(cfg.store, storage_options=cfg.storage_options)
    common: dict[str, Any] = dict(batch_size=cfg.batch_size, seed=cfg.seed, buffer_size=cfg.buffer_size)
    if cfg.inputs == "packed" or cfg.dataset is None:  # TrainConfig requires a dataset for inputs = 'dataset'
        if not store.manifest.inputs:
            raise ValueError(
                f"{cfg.store} packs no inputs; set inputs = 'dataset' and a dataset factory to join"
            )
        return stream(store, **common)
    dataset = import_object(cfg.dataset, "dataset")(**cfg.dataset_kwargs)
    return stream(store, **common, inputs=False, dataset=dataset, by=cfg.by)


@torch.no_grad()
def evaluate(student: nn.Module, dataset: Any, device: torch.device, batch_size: int = 512) -> float:
    """Accuracy of ``student`` on a map-style dataset of ``(x, y)``."""
    student.eval()
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        pred = student(_as_input(x, device)).argmax(dim=-1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    student.train()
    return correct / max(total, 1)


def _as_input(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        x = x.to(device, non_blocking=True)
        return x.float() if x.is_floating_point() and x.dtype == torch.float64 else x
    return x


def _input_of(batch: dict[str, Any], key: str) -> Any:
    """The student's input ``batch[key]``; a missing key raises naming the keys the batch has."""
    if key not in batch:
        raise ValueError(f"input_key {key!r} is not in the batches; they hold {', '.join(map(repr, sorted(batch)))}: "
                         "set [data] input_key to the input's key")
    return batch[key]


def _forward(student: nn.Module, x: Any, name: str) -> torch.Tensor:
    """``student(x)``; an error there (typically inputs of another shape than the student takes) names the
    student and the input's shape."""
    try:
        return student(x)
    except (RuntimeError, TypeError, ValueError) as exc:
        shape = list(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise RuntimeError(f"student {name!r} failed on an input batch of shape {shape}: {exc}; check the "
                           "student's kwargs against the inputs") from exc


def run_files(out: Path) -> list[str]:
    """Names of train's own files (:data:`OUTPUTS` and their ``.tmp`` leftovers) present in folder ``out``."""
    if not out.is_dir():
        return []
    names = {*OUTPUTS, *(name + ".tmp" for name in OUTPUTS)}
    return sorted(p.name for p in out.iterdir() if p.name in names and (p.is_file() or p.is_symlink()))


def prepare_out(out: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Make folder ``out`` ready for a run, as ``precompute`` treats its store.

    A new run refuses an earlier run's files; ``overwrite`` deletes exactly those files (never a
    folder, never a file train does not write); ``resume`` needs the earlier run's checkpoint.

    Raises:
        TrainOutputExists: ``out`` holds ``student.pt``, ``metrics.json`` or ``checkpoint.pt`` and
            neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: ``resume`` and no ``checkpoint.pt`` in ``out``.
        NotADirectoryError: ``out`` is a file.
    """
    if resume and overwrite:
        raise ValueError("pass resume=True or overwrite=True, not both")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, but a training run writes a folder there; choose another out")
    found = run_files(out)
    if resume:
        if CHECKPOINT not in found:
            raise FileNotFoundError(f"cannot resume: {out / CHECKPOINT} does not exist; start a new run instead")
        return
    if not overwrite and set(found) & set(OUTPUTS):
        raise TrainOutputExists(out, found)
    for name in found:
        (out / name).unlink()  # a symlink is removed, not followed
    out.mkdir(parents=True, exist_ok=True)


def read_checkpoint(out: Path) -> dict[str, Any]:
    """The state in ``out/checkpoint.pt``: ``student``, ``optimizer``, ``criterion``, ``stream`` state dicts,
    ``history`` (one metrics row per finished epoch), ``partial`` (sums of an unfinished epoch, ``{}`` at an
    epoch's end) and the RNG states."""
    return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)


class _Checkpointer:
    def __init__(self, out: Path, student: nn.Module, opt: torch.optim.Optimizer, criterion: nn.Module,
                 ds: TargetStream):
        self.path, self.student, self.opt, self.criterion, self.ds = out / CHECKPOINT, student, opt, criterion, ds

    def save(self, history: list[dict[str, Any]], partial: dict[str, float]) -> None:
        _atomic_save({
            "student": self.student.state_dict(), "optimizer": self.opt.state_dict(),
            "criterion": self.criterion.state_dict(), "stream": self.ds.state_dict(),
            "history": history, "partial": partial, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }, self.path)

    def load(self, state: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        self.student.load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.criterion.load_state_dict(state["criterion"])
        self.ds.load_state_dict(state["stream"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["history"], state["partial"]


def _already_trained(cfg: TrainConfig, out: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a run whose checkpoint has ``cfg.epochs`` or more finished epochs: nothing is trained.

    ``student.pt`` is written at every epoch's end; only when it is missing is it written again, from
    a checkpoint taken at an epoch's end (one taken partway through a later epoch holds other weights).
    """
    history = state["history"]
    student, metrics_path = out / STUDENT, out / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {"config": cfg.record()}
    if not student.exists():
        if state["partial"]:
            raise ValueError(f"cannot resume {out} for {cfg.epochs} epochs: its checkpoint is partway through "
                             f"epoch {len(history) + 1}; resume for {len(history) + 1} or more epochs to finish it")
        _atomic_save(state["student"], student)
        metrics.update(epochs=history, epochs_done=len(history), student=str(student))
        _atomic_json(metrics, metrics_path)
    return {**metrics, "epochs": history, "epochs_done": len(history), "epochs_run": 0, "student": str(student)}


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None) -> dict[str, Any]:
    """Train per ``cfg``; write ``student.pt`` (state_dict), ``metrics.json`` and ``checkpoint.pt`` to ``cfg.out``.

    All three are written (atomically) at every epoch's end, ``checkpoint.pt`` also every
    ``checkpoint_every`` steps. ``cfg.epochs`` counts all epochs of the run, resumed or not.

    Args:
        cfg: the run's settings.
        resume: continue from ``checkpoint.pt``: the stream yields exactly the batches not yet
            trained on. A run that has finished ``cfg.epochs`` epochs already trains nothing
            (``epochs_run`` 0) and its files are left as they are.
        overwrite: delete an earlier run's ``student.pt``, ``metrics.json`` and ``checkpoint.pt``
            in ``cfg.out`` (nothing else) and start afresh.
        progress: a tqdm bar per epoch and a line per finished epoch, on stderr. ``None``: the bar
            only when stderr is a terminal (tqdm's own rule), the lines always; ``False``: neither.

    Returns:
        The metrics (also in ``metrics.json``): ``config``, ``steps_per_epoch``, ``epochs`` (one row
        per finished epoch of the run), ``epochs_done`` (their number), ``epochs_run`` (those this
        call trained, a resumed partial epoch included) and ``student`` (the path of ``student.pt``).

    Raises:
        TrainOutputExists: ``cfg.out`` holds an earlier run and neither ``resume`` nor ``overwrite``.
    """
    out = Path(cfg.out)
    prepare_out(out, resume=resume, overwrite=overwrite)
    state = read_checkpoint(out) if resume else None
    if state is not None and len(state["history"]) >= cfg.epochs:
        return _already_trained(cfg, out, state)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    factory = import_object(cfg.student, "student factory")
    student = factory(**cfg.student_kwargs)
    if not isinstance(student, nn.Module):
        raise ValueError(f"student factory {cfg.student!r} returned {type(student).__name__}, not a torch Module")
    student.to(device).train()
    ds = build_stream(cfg)
    steps_per_epoch = ds.batches_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.store}: no batches of {cfg.batch_size} rows to train on")
    criterion = DistillationLoss(make_temperature(cfg.temperature, cfg.epochs * steps_per_epoch), cfg.alpha, cfg.rule)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = _Checkpointer(out, student, opt, criterion, ds)
    eval_set = import_object(cfg.eval_dataset, "eval dataset")(**cfg.eval_kwargs) if cfg.eval_dataset else None
    history, partial = ckpt.load(state) if state is not None else ([], {})
    done_before = len(history)
    metrics: dict[str, Any] = {"config": cfg.record(), "steps_per_epoch": steps_per_epoch,
                               "epochs": history, "epochs_done": done_before, "epochs_run": 0}
    loader = ds.loader(num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    while ds.epoch < cfg.epochs:
        epoch = ds.epoch
        sums = {"loss": 0.0, "samples": 0, "labelled": 0, "correct": 0, "seconds": 0.0, **partial}
        partial = {}
        bar = tqdm(total=steps_per_epoch, initial=steps_per_epoch - len(ds), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", disable=None if progress is None else not progress, leave=False, mininterval=0.5)
        tick = time.perf_counter()
        for batch in loader:
            x = _as_input(_input_of(batch, cfg.input_key), device)
            v = batch["teacher_logits"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            z = _forward(student, x, cfg.student)
            loss = criterion(z, v, y) if cfg.loss == "hinton" else logit_matching_loss(z, v, cfg.rule)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = len(y)
            labelled = y >= 0
            sums["loss"] += float(loss.detach()) * n
            sums["samples"] += n
            sums["labelled"] += int(labelled.sum())
            sums["correct"] += int((z.argmax(dim=-1) == y)[labelled].sum())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
            done = steps_per_epoch - len(ds)  # batches of this epoch trained on
            if cfg.checkpoint_every and ds.epoch == epoch and done % cfg.checkpoint_every == 0:
                ckpt.save(history, {**sums, "seconds": sums["seconds"] + time.perf_counter() - tick})
        bar.close()
        seconds = sums["seconds"] + time.perf_counter() - tick
        row = {
            "epoch": epoch + 1, "loss": sums["loss"] / max(sums["samples"], 1),
            "accuracy_labelled": sums["correct"] / sums["labelled"] if sums["labelled"] else None,
            "labelled": int(sums["labelled"]), "samples": int(sums["samples"]), "seconds": seconds,
            "samples_per_s": sums["samples"] / max(seconds, 1e-9),
            "temperature": criterion.current_temperature() if cfg.loss == "hinton" else None,
        }
        if eval_set is not None:
            row["eval_accuracy"] = evaluate(student, eval_set, device)
        history.append(row)
        if progress is not False:
            tqdm.write(_epoch_line(row), file=sys.stderr)
        _atomic_save(student.state_dict(), out / STUDENT)
        ckpt.save(history, {})
        metrics.update(epochs_done=len(history), epochs_run=len(history) - done_before, student=str(out / STUDENT))
        _atomic_json(metrics, out / METRICS)
    return metrics


def _epoch_line(row: dict[str, Any]) -> str:
    acc = row["accuracy_labelled"]
    parts = [f"epoch {row['epoch']}", f"loss {row['loss']:.4f}",
             f"acc(labelled) {acc:.3f}" if acc is not None else "acc(labelled) -",
             f"{row['samples_per_s']:,.0f} samples/s"]
    if "eval_accuracy" in row:
        parts.append(f"eval acc {row['eval_accuracy']:.3f}")
    return "  ".join(parts)
