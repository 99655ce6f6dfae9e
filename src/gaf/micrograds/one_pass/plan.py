"""Which modules of a model the one-pass backend captures, and what it refuses.

Every module owning a trainable parameter must be one whose micro-gradient pieces the
backend knows (Linear, Conv1d/2d/3d, Embedding, LayerNorm, GroupNorm, BatchNorm; weight
and bias only); anything else, and parameters tied between modules, raise a ValueError
naming the module, so that a model the pass cannot handle fails at construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from gaf.micrograds.one_pass.pieces import Captured

BATCH_NORM = nn.modules.batchnorm._BatchNorm


def module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if isinstance(module, BATCH_NORM):
        return "batchnorm"
    return None


def plan_model(model: nn.Module, params: Sequence[Tensor]) -> list[Captured]:
    """One :class:`Captured` per module owning trainable parameters; raises ValueError
    for what the one-pass mode cannot handle, naming the module and parameter."""
    trainable = {id(p) for p in params}
    owners: dict[int, str] = {}
    captures = []
    for name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in trainable}
        if not own:
            continue
        label = f"{name or '<root>'} ({type(module).__name__})"
        kind = module_kind(module)
        if kind is None or set(own) - {"weight", "bias"}:
            first = sorted(set(own) - {"weight", "bias"} or own)[0]
            raise ValueError(
                f"one-pass micro-gradients cannot handle parameter {first!r} of module "
                f"{label}: supported are the weight and bias of Linear, Conv1d/2d/3d, "
                "Embedding, LayerNorm, GroupNorm and BatchNorm. Freeze it or use the "
                "sequential path (micro_gradients='sequential')")
        if kind == "embedding" and (module.sparse or module.scale_grad_by_freq):
            raise ValueError(f"one-pass micro-gradients need a dense Embedding without "
                             f"scale_grad_by_freq; module {label} has sparse="
                             f"{module.sparse}, scale_grad_by_freq={module.scale_grad_by_freq}")
        for pname, p in own.items():
            if id(p) in owners:
                raise ValueError(f"parameter {name}.{pname} is shared with {owners[id(p)]}: "
                                 "tied parameters are not supported in one-pass mode")
            owners[id(p)] = f"{name}.{pname}"
        captures.append(Captured(module, name, kind, own))
    for i, p in enumerate(params):
        if id(p) not in owners:
            raise ValueError(f"trainable parameter {i} (shape {tuple(p.shape)}) is not a "
                             "parameter of the model given to the one-pass mode")
    return captures
