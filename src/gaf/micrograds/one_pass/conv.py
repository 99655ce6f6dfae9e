"""One-pass pieces of convolutions (see :mod:`gaf.micrograds.one_pass.linear`).

Convolutions are materialised: each micro-batch's weight gradient from the framework's
weight-gradient kernel, once for all micro-batches (the micro-batch index folded into the
channel groups) or once per slice; the ghost form would cost R² with R = samples × output
positions, far too much for images.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gaf.micrograds.one_pass.pieces import (
    Budget,
    Captured,
    MicroBatches,
    Weights,
    common_dtype,
    gram,
)

# Per micro-batch input + output-gradient numbers below which the grouped call is used.
FOLD_NUMBERS = 32768

# -- Convolutions ------------------------------------------------------------------------------


def conv_input(module: nn.modules.conv._ConvNd, x: Tensor) -> tuple[Tensor, list[int]]:
    """The input as the convolution kernel sees it, and its remaining zero padding."""
    dims = len(module.kernel_size)
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), \
            [0] * dims
    if module.padding == "valid":
        return x, [0] * dims
    if module.padding == "same":
        pads = []
        for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), [0] * dims
    return x, list(module.padding)


def _conv_weight_grad(module, x: Tensor, d: Tensor, padding: list[int]) -> Tensor:
    dims = len(module.kernel_size)
    return torch.ops.aten.convolution_backward(
        d, x, module.weight, None, list(module.stride), padding, list(module.dilation), False,
        [0] * dims, module.groups, [False, True, False])[1]


def _conv_blocks(module, x: Tensor, d: Tensor, padding: list[int], mb: MicroBatches) -> Tensor:
    """[M, *weight.shape]: each micro-batch's weight gradient: for small equal
    micro-batches one grouped weight-gradient kernel call (micro-batch index folded into the
    channels, M·groups groups), whose fixed cost M calls would pay M times; else one per slice."""
    m, n = mb.m, mb.size
    # The fold copies x and δ once; M calls cost a fixed ~40 µs each. Fold when each
    # micro-batch's data is small enough that the calls' fixed cost dominates.
    if mb.equal and m > 1 and (x.numel() + d.numel()) // m < FOLD_NUMBERS:
        def fold(t: Tensor) -> Tensor:
            return t.reshape(m, n, *t.shape[1:]).transpose(0, 1).reshape(n, -1, *t.shape[2:])
        weight = module.weight.detach()
        weight = weight if weight.dtype == d.dtype else weight.to(d.dtype)
        grouped = weight.repeat(m, *([1] * (weight.dim() - 1)))
        dims = len(module.kernel_size)
        blocks = torch.ops.aten.convolution_backward(
            fold(d), fold(x), grouped, None, list(module.stride), padding,
            list(module.dilation), False, [0] * dims, m * module.groups,
            [False, True, False])[1]
        return blocks.reshape(m, *weight.shape)
    return torch.stack([_conv_weight_grad(module, xi, di, padding)
                        for xi, di in zip(x.split(mb.sizes), d.split(mb.sizes), strict=True)])


def conv_pieces(cap: Captured, mb: MicroBatches, budget: Budget) -> None:
    module = cap.module
    weights, biases, calls = [], [], []
    for x, d in zip(cap.saved, cap.deltas, strict=True):
        if d is None:
            continue
        x, d = common_dtype(x, d)
        if "bias" in cap.params:
            biases.append(mb.segment_sum(d.reshape(d.shape[0], d.shape[1], -1).sum(2)))
        if "weight" in cap.params:
            xp, padding = conv_input(module, x)
            weights.append(_conv_blocks(module, xp, d, padding, mb))
            calls.append((xp, d, padding))
    if biases:
        cap.kept["bias"], cap.plan["bias"] = sum(biases), "kept"
        cap.add(gram(cap.kept["bias"]))
    if weights:
        blocks = sum(weights)
        cap.add(gram(blocks))
        rows = sum(x.numel() + d.numel() for x, d, _ in calls)
        if blocks.numel() <= rows or budget.materialise or budget.take(blocks.numel()):
            cap.kept["weight"], cap.plan["weight"] = blocks, "kept"
        else:
            cap.plan["weight"] = "recomputed"
            cap.extra.update(calls=calls, ids=mb.sample_ids, total=blocks.sum(0))
    cap.release()


def conv_direction(cap: Captured, weights: Weights, out: Tensor) -> None:
    module, calls, ids = cap.module, cap.extra.pop("calls"), cap.extra.pop("ids")
    total = cap.extra.pop("total") if len(calls) == 1 else None
    part = out if len(calls) == 1 else torch.empty_like(out)
    for k, (x, d, padding) in enumerate(calls):
        def product(xs: Tensor, ds: Tensor, target: Tensor, add: bool, p=padding) -> None:
            g = _conv_weight_grad(module, xs, ds, p)
            target.add_(g) if add else target.copy_(g)

        weights.products(x, d, ids, total, product, part)
        if part is not out:
            out.copy_(part) if k == 0 else out.add_(part)
