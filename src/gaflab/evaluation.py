"""Evaluation of a lab run's model: test accuracy, and on the training set accuracy on clean
samples and memorisation of the noisy ones."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gaflab.prepare import PreparedData


def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    was_training = model.training
    model.eval()
    preds = [model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=x.device)


def evaluate(model: nn.Module, data: PreparedData, batch_size: int) -> dict[str, float]:
    """Test accuracy; on the training set: accuracy on clean samples, and on noisy samples
    the fraction predicted with their noisy label (memorised) or their true label."""
    test_pred = predict(model, data.test_x, batch_size)
    train_pred = predict(model, data.train_x, batch_size)
    noisy = data.is_noisy
    clean = ~noisy
    hit_obs = (train_pred == data.train_y).float()
    hit_true = (train_pred == data.clean_y).float()
    n_noisy = noisy.sum().clamp_min(1)
    stats = torch.stack([
        (test_pred == data.test_y).float().mean(),
        (hit_obs * clean).sum() / clean.sum().clamp_min(1),
        (hit_obs * noisy).sum() / n_noisy,
        (hit_true * noisy).sum() / n_noisy,
        hit_obs.mean(),
    ]).tolist()  # one host transfer
    has_noisy = bool(noisy.any())
    return {
        "test_acc": stats[0],
        "train_acc_clean": stats[1],
        "memorised": stats[2] if has_noisy else float("nan"),
        "noisy_true": stats[3] if has_noisy else float("nan"),
        "train_acc_observed": stats[4],
    }


def heldout_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    return float((predict(model, x, batch_size) == y).float().mean())
