"""Tiny teacher factories imported by path in tests (``"tests.teacher_zoo:mlp"``)."""

from __future__ import annotations

from torch import nn


def mlp(in_features: int, num_classes: int, hidden: int = 16) -> nn.Module:
    """``[B, in_features] -> [B, num_classes]`` logits; has dropout so eval mode matters."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )


def not_a_module(**kwargs: object) -> dict:
    """A factory that returns the wrong type."""
    return dict(kwargs)
