"""Models, data split and training loops for the digits distillation pipeline.

A small-scale replay of Hinton, Vinyals & Dean (2015), section 3, on scikit-learn's
``load_digits`` (1797 8x8 grey images, 10 classes, bundled with scikit-learn):

* teachers: regularised MLPs (dropout, +-1 pixel jitter), an ensemble of K of them;
* a small unregularised student trained on hard labels (it overfits);
* the same student distilled from the ensemble's PRECOMPUTED logits at temperature T;
* the "mythical digit": one class left out of the transfer set, recovered by a bias shift.

Training is split in two: *where batches come from* (any iterable of tensors; here
:func:`tensor_batches`, later the package's streaming reader) and *what a step does*
(:func:`hard_step`, :func:`soft_step`). :func:`fit` joins them.

Shapes: images ``x`` are ``float32 [N, 64]`` in [0, 1]; labels ``int64 [N]``;
per-teacher logits ``float32 [N, K, C]`` with C = 10.

The distillation loss here is a local stand-in for ``softtargets.losses`` (wired in later).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Rule = Literal["geometric", "arithmetic"]
NUM_CLASSES = 10
NUM_FEATURES = 64
SIDE = 8

#: Recommended configuration (chosen by the measurements in explore.py; see its docstring).
DEFAULTS: dict[str, Any] = {
    "split": {"seed": 0, "fractions": (0.6, 0.2, 0.2)},
    # 2x512 rather than the paper's 2x1200: ~5x cheaper on CPU. Jitter on only half the rows:
    # a 1-pixel shift of an 8x8 image is a large move (~4 px on 32x32), and jittering every
    # row cost the ensemble 14-22 validation errors vs 6-8 at jitter_prob 0.5 (measured).
    "teacher": {
        "hidden": (512, 512),
        "dropout_in": 0.2,
        "dropout_hidden": 0.5,
        "jitter": 1,
        "jitter_prob": 0.5,
        "epochs": 150,
        "batch_size": 128,
        "lr": 1e-3,
        "weight_decay": 0.0,
    },
    "ensemble": {"k": 5, "seeds": (100, 101, 102, 103, 104)},
    # 2x100, unregularised: overfits hard labels (train loss -> 0, ~11 test errors vs the
    # ensemble's 7) yet has the capacity to imitate the ensemble when distilled.
    "student": {"hidden": (100, 100), "epochs": 200, "batch_size": 128, "lr": 3e-3},
    # transfer set = the training split itself, as in the paper (augmented copies are
    # supported by ``transfer_set`` but measured no better for small students).
    "distill": {
        "temperatures": (1.0, 2.0, 4.0, 8.0, 20.0),
        "alphas": (0.3, 0.5),
        "rules": ("geometric", "arithmetic"),
        "transfer_copies": 0,
    },
    "student_seeds": (0, 1, 2),
    # bias shift of the left-out class: grid (start, stop, step), chosen by overall val accuracy
    "mythical": {"digit": 3, "bias_grid": (0.0, 15.0, 0.1), "criterion": "val_accuracy"},
    # 1 thread: these models are small; under CPU contention 2 threads cost up to 10x CPU time
    "threads": 1,
}


# --------------------------------------------------------------------------- data


@dataclass
class DigitsSplit:
    """A fixed train / validation / test split of ``load_digits``.

    ``x_*`` are ``float32 [n, 64]`` scaled to [0, 1] (raw pixels are 0..16);
    ``y_*`` are ``int64 [n]``; ``idx_*`` are ``int64`` numpy row indices into the
    full 1797-row dataset, sorted, so a result file can record exactly which rows it used.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    idx_train: np.ndarray
    idx_val: np.ndarray
    idx_test: np.ndarray
    seed: int = 0
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    meta: dict[str, Any] = field(default_factory=dict)

    def indices(self) -> dict[str, list[int]]:
        """The split as plain lists (JSON-ready)."""
        return {
            "train": self.idx_train.tolist(),
            "val": self.idx_val.tolist(),
            "test": self.idx_test.tolist(),
        }


def load_split(seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> DigitsSplit:
    """Stratified, seeded train/val/test split of ``sklearn.datasets.load_digits``.

    Deterministic for a given ``seed`` and ``fractions`` (scikit-learn's
    ``train_test_split`` with ``random_state``). Sizes at the defaults: 1078 / 359 / 360.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not math.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    idx = np.arange(len(y))
    idx_train, idx_rest = train_test_split(idx, train_size=fractions[0], stratify=y, random_state=seed)
    val_share = fractions[1] / (fractions[1] + fractions[2])
    idx_val, idx_test = train_test_split(
        idx_rest, train_size=val_share, stratify=y[idx_rest], random_state=seed
    )
    idx_train, idx_val, idx_test = (np.sort(i).astype(np.int64) for i in (idx_train, idx_val, idx_test))

    def t(i: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x[i]), torch.from_numpy(y[i])

    (xtr, ytr), (xva, yva), (xte, yte) = t(idx_train), t(idx_val), t(idx_test)
    return DigitsSplit(xtr, ytr, xva, yva, xte, yte, idx_train, idx_val, idx_test, seed, tuple(fractions))


def jitter(
    x: torch.Tensor,
    max_shift: int = 1,
    generator: torch.Generator | None = None,
    prob: float = 1.0,
) -> torch.Tensor:
    """Shift each 8x8 image by a random (dy, dx) in ``[-max_shift, max_shift]^2``, zero fill.

    ``x``: ``float32 [N, 64]`` -> same shape. Each row draws its own shift; with ``prob < 1``
    a row is left unshifted with probability ``1 - prob``.
    """
    if max_shift <= 0 or prob <= 0:
        return x
    n = x.shape[0]
    m = max_shift
    img = x.reshape(n, SIDE, SIDE)
    padded = torch.nn.functional.pad(img, (m, m, m, m))
    dy = torch.randint(0, 2 * m + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=generator)
    if prob < 1:
        keep = torch.rand(n, generator=generator) >= prob
        dy[keep] = m
        dx[keep] = m
    rows = (dy[:, None] + torch.arange(SIDE)[None, :])[:, :, None]  # [N, 8, 1]
    cols = (dx[:, None] + torch.arange(SIDE)[None, :])[:, None, :]  # [N, 1, 8]
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    return out.reshape(n, NUM_FEATURES)


def jittered_copies(x: torch.Tensor, copies: int, seed: int, max_shift: int = 1) -> torch.Tensor:
    """The rows of ``x`` followed by ``copies`` jittered copies of them: ``[N * (1 + copies), 64]``."""
    return transfer_set(x, copies, seed, kind="jitter", strength=max_shift)


def transfer_set(
    x: torch.Tensor,
    copies: int,
    seed: int,
    kind: Literal["jitter", "noise", "mixup"] = "mixup",
    strength: float = 1.0,
) -> torch.Tensor:
    """The rows of ``x`` followed by ``copies`` augmented copies: ``float32 [N * (1 + copies), 64]``.

    A transfer set needs no labels (the teachers label it), so it may be larger than the
    labelled set. Kinds of copy:

    * ``"jitter"``: every image shifted by up to ``int(strength)`` pixels (zero fill);
    * ``"noise"``: Gaussian pixel noise of std ``strength``, clipped to [0, 1];
    * ``"mixup"``: ``lam * x_i + (1 - lam) * x_j`` for a random partner ``j``,
      ``lam ~ Beta(strength, strength)`` (the MUNGE / "function matching" idea: points between
      training images, where the teachers' soft targets carry the most information).

    Row order: the originals first (rows ``0..N-1``), then copy 1, copy 2, ...
    """
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    parts = [x]
    for _ in range(copies):
        if kind == "jitter":
            parts.append(jitter(x, int(strength), g))
        elif kind == "noise":
            parts.append((x + strength * torch.randn(x.shape, generator=g)).clamp(0, 1))
        elif kind == "mixup":
            partner = torch.randint(0, n, (n,), generator=g)
            lam = _beta(float(strength), n, g)
            parts.append(lam[:, None] * x + (1 - lam[:, None]) * x[partner])
        else:
            raise ValueError(f"unknown transfer kind {kind!r}")
    return torch.cat(parts).contiguous()


def _beta(a: float, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` draws of Beta(a, a), reproducible from ``g`` (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.beta(a, a, size=n).astype(np.float32))


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """ReLU MLP ``[B, 64] -> [B, 10]`` logits, optional input/hidden dropout."""

    def __init__(
        self,
        hidden: Sequence[int],
        dropout_in: float = 0.0,
        dropout_hidden: float = 0.0,
        in_features: int = NUM_FEATURES,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if dropout_in > 0:
            layers.append(nn.Dropout(dropout_in))
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout_hidden > 0:
                layers.append(nn.Dropout(dropout_hidden))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]``."""
        return self.net(x)


def make_teacher(
    hidden: Sequence[int] = DEFAULTS["teacher"]["hidden"],
    dropout_in: float = DEFAULTS["teacher"]["dropout_in"],
    dropout_hidden: float = DEFAULTS["teacher"]["dropout_hidden"],
) -> MLP:
    """The big regularised net (paper: 2x1200 ReLU, dropout; here the same on 64 inputs)."""
    return MLP(hidden, dropout_in, dropout_hidden)


def make_student(hidden: Sequence[int] = DEFAULTS["student"]["hidden"]) -> MLP:
    """The small net, no regularisation at all (so that on hard labels it overfits)."""
    return MLP(hidden)


# --------------------------------------------------------------------------- batches


def tensor_batches(
    tensors: Sequence[torch.Tensor],
    batch_size: int,
    epochs: int,
    seed: int,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Shuffled minibatches over aligned tensors, ``epochs`` passes, reproducible from ``seed``.

    Yields tuples of slices, one per tensor (same first-axis rows). ``transform`` (e.g.
    :func:`jitter`) is applied to the FIRST tensor of each batch. ``batch_size <= 0`` means
    full batch. Any other iterable of the same tuples can replace this in :func:`fit`.
    """
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError("tensors must share their first dimension")
    bs = n if batch_size <= 0 else batch_size
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, bs):
            i = perm[start : start + bs]
            batch = [t[i] for t in tensors]
            if transform is not None:
                batch[0] = transform(batch[0], g)
            yield tuple(batch)


# --------------------------------------------------------------------------- losses and steps


def ensemble_targets(teacher_logits: torch.Tensor, temperature: float, rule: Rule) -> torch.Tensor:
    """Soft targets ``[B, C]`` from per-teacher logits ``[B, K, C]`` (or ``[B, C]``: one teacher).

    geometric: ``softmax(mean_k v_k / T)``; arithmetic: ``mean_k softmax(v_k / T)``.
    """
    if teacher_logits.dim() == 2:
        return torch.softmax(teacher_logits / temperature, dim=-1)
    if rule == "geometric":
        return torch.softmax(teacher_logits.mean(dim=-2) / temperature, dim=-1)
    if rule == "arithmetic":
        return torch.softmax(teacher_logits / temperature, dim=-1).mean(dim=-2)
    raise ValueError(f"unknown rule {rule!r}")


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    rule: Rule = "geometric",
) -> torch.Tensor:
    """``alpha * T^2 * CE(p_T, q_T) + (1 - alpha) * CE(y, q_1)``, mean over the batch.

    ``p_T`` are the ensemble's soft targets, ``q_T = softmax(z / T)`` the student's.
    With ``labels=None`` (an unlabelled transfer batch) only the soft term is used.
    """
    p = ensemble_targets(teacher_logits, temperature, rule)
    soft = -(p * torch.log_softmax(student_logits / temperature, dim=-1)).sum(dim=-1).mean()
    loss = alpha * temperature**2 * soft
    if labels is not None and alpha < 1:
        loss = loss + (1 - alpha) * nn.functional.cross_entropy(student_logits, labels)
    return loss


Step = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]


def hard_step(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Loss of one ``(x, y)`` batch: cross-entropy with the hard labels."""
    x, y = batch[0], batch[1]
    return nn.functional.cross_entropy(model(x), y)


def soft_step(temperature: float, alpha: float, rule: Rule = "geometric") -> Step:
    """Loss of one ``(x, teacher_logits[B,K,C], y)`` batch under :func:`hinton_loss`.

    ``y`` may be missing (a 2-tuple) or contain -1 for unlabelled rows; those rows get the
    soft term only.
    """

    def step(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, v = batch[0], batch[1]
        y = batch[2] if len(batch) > 2 else None
        z = model(x)
        if y is None or bool((y >= 0).all()):
            return hinton_loss(z, v, y, temperature, alpha, rule)
        p = ensemble_targets(v, temperature, rule)
        soft = -(p * torch.log_softmax(z / temperature, dim=-1)).sum(dim=-1).mean()
        lab = y >= 0
        hard = nn.functional.cross_entropy(z[lab], y[lab]) if bool(lab.any()) else z.sum() * 0
        return alpha * temperature**2 * soft + (1 - alpha) * hard

    return step


def fit(
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    step: Step,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
) -> dict[str, float]:
    """Adam over every batch the iterable yields; returns ``{"steps", "seconds", "last_loss"}``.

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


# --------------------------------------------------------------------------- train functions


def train_teacher(
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batches: Iterable[Sequence[torch.Tensor]] | None = None,
    **overrides: Any,
) -> tuple[MLP, dict[str, float]]:
    """Train one regularised teacher (dropout + jitter); returns ``(model, fit stats)``.

    ``overrides`` replace keys of ``DEFAULTS["teacher"]``. ``batches`` (an iterable of
    ``(x, y)``) replaces the built-in jittered minibatch loader.
    """
    cfg = {**DEFAULTS["teacher"], **overrides}
    torch.manual_seed(seed)
    model = make_teacher(cfg["hidden"], cfg["dropout_in"], cfg["dropout_hidden"])
    if batches is None:
        shift, prob = int(cfg["jitter"]), float(cfg["jitter_prob"])
        batches = tensor_batches(
            (x, y), cfg["batch_size"], cfg["epochs"], seed, transform=lambda b, g: jitter(b, shift, g, prob)
        )
    stats = fit(model, batches, hard_step, cfg["lr"], cfg["weight_decay"])
    return model, stats


def train_student_hard(
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batches: Iterable[Sequence[torch.Tensor]] | None = None,
    **overrides: Any,
) -> tuple[MLP, dict[str, float]]:
    """Train the unregularised student on hard labels; returns ``(model, fit stats)``.

    ``overrides`` replace keys of ``DEFAULTS["student"]``.
    """
    cfg = {**DEFAULTS["student"], **overrides}
    torch.manual_seed(seed)
    model = make_student(cfg["hidden"])
    if batches is None:
        batches = tensor_batches((x, y), cfg["batch_size"], cfg["epochs"], seed)
    stats = fit(model, batches, hard_step, cfg["lr"])
    return model, stats


def train_student_soft(
    seed: int,
    x: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    rule: Rule = "geometric",
    *,
    batches: Iterable[Sequence[torch.Tensor]] | None = None,
    **overrides: Any,
) -> tuple[MLP, dict[str, float]]:
    """Distil the student from PRECOMPUTED per-teacher logits; returns ``(model, fit stats)``.

    ``x``: ``[N, 64]`` transfer inputs; ``teacher_logits``: ``[N, K, C]`` (or ``[N, C]``);
    ``labels``: ``int64 [N]`` with -1 for unlabelled rows, or None (soft term only).
    ``batches`` — an iterable of ``(x, teacher_logits, labels)`` tuples, e.g. the package's
    streaming reader — replaces the built-in loader, and then ``x``/``teacher_logits``/
    ``labels`` are ignored. ``overrides`` replace keys of ``DEFAULTS["student"]``.
    """
    cfg = {**DEFAULTS["student"], **overrides}
    torch.manual_seed(seed)
    model = make_student(cfg["hidden"])
    if batches is None:
        if x is None or teacher_logits is None:
            raise ValueError("give x and teacher_logits, or batches")
        tensors = (x, teacher_logits) if labels is None else (x, teacher_logits, labels)
        batches = tensor_batches(tensors, cfg["batch_size"], cfg["epochs"], seed)
    stats = fit(model, batches, soft_step(temperature, alpha, rule), cfg["lr"])
    return model, stats


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits ``[N, C]``."""
    model.eval()
    return model(x)


@torch.no_grad()
def teacher_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Per-teacher logits ``[N, K, C]`` (what stage one writes to the store), zero-meaned per row."""
    v = torch.stack([predict_logits(m, x) for m in models], dim=1)
    return v - v.mean(dim=-1, keepdim=True)


def errors(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Number of misclassified rows."""
    return int((logits.argmax(dim=-1) != y).sum())


def ensemble_errors(per_teacher: torch.Tensor, y: torch.Tensor, rule: Rule = "geometric") -> int:
    """Errors of the ensemble's T=1 prediction from ``[N, K, C]`` logits."""
    return errors(ensemble_targets(per_teacher, 1.0, rule), y)


def fit_bias_shift(
    logits: torch.Tensor,
    y: torch.Tensor,
    cls: int,
    grid: Sequence[float] | None = None,
) -> tuple[float, float]:
    """Bias added to class ``cls`` that maximises accuracy on ``(logits, y)``.

    Returns ``(shift, accuracy)``. Maximising OVERALL accuracy (not the class's own recall,
    which grows without bound in the shift) trades recovered ``cls`` rows against rows of
    other classes stolen by it. Ties are broken towards the middle of the best plateau.
    """
    if grid is None:
        lo, hi, step = DEFAULTS["mythical"]["bias_grid"]
        grid = np.arange(lo, hi + 1e-9, step).tolist()
    accs = []
    for b in grid:
        z = logits.clone()
        z[:, cls] += b
        accs.append(float((z.argmax(-1) == y).float().mean()))
    best = max(accs)
    # middle of the first contiguous run of best values
    first = [i for i, a in enumerate(accs) if a == best]
    run = [first[0]]
    for i in first[1:]:
        if i != run[-1] + 1:
            break
        run.append(i)
    return float(grid[run[len(run) // 2]]), best


def class_accuracy(logits: torch.Tensor, y: torch.Tensor, cls: int, shift: float = 0.0) -> float:
    """Accuracy on the rows of class ``cls`` after adding ``shift`` to that class's logit."""
    z = logits.clone()
    z[:, cls] += shift
    m = y == cls
    return float((z[m].argmax(-1) == cls).float().mean())
