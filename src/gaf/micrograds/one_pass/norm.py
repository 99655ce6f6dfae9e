"""One-pass pieces of normalisation layers (LayerNorm, GroupNorm, BatchNorm).

Their affine parameters' micro-gradients are sums of δ ∘ x̂ (weight) and δ (bias) per
micro-batch, always kept ([M, C]). Training-mode batch norm is replaced for the step by
:class:`GhostBatchNorm`, which normalises each micro-batch with its own statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gaf.micrograds.one_pass.pieces import Budget, Captured, MicroBatches, common_dtype, gram

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
        xhat, d = common_dtype(xhat, d)
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
    """Training-mode batch norm normalised per micro-batch, as the sequential path does:
    for one step each micro-batch uses its own statistics and updates the running ones in
    turn (as M sequential forwards), and keeps x̂ for the affine parameters' pieces."""

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
