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
    "teacher_steps": 300,
    "batch": 16,
    "lr": 1e-2,
    "transfer_sequences": 512,  # x context tokens: the transfer set every student sees
    "student": {"d": 64, "layers": 1, "heads": 2, "seed": 7},
    "student_epochs": 4,
    "temperature": 1.0,
    "alpha": 0.9,
    "eval_tokens": 40000,
    "topk": [8, 32],            # a topk store per k: 4k + 8 * len(grid) B/token (k=8: 80 B)
    "sampled": 12,              # draws per token of the sampled store: 6n + 8 * len(grid) B/token (120 B)
    "grid": [0.5, 1.0, 2.0, 4.0, 8.0, 20.0],  # topk / sampled: the temperatures whose log-partitions are stored
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
