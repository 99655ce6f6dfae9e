"""The small noisy problem the framework examples train on (imported by them; no data files).

4 Gaussian classes in 16 dimensions, the same classes for every seed; a fraction ``noise``
of the training labels replaced by random ones, so that plain averaging has noise to
memorise and GAF something to filter.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES, CLASSES = 16, 4


def noisy_problem(samples: int, noise: float, seed: int = 0):
    """Inputs, labels with ``noise`` of them randomised, and the true labels."""
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (samples,), generator=g)
    x = centers[y] + torch.randn(samples, FEATURES, generator=g)
    flip = torch.rand(samples, generator=g) < noise
    noisy = torch.where(flip, torch.randint(0, CLASSES, (samples,), generator=g), y)
    return x, noisy, y


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()
