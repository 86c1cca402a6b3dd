"""The published learning-rate schedule: constant, then poly decay floored at ``min_lr``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ConstantThenPoly:
    """LR multiplier for epoch ``e``: 1 for ``e < constant_epochs``; then
    ``max(min_lr / lr, (1 - (e - c) / (E - c)) ** power)``.

    A dataclass rather than a lambda so that ``LambdaLR.state_dict()`` saves it in checkpoints.
    """

    epochs: int
    constant_epochs: int
    power: float
    floor: float  # min_lr / lr

    def __call__(self, epoch: int) -> float:
        if epoch < self.constant_epochs:
            return 1.0
        span = max(self.epochs - self.constant_epochs, 1)
        progress = min(max(epoch - self.constant_epochs, 0) / span, 1.0)
        return max(self.floor, (1.0 - progress) ** self.power)


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int, constant_epochs: int, power: float,
                    lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch ``LambdaLR`` (call ``step()`` once at the end of every epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, ConstantThenPoly(epochs, constant_epochs, power, min_lr / lr if lr > 0 else 0.0)
    )
