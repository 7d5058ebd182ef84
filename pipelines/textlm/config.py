"""The textlm pipeline's settings: the full run and ``--quick`` (seconds, for the tests)."""

from __future__ import annotations

from typing import Any

FULL: dict[str, Any] = {
    "threads": 2,
    "max_files": None,          # every top-level stdlib module
    "heldout_every": 10,
    "vocab_size": 8192,
    "context": 64,
    "teachers": [{"d": 96, "layers": 2, "heads": 4, "seed": 1}, {"d": 96, "layers": 2, "heads": 4, "seed": 2}],
    "teacher_steps": 200,
    "batch": 16,
    "lr": 3e-3,
    "transfer_sequences": 800,  # x context tokens: the transfer set every student sees
    "student": {"d": 64, "layers": 1, "heads": 2, "seed": 7},
    "student_epochs": 3,
    "temperature": 1.0,
    "alpha": 0.9,
    "eval_tokens": 40000,
    "topk": [8, 32],            # a topk store per k (k=8: 104 B/token with the default 9-temperature tail grid)
    "sampled": 8,               # draws per token of the sampled store (120 B/token)
}

QUICK: dict[str, Any] = {
    **FULL,
    "max_files": 12,
    "vocab_size": 600,
    "context": 16,
    "teachers": [{"d": 16, "layers": 1, "heads": 2, "seed": 1}, {"d": 16, "layers": 1, "heads": 2, "seed": 2}],
    "teacher_steps": 4,
    "batch": 4,
    "transfer_sequences": 24,
    "student": {"d": 8, "layers": 1, "heads": 2, "seed": 7},
    "student_epochs": 1,
    "eval_tokens": 2000,
}


def config(quick: bool) -> dict[str, Any]:
    return dict(QUICK if quick else FULL)
