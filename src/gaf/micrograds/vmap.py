"""Micro-gradients from one vectorised pass: :func:`micro_gradients` reshapes a batch into
[M, B/M, ...] and computes the [M, P] stack with ``vmap(grad(loss))``. Training-mode
BatchNorm (it mixes samples, updates running statistics) gets a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gaf.core import FilterResult
from gaf.core.filter import filter_gradients
from gaf.micrograds.flat import FlatGradients


def check_vectorisable(model: nn.Module) -> None:
    """Raise ValueError if a module cannot run under vmap over micro-batches."""
    for name, module in model.named_modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if is_bn and module.training and module.track_running_stats:
            raise ValueError(
                f"module {name or type(module).__name__!r} is BatchNorm in training mode: its "
                "statistics mix samples and are updated in place, which torch.func.vmap "
                "cannot vectorise over micro-batches. Use GradientCollector/GAFTrainer, "
                "GroupNorm/LayerNorm, or model.eval()"
            )


def micro_gradients(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    num_micro_batches: int,
    flat: FlatGradients | None = None,
) -> tuple[Tensor, Tensor]:
    """Return (grads [M, P], losses [M]) for M equal micro-batches of ``inputs``/``targets``.

    Rows follow the order of the model's trainable parameters (as :class:`FlatGradients`).
    Frozen parameters are held constant. The batch size must be divisible by M.
    """
    check_vectorisable(model)
    m = num_micro_batches
    n = inputs.shape[0]
    if m < 1 or n % m:
        raise ValueError(f"batch of {n} samples is not divisible into {m} equal micro-batches")
    if targets.shape[0] != n:
        raise ValueError(f"inputs have {n} samples but targets have {targets.shape[0]}")
    flat = flat or FlatGradients(model.parameters())
    trainable = {id(p) for p in flat.params}
    params = {name: p for name, p in model.named_parameters() if id(p) in trainable}
    frozen = {name: p for name, p in model.named_parameters() if id(p) not in trainable}
    buffers = dict(model.named_buffers())
    order = {id(p): i for i, p in enumerate(flat.params)}
    keys = sorted(params, key=lambda k: order[id(params[k])])

    def micro_loss(trainable_params: dict, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, (trainable_params, frozen, buffers), (x,))
        loss = loss_fn(out, y)
        return loss, loss.detach()

    xs = inputs.reshape(m, n // m, *inputs.shape[1:])
    ys = targets.reshape(m, n // m, *targets.shape[1:])
    detached = {k: params[k].detach() for k in keys}
    try:
        grads, losses = vmap(grad(micro_loss, has_aux=True), in_dims=(None, 0, 0))(detached, xs, ys)
    except RuntimeError as err:
        raise ValueError(
            f"this model cannot be vectorised over micro-batches with torch.func.vmap ({err}); "
            "use GradientCollector/GAFTrainer instead"
        ) from err
    rows = torch.cat([grads[k].reshape(m, -1).to(flat.dtype) for k in keys], dim=1)
    return rows, losses


def vectorised_filter_step(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    num_micro_batches: int,
    tau: float = 0.97,
    rule: str = "mean",
    flat: FlatGradients | None = None,
) -> tuple[FilterResult, Tensor]:
    """Compute micro-gradients with vmap, filter them, and write the result into ``.grad``.

    Returns (result, losses). If the step is skipped, every ``.grad`` is set to ``None``.
    """
    flat = flat or FlatGradients(model.parameters())
    rows, losses = micro_gradients(model, loss_fn, inputs, targets, num_micro_batches, flat)
    result = filter_gradients(rows, tau, rule)
    if result.skipped:
        flat.clear()
    else:
        flat.write(result.grad)
    return result, losses
