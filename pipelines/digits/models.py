"""Networks, training loops and evaluation for the digits pipeline (Hinton, Vinyals & Dean 2015, §3).

* teachers: MLPs regularised by dropout and +-1 pixel jitter; an ensemble of K of them is the
  "cumbersome model";
* the student: a small MLP with no regularisation at all, so that on hard labels it overfits;
* the distilled student: the same net trained with ``softtargets.distillation_loss`` on the
  teachers' STORED logits (batches from ``softtargets.stream``), no teacher in the loop.

Training is split in two: where batches come from (any iterable of tensor tuples:
:func:`tensor_batches` or :func:`store_batches`) and what a step does (:func:`hard_step`,
:func:`soft_step`); :func:`fit` joins them.

Shapes: images ``x`` ``float32 [B, 64]``; labels ``int64 [B]`` (-1 = unlabelled);
per-teacher logits ``[B, K, C]`` (float16 as stored; the loss upcasts), C = 10.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import softtargets as st

from .data import NUM_CLASSES, NUM_FEATURES, jitter

Rule = Literal["geometric", "arithmetic"]
Batch = Sequence[torch.Tensor]
Step = Callable[[nn.Module, Batch], torch.Tensor]


class MLP(nn.Module):
    """ReLU MLP ``[B, 64] -> [B, 10]`` logits, with optional input and hidden dropout."""

    def __init__(self, hidden: Sequence[int], dropout_in: float = 0.0, dropout_hidden: float = 0.0,
                 in_features: int = NUM_FEATURES, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout_in)] if dropout_in > 0 else []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout_hidden > 0:
                layers.append(nn.Dropout(dropout_hidden))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` float32."""
        return self.net(x)


def make_teacher(hidden: Sequence[int] = (512, 512), dropout_in: float = 0.2, dropout_hidden: float = 0.5) -> MLP:
    """A teacher: the big regularised net (paper: 2x1200 ReLU with dropout; here 2x512 on 64 pixels).

    Importable as ``pipelines.digits.models:make_teacher``, so a precompute config can load a
    saved teacher by factory + weights.
    """
    return MLP(hidden, dropout_in, dropout_hidden)


def make_student(hidden: Sequence[int] = (100, 100)) -> MLP:
    """The student: small and unregularised (paper: 2x800 on MNIST; here 2x100)."""
    return MLP(hidden)


# --------------------------------------------------------------------------- batches


def tensor_batches(tensors: Sequence[torch.Tensor], batch_size: int, epochs: int, seed: int,
                   transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
                   ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Shuffled minibatches over aligned tensors for ``epochs`` passes, reproducible from ``seed``.

    Yields one slice per tensor; ``transform`` (e.g. jitter) is applied to the FIRST tensor of each batch.
    """
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError("tensors must share their first dimension")
    g = torch.Generator().manual_seed(int(seed))
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, int(batch_size)):
            i = perm[start : start + int(batch_size)]
            batch = [t[i] for t in tensors]
            if transform is not None:
                batch[0] = transform(batch[0], g)
            yield tuple(batch)


def store_batches(stream: st.TargetStream, epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(x [B, 64], teacher_logits [B, K, C] as stored, labels [B])`` from a stream joined with inputs.

    ``stream`` is ``softtargets.stream(store, dataset=..., by="key")``: its batches carry the
    joined dataset's images as ``"input"``. One pass per epoch, reshuffled per ``(seed, epoch)``.
    """
    for epoch in range(int(epochs)):
        stream.set_epoch(epoch)
        for b in stream:
            yield b["input"], b["teacher_logits"], b["label"]


# --------------------------------------------------------------------------- steps


def hard_step(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of one ``(x, y)`` batch with its hard labels."""
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def soft_step(temperature: float, alpha: float, rule: Rule) -> Step:
    """One ``(x, teacher_logits, y)`` batch under Hinton's loss (``softtargets.distillation_loss``):
    ``alpha * T^2 * CE(p_T, q_T) + (1 - alpha) * CE(y, q_1)``; rows with ``y = -1`` get the soft term only."""

    def step(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, v, y = batch
        return st.distillation_loss(model(x), v, y, temperature, alpha, rule)

    return step


def fit(model: nn.Module, batches: Iterable[Batch], step: Step, lr: float, weight_decay: float = 0.0
        ) -> dict[str, float]:
    """Adam over every batch ``batches`` yields; returns ``{"steps", "seconds", "last_loss"}``.

    The model is left in eval mode.
    """
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    t0 = time.perf_counter()
    steps, loss = 0, torch.tensor(float("nan"))
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = step(model, batch)
        loss.backward()
        opt.step()
        steps += 1
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "last_loss": float(loss.detach())}


def train_teacher(seed: int, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any]) -> tuple[MLP, dict[str, float]]:
    """One teacher from ``cfg`` (the config's ``[teacher]`` table): dropout + jitter on ``jitter_prob`` of rows."""
    torch.manual_seed(int(seed))
    model = make_teacher(cfg["hidden"], cfg["dropout_in"], cfg["dropout_hidden"])
    shift, prob = int(cfg["jitter"]), float(cfg["jitter_prob"])
    batches = tensor_batches((x, y), cfg["batch_size"], cfg["epochs"], seed,
                             transform=lambda b, g: jitter(b, shift, g, prob))
    return model, fit(model, batches, hard_step, cfg["lr"], cfg["weight_decay"])


def train_student(seed: int, batches: Iterable[Batch], step: Step, cfg: dict[str, Any]) -> tuple[MLP, dict[str, float]]:
    """A fresh student (``cfg`` = the ``[student]`` table), seeded by ``seed``, trained on ``batches``."""
    torch.manual_seed(int(seed))
    model = make_student(cfg["hidden"])
    return model, fit(model, batches, step, cfg["lr"])


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits ``[N, C]``."""
    model.eval()
    return model(x)


@torch.no_grad()
def teacher_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Per-teacher logits ``[N, K, C]`` float32, zero-meaned per row (as a store holds them)."""
    v = torch.stack([predict_logits(m, x) for m in models], dim=1)
    return v - v.mean(dim=-1, keepdim=True)


def errors(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Misclassified rows of ``[N, C]`` scores against ``y``."""
    return int((logits.argmax(dim=-1) != y).sum())


def ensemble_errors(per_teacher: torch.Tensor, y: torch.Tensor, rule: Rule) -> int:
    """Errors of the ensemble's T = 1 prediction from ``[N, K, C]`` logits under ``rule``."""
    return errors(st.ensemble_log_probs(per_teacher, 1.0, rule), y)


def fit_bias_shift(logits: torch.Tensor, y: torch.Tensor, cls: int, grid: Sequence[float]) -> tuple[float, float]:
    """The bias added to class ``cls``'s logit that maximises overall accuracy on ``(logits, y)``.

    Returns ``(shift, accuracy)``. Overall accuracy, not the class's own recall (which only grows
    with the shift), trades recovered ``cls`` rows against rows of other classes it steals. Ties:
    the middle of the first run of best values.
    """
    accs = []
    for b in grid:
        z = logits.clone()
        z[:, cls] += b
        accs.append(float((z.argmax(-1) == y).float().mean()))
    best = max(accs)
    first = [i for i, a in enumerate(accs) if a == best]
    run = [first[0]]
    for i in first[1:]:
        if i != run[-1] + 1:
            break
        run.append(i)
    return float(grid[run[len(run) // 2]]), best


def bias_grid(start: float, stop: float, step: float) -> list[float]:
    """``start, start + step, ..., stop`` (inclusive), rounded to 6 decimals."""
    return [round(float(v), 6) for v in np.arange(start, stop + step / 2, step)]


def class_accuracy(logits: torch.Tensor, y: torch.Tensor, cls: int, shift: float = 0.0) -> float:
    """Accuracy on the rows of class ``cls`` after adding ``shift`` to that class's logit."""
    z = logits.clone()
    z[:, cls] += shift
    rows = y == cls
    return float((z[rows].argmax(-1) == cls).float().mean())
