"""FitNets hints (Romero et al. 2015): the student's middle layer, through a small regressor, regresses the
teacher's middle layer — pure torch."""

from __future__ import annotations

from collections.abc import Callable

import torch


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
              regressor: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``1/2 * mean over the batch of ||regressor(student_features) - teacher_features||^2`` (FitNets' eq. 3).

    Args:
        student_features: ``[B, ...]`` the student's guided layer's output.
        teacher_features: ``[B, D]`` the teacher's hint layer (e.g. a store's ``hints`` array, any float dtype;
            computed in the student's dtype).
        regressor: a small module the student owns mapping its features to ``[B, D]``; ``None`` where the
            features already have the teacher's width.

    Returns:
        A scalar tensor (the sum over features, mean over rows).

    Raises:
        ValueError: the regressed features and the teacher's differ in shape.
    """
    guided = regressor(student_features) if regressor is not None else student_features
    guided = guided.reshape(guided.shape[0], -1)
    target = teacher_features.reshape(teacher_features.shape[0], -1).to(device=guided.device, dtype=guided.dtype)
    if guided.shape != target.shape:
        raise ValueError(f"the regressed student features are {list(guided.shape)}, the teacher's hint "
                         f"{list(target.shape)}: give a regressor mapping the student's layer to the hint's width")
    return 0.5 * (guided - target).pow(2).sum(1).mean()
