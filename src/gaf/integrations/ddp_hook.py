"""GAF's DDP communication hook (:func:`gaf.distributed.gaf_hook`) registered in accelerate
(:func:`register_gaf_hook`), the Hugging Face Trainer (:func:`use_gaf_hook`) and Lightning
(:func:`lightning_gaf_hook`), with the optimizer guarded so that a skipped step is not
taken; on an ``AcceleratedOptimizer`` a skip also sets accelerate's skip flag. Lightning
2.6 registers ``ddp_comm_hook`` on CUDA only, hence the callback. See docs/ddp-hook.md.
"""

from __future__ import annotations

from torch import nn

from gaf.distributed import GAFHookState, gaf_hook

__all__ = ["lightning_gaf_hook", "register_gaf_hook", "use_gaf_hook"]


def _skip_flag(optimizer):
    """``on_step`` that keeps accelerate's skip flag in line with GAF's decision."""
    if not hasattr(optimizer, "_is_overflow") or not hasattr(optimizer, "gradient_state"):
        return None  # not an AcceleratedOptimizer

    def on_step(skipped: bool) -> None:
        if skipped:
            optimizer._is_overflow = True
        elif getattr(optimizer, "scaler", None) is None:  # with a scaler, it sets the flag
            optimizer._is_overflow = False

    return on_step


def register_gaf_hook(model: nn.Module, optimizer, spec=None, *, state=None,
                      **keywords) -> GAFHookState:
    """Register GAF's hook on a DDP-wrapped ``model`` and guard ``optimizer``.

    ``spec`` / ``keywords`` build the :class:`~gaf.distributed.GAFHookState` (or pass
    ``state=``). Returns the state (``state.result``, ``state.skipped``, ``state.stats``).
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"GAF's hook needs the model wrapped in DistributedDataParallel, got "
            f"{type(model).__name__}: run several processes (accelerate launch / torchrun) "
            "with plain data parallelism (not FSDP or DeepSpeed)"
        )
    if state is None:
        state = GAFHookState(spec, **keywords)
    elif spec is not None or keywords:
        raise ValueError("pass either state= or the filter spec/keywords, not both")
    _register_once(model, state)
    state.wrap_optimizer(optimizer, on_step=_skip_flag(optimizer))
    return state


def _register_once(model: nn.parallel.DistributedDataParallel, state: GAFHookState) -> None:
    if any(hook is gaf_hook and given is state
           for hook, given in getattr(model, "_comm_hooks", [])):
        return  # already registered (DDP allows one hook, once)
    model.register_comm_hook(state, gaf_hook)


def use_gaf_hook(trainer, spec=None, **keywords) -> GAFHookState:
    """Make a Hugging Face ``Trainer`` filter with GAF's hook: when training starts (after
    the Trainer has wrapped the model in DDP and prepared the optimizer) the hook is
    registered and the optimizer guarded. Returns the state."""
    from transformers import TrainerCallback

    state = GAFHookState(spec, **keywords)

    class GAFHookCallback(TrainerCallback):
        def __init__(self):
            self.registered: set[int] = set()  # DDP models given the hook (once each)

        def on_train_begin(self, args, trainer_state, control, **kwargs):
            model = trainer.model_wrapped
            if id(model) not in self.registered:
                register_gaf_hook(model, trainer.optimizer, state=state)
                self.registered.add(id(model))

    trainer.add_callback(GAFHookCallback())
    return state


def lightning_gaf_hook(state: GAFHookState):
    """A Lightning callback that registers GAF's hook on the strategy's DDP model when
    fitting starts (Lightning's own ``ddp_comm_hook`` works on CUDA only). The optimizer
    is guarded by ``state.wrap_optimizer`` in ``configure_optimizers``."""
    from lightning.pytorch.callbacks import Callback

    class GAFHookCallback(Callback):
        def on_fit_start(self, trainer, pl_module):
            model = trainer.strategy.model
            if not isinstance(model, nn.parallel.DistributedDataParallel):
                raise ValueError(
                    "GAF's hook needs Lightning's DDP strategy (strategy='ddp' with several "
                    f"devices); the strategy's model is a {type(model).__name__}"
                )
            _register_once(model, state)

    return GAFHookCallback()
