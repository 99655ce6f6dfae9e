"""What the studies share: their noise names, R stacked copies of the model
(gaflab.models.MLP) and the masked SGD step that advances only the copies that did not skip."""

from __future__ import annotations

import platform
import sys

import numpy as np
import torch
from torch import nn

from gaflab.config import TrainConfig
from gaflab.prepare import PreparedData, prepare_data


def parse_noise(spec: str) -> tuple[str, float]:
    """``symN`` (N% symmetric) or ``asymN`` (N% asymmetric) → (kind, rate)."""
    for prefix, kind in (("asym", "asymmetric"), ("sym", "symmetric")):
        if spec.startswith(prefix) and spec[len(prefix):].isdigit():
            return kind, int(spec[len(prefix):]) / 100
    raise ValueError(f"noise setting {spec!r} is not symN or asymN (e.g. sym40, asym20)")


def study_data(dataset: str, noise: str, seed: int, train_size: int, test_size: int | None,
               data_dir: str | None = None) -> PreparedData:
    """The lab's data for one setting, found by the lab's dataset lookup (``data_dir``, then
    ``$GAF_DATA_DIR``, the system locations and the cache); never downloaded here."""
    kind, rate = parse_noise(noise)
    cfg = TrainConfig(dataset=dataset, train_size=train_size, test_size=test_size,
                      noise=kind if rate > 0 else "none", noise_rate=rate, seed=seed,
                      data_dir=data_dir, download=False, progress=False)
    return prepare_data(cfg)


def stacked_copies(model: nn.Module, copies: int):
    """``copies`` copies of ``model``'s weights stacked on a leading axis (for vmap), zero
    momentum buffers, and the parameter names in order."""
    names = [k for k, _ in model.named_parameters()]
    base = {k: v.detach() for k, v in model.named_parameters()}
    params = {k: v.unsqueeze(0).repeat(copies, *([1] * v.dim())).contiguous()
              for k, v in base.items()}
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    return names, params, bufs


@torch.no_grad()
def sgd_step(params, bufs, direction, mask, names, args) -> None:
    """torch.optim.SGD (momentum, nesterov, weight decay) for the copies in ``mask``.

    ``direction`` is [R, P], the copies' flat update directions; a copy outside ``mask``
    advances neither its weights nor its momentum buffer (a skipped step).
    """
    offset = 0
    r = direction.shape[0]
    for name in names:
        p, buf = params[name], bufs[name]
        numel = p[0].numel()
        g = direction[:, offset:offset + numel].view_as(p)
        offset += numel
        keep = mask.view(r, *([1] * (p.dim() - 1))).to(p.dtype)
        d_p = g.add(p, alpha=args.weight_decay)
        delta = buf.mul(args.momentum - 1.0).add_(d_p).mul_(keep)  # new_buf - buf, masked
        buf.add_(delta)
        d_p.add_(buf, alpha=args.momentum).mul_(keep)
        p.sub_(d_p, alpha=args.lr)


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "machine": platform.platform()}
