"""Speed options of the experiment loop: mixed precision, channels-last, torch.compile.

``amp``            ``"bf16"``: forward passes under ``torch.autocast`` in bfloat16 (same
                   exponent range as float32, no loss scaling needed); ``"fp16"``: float16
                   autocast with a ``torch.amp.GradScaler``. Both go through GAFTrainer's own
                   AMP path (``autocast_dtype=``, ``scaler=``): cosine distance is
                   scale-invariant, so GAF decides on the scaled micro-gradients exactly as
                   on unscaled ones; parameters, gradients and the filter stay float32.
``channels_last``  model and step inputs in NHWC memory order, the layout tensor cores and
                   oneDNN prefer for convolutions. Values are unchanged.
``compile``        ``torch.compile`` of the model for the training steps. The first steps
                   pay the compilation (seconds for the small CNN, minutes for a ResNet on a
                   CPU); evaluation runs the uncompiled module, which shares the weights,
                   because its other batch sizes and eval mode would each compile again.

Host synchronisation: autocast and channels-last add none. A GradScaler reads its overflow
flag on the host once per taken step (inside ``scaler.step``), next to GAF's own decision.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

AMP_CHOICES: tuple[str, ...] = ("bf16", "fp16")
_AMP_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
                "half": "fp16"}
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str | None) -> str | None:
    """``amp`` normalised to ``"bf16"``, ``"fp16"`` or None ("none", "off", "fp32" too)."""
    if amp is None:
        return None
    key = str(amp).strip().lower()
    if key in ("", "none", "off", "fp32", "float32"):
        return None
    if key not in _AMP_ALIASES:
        raise ValueError(f"unknown amp {amp!r}; choose from {', '.join(AMP_CHOICES)} (or none)")
    return _AMP_ALIASES[key]


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of ``amp`` (None: full precision)."""
    amp = check_amp(amp)
    return None if amp is None else _AMP_DTYPES[amp]


def make_scaler(amp: str | None, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 autocast on ``device``; None otherwise (bfloat16 needs none)."""
    if check_amp(amp) != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def trainer_options(amp: str | None, device: torch.device | str) -> dict:
    """The ``GAFTrainer`` keyword arguments for ``amp``: ``autocast_dtype`` and ``scaler``."""
    return {"autocast_dtype": amp_dtype(amp), "scaler": make_scaler(amp, device)}


def autocast(amp: str | None, device: torch.device | str):
    """A context that runs forward passes as the training steps do (for evaluation)."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def prepare_model(model: nn.Module, channels_last: bool = False, compile: bool = False
                  ) -> nn.Module:
    """Apply the layout to ``model`` in place and return the module the training steps
    call: ``model`` itself or its compiled wrapper (which shares its parameters, so the
    optimizer, the filter and checkpoints keep using ``model``)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(model)
    return model


def step_input(x: Tensor, channels_last: bool) -> Tensor:
    """A step's image batch in the model's layout (a copy on the device, no host sync)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
