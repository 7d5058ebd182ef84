"""The student for the training example: a small ReLU MLP ``[B, 64] -> [B, 10]`` logits."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def make_student(hidden: Sequence[int] = (32,), in_features: int = 64, num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
