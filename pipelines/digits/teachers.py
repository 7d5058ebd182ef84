"""Stage "cumbersome model": the teacher ensemble, trained one net per seed and saved as state dicts.

Each teacher is a :func:`pipelines.digits.models.make_teacher` net trained with dropout and
+-1 pixel jitter; its ``state_dict`` goes to ``<out>/teachers/teacher-<seed>.pt``, from where stage
one loads it by factory + weights (as a precompute config would).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import models as M
from .data import DigitsSplit, load_split
from .parallel import TaskRunner


def teacher_paths(out: Path, seeds: Iterable[int]) -> list[Path]:
    return [out / "teachers" / f"teacher-{s}.pt" for s in seeds]


def teacher_task(seed: int, cfg: dict[str, Any], path: str) -> dict[str, float]:
    """Train the teacher of ``seed`` and save its ``state_dict`` to ``path`` (temp name, then rename)."""
    split = load_split(cfg["split"]["seed"], cfg["split"]["fractions"])
    model, stats = M.train_teacher(seed, split.x_train, split.y_train, cfg["teacher"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return stats


def load_teacher(cfg: dict[str, Any], path: Path) -> torch.nn.Module:
    t = cfg["teacher"]
    model = M.make_teacher(t["hidden"], t["dropout_in"], t["dropout_hidden"])
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def train_teachers(cfg: dict[str, Any], out: Path, runner: TaskRunner) -> tuple[list[torch.nn.Module], list[float]]:
    """One teacher per ensemble seed, saved under ``<out>/teachers/``; returns them (loaded back) and their seconds."""
    seeds = cfg["ensemble"]["seeds"]
    paths = teacher_paths(out, seeds)
    stats = runner.map(teacher_task, [(s, cfg, str(p)) for s, p in zip(seeds, paths, strict=True)], "teachers")
    return [load_teacher(cfg, p) for p in paths], [s["seconds"] for s in stats]


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
