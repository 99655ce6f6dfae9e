"""One-pass pieces of convolutions and normalisation layers (see :mod:`gaf.one_pass_layers`).

Convolutions are materialised: each micro-batch's weight gradient from the framework's
weight-gradient kernel, once for all micro-batches (the micro-batch index folded into the
channel groups) or once per slice; the ghost form would cost R² with R = samples × output
positions, far too much for images. Normalisation layers' affine parameters are sums of
δ ∘ x̂ (weight) and δ (bias) per micro-batch, always kept ([M, C]). Training-mode batch
norm is replaced for the step by :class:`GhostBatchNorm`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gaf.one_pass_layers import Budget, Captured, MicroBatches, Weights, _common, gram

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
    """[M, *weight.shape]: each micro-batch's weight gradient.

    Small equal micro-batches: one grouped weight-gradient kernel call, the micro-batch
    index folded into the channels ([n, M·C, ...] with M·groups groups), instead of M
    calls whose fixed cost dominates at a few samples each. Otherwise one call per slice
    (no copy).
    """
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
        x, d = _common(x, d)
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


# -- Normalisation layers ----------------------------------------------------------------------


def normalised(module: nn.Module, x: Tensor) -> Tensor:
    """x̂: the module's output before its affine parameters (eval-mode batch norm uses the
    running statistics; training-mode batch norm is normalised per micro-batch elsewhere)."""
    with torch.no_grad():
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, None, None, module.eps)
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0,
                            module.eps)


def norm_pieces(cap: Captured, mb: MicroBatches, budget: Budget) -> None:
    module = cap.module
    sums: dict[str, Tensor] = {}
    for xhat, d in zip(cap.saved, cap.deltas, strict=True):
        if d is None:
            continue
        xhat, d = _common(xhat, d)
        for name in cap.params:
            piece = d if name == "bias" else d * xhat
            # LayerNorm's parameters span the trailing dims; the others' the channel dim.
            if isinstance(module, nn.LayerNorm):
                piece = piece.reshape(d.shape[0], -1, cap.params[name].numel()).sum(1)
            else:
                piece = piece.reshape(d.shape[0], d.shape[1], -1).sum(2)
            piece = mb.segment_sum(piece)
            sums[name] = piece if name not in sums else sums[name] + piece
    for name, blocks in sums.items():
        cap.kept[name], cap.plan[name] = blocks, "kept"
        cap.add(gram(blocks))
    cap.release()


class GhostBatchNorm:
    """Training-mode batch norm normalised per micro-batch, as the sequential path does.

    Replaces the module's forward for one step: each micro-batch is normalised with its
    own statistics and updates the running statistics in turn (M updates a step, as M
    sequential forwards make), so the micro-gradients stay independent and equal to the
    sequential ones. The normalised input x̂ is what the affine parameters' pieces need.
    """

    def __init__(self, module: nn.modules.batchnorm._BatchNorm, mb: MicroBatches, capture):
        self.module, self.mb, self.capture = module, mb, capture

    def __call__(self, x: Tensor) -> Tensor:
        bn = self.module
        bn._check_input_dim(x)
        parts = []
        for xi in x.split(self.mb.sizes):
            factor = 0.0 if bn.momentum is None else bn.momentum
            if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if bn.momentum is None:
                    factor = 1.0 / float(bn.num_batches_tracked)
            use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
            stats = not bn.training or bn.track_running_stats
            parts.append(F.batch_norm(xi, bn.running_mean if stats else None,
                                      bn.running_var if stats else None, None, None,
                                      use_batch, factor, bn.eps))
        xhat = torch.cat(parts)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = xhat
        if bn.weight is not None:
            out = out * bn.weight.reshape(shape)
        if bn.bias is not None:
            out = out + bn.bias.reshape(shape)
        return self.capture(bn, xhat.detach(), out)
