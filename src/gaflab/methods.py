"""What each method decides in a training step; every one steps through :class:`gaf.GAFTrainer`.

One step takes M micro-batches. All methods run the same forward/backward loop of the
trainer over the same micro-batches; they differ only in what decides the update:

``average``      plain averaging of the M micro-gradients (data-parallel SGD), through the
                 trainer's averaging backend (``GAFTrainer(..., mode="average")``).
``gaf``          the agreement filter (``tau`` or an adaptive ``threshold``, ``rule``,
                 ``measure``): micro-gradients that disagree are dropped, and the step is
                 skipped when fewer than two agree.
``random-skip``  blind control: skip each step with probability p, else average all M.
``random-drop``  blind control: drop each non-anchor micro-batch with probability q, skip
                 when fewer than two remain (the blind counterpart of GAF for M > 2).
                 Controls ignore the gradients: they differ from GAF in nothing but the
                 choice. p or q is ``control_rate``, or taken from the GAF run of the same
                 setting and seed (``gaf compare`` does this by default; see
                 :func:`matched_control_rates`).
``small-loss``   averaging, where each micro-batch's loss is the mean over its 1 - r(t)
                 smallest per-sample losses (co-teaching's selection, single network).
``gce``          averaging of the generalized cross-entropy loss.
``early-stop``   averaging, keeping the weights of the epoch with the best accuracy on a
                 held-out split whose labels are as noisy as the training set's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from gaf import FlatGradients, GAFTrainer, GradientCollector, RandomDrop, RandomSkip, StepResult
from gaf.controls import Control
from gaf.core import gram_matrix
from gaf.faults import FaultInjector
from gaf.thresholds import parse_threshold
from gaflab.data import DATASETS
from gaflab.seeds import stream_seed
from gaflab.speed import trainer_options

METHOD_DESCRIPTIONS: dict[str, str] = {
    "average": "plain averaging of the micro-gradients",
    "gaf": "gradient agreement filtering",
    "random-skip": "blind control: skip each step with probability p",
    "random-drop": "blind control: drop each non-anchor micro-batch with probability q",
    "small-loss": "keep the 1 - r(t) smallest-loss samples (Han et al. 2018)",
    "gce": "generalized cross-entropy loss (Zhang & Sabuncu 2018)",
    "early-stop": "averaging, early stopping on a noisy held-out split",
}
METHODS: tuple[str, ...] = tuple(METHOD_DESCRIPTIONS)
CONTROLS: tuple[str, ...] = ("random-skip", "random-drop")
# Methods whose update is the plain average of what the loss gives.
AVERAGING_METHODS: tuple[str, ...] = ("average", "small-loss", "gce", "early-stop")
ALIASES = {"avg": "average", "averaging": "average", "mean": "average",
           "early-stopping": "early-stop", "co-teaching": "small-loss"}


def canonical_method(name: str) -> str:
    """The method's canonical name (aliases accepted), or ValueError listing the methods."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in METHOD_DESCRIPTIONS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return key


# --------------------------------------------------------------------------------------
# Losses


def generalized_cross_entropy(logits: Tensor, targets: Tensor, q: float = 0.7) -> Tensor:
    """Generalized cross-entropy, mean over the batch (Zhang & Sabuncu, "Generalized
    Cross Entropy Loss for Training Deep Neural Networks with Noisy Labels", NeurIPS 2018):

        L_q(f(x), y) = (1 - f_y(x)^q) / q,        0 < q <= 1,

    where f_y(x) is the softmax probability of the label. q -> 0 gives cross-entropy
    -log f_y(x) (the limit is taken exactly at q = 0); q = 1 gives the mean absolute error
    1 - f_y(x). Computed as -expm1(q · log f_y) / q, which keeps its precision for small q
    (1 - exp(·) would cancel).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"GCE q must lie in [0, 1], got {q}")
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
    if q == 0.0:
        return -log_p.mean()
    return (-torch.expm1(q * log_p) / q).mean()


def forget_rate_at(epoch_index: int, forget_rate: float, ramp_epochs: int) -> float:
    """Co-teaching's schedule R(T) = 1 - min(T·tau/T_k, tau) as the dropped fraction
    r(T) = min(T / T_k, 1) · tau, T the number of epochs completed (Han et al., "Co-teaching:
    Robust Training of Deep Neural Networks with Extremely Noisy Labels", NeurIPS 2018)."""
    if ramp_epochs <= 0:
        return forget_rate
    return forget_rate * min(epoch_index / ramp_epochs, 1.0)


class SmallLossLoss:
    """Cross-entropy over the ``1 - rate`` fraction of each micro-batch with the smallest
    per-sample loss: co-teaching's selection rule (Han et al. 2018) in its single-network
    form, ``num_remember = int((1 - rate) · b)`` as in the authors' code (at least one).

    ``kept`` collects one bool mask [b] per call, on the device (read once per epoch).
    """

    def __init__(self, rate: float = 0.0):
        self.rate = rate
        self.kept: list[Tensor] = []

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        per_sample = F.cross_entropy(logits, targets, reduction="none")
        b = per_sample.numel()
        keep = max(1, int((1.0 - self.rate) * b))
        order = torch.argsort(per_sample.detach(), stable=True)[:keep]
        mask = torch.zeros(b, dtype=torch.bool, device=per_sample.device)
        mask[order] = True
        self.kept.append(mask)
        return per_sample[order].mean()


# --------------------------------------------------------------------------------------
# The step


class AccumulationSnapshots:
    """Averaging's side measurement of the distances GAF would have seen (at tau = 2).

    After micro-batch k's backward the averaging path's ``.grad`` holds Σ_{i<=k} g_i / M,
    so consecutive differences of the snapshots are the micro-gradients (up to 1/M, which
    no cosine sees). :meth:`close_step` returns their Gram matrix
    (:func:`gaf.core.gram_matrix`), left on the device; the epoch's log turns the stacked
    matrices into distances once per epoch (:meth:`EpochLog.resolve_grams`). The update is
    untouched.
    """

    def __init__(self, params: list[Tensor], num_micro_batches: int):
        self.flat = FlatGradients(params)
        self.rows = self.flat.new_buffer(num_micro_batches)

    def take(self, k: int) -> None:
        self.flat.gather(self.rows[k])

    def close_step(self) -> Tensor:
        micro = torch.diff(self.rows, dim=0, prepend=torch.zeros_like(self.rows[:1]))
        return gram_matrix(micro)


@dataclass
class MethodStep:
    """A method bound to one run: the trainer every step goes through, and what the method
    changes between epochs (small-loss's rate, a control's per-epoch rate)."""

    method: str
    trainer: GAFTrainer
    small_loss: SmallLossLoss | None = None
    forget_rate: float | None = None
    ramp_epochs: int = 10
    control: Control | None = None
    control_rates: list[float] | None = None  # per epoch; None: one rate for the run
    snapshots: AccumulationSnapshots | None = None  # averaging methods' side distances
    fault: FaultInjector | None = None  # corrupts some micro-batches of every step
    fault_hook: Callable[[int], None] | None = None
    num_classes: int = 0  # for a wrong-labels fault

    def begin_epoch(self, epoch_index: int) -> None:
        """Set what depends on the epoch (0-based: epochs completed so far)."""
        if self.small_loss is not None:
            self.small_loss.rate = forget_rate_at(epoch_index, self.forget_rate or 0.0,
                                                  self.ramp_epochs)
        if self.control is not None and self.control_rates is not None:
            rate = self.control_rates[min(epoch_index, len(self.control_rates) - 1)]
            setattr(self.control, self.control.rate_name, rate)

    def step(self, x: Tensor, y: Tensor) -> tuple[StepResult, Tensor | None]:
        """One trainer step; with side distances, also the step's Gram matrix (device)."""
        hooks = []
        if self.fault is not None:  # before the snapshot: what the update really sees
            y = self.fault.corrupt_labels(y, self.trainer.num_micro_batches, self.num_classes)
            hooks.append(self.fault_hook)
        if self.snapshots is not None:
            hooks.append(self.snapshots.take)
        if not hooks:
            return self.trainer.step(x, y), None

        def on_micro_gradient(k: int) -> None:
            for hook in hooks:
                hook(k)

        out = self.trainer.step(x, y, on_micro_gradient=on_micro_gradient)
        return out, self.snapshots.close_step() if self.snapshots is not None else None


def attach_fault(step: MethodStep, cfg, params: list[Tensor]) -> MethodStep:
    """Give ``step`` the fault ``cfg`` asks for (the last ``cfg.faulty_rows`` micro-batches,
    seeded from the run's seed); averaging methods' hook works on the accumulated .grad."""
    m = cfg.num_micro_batches
    step.fault = FaultInjector.make(cfg.fault, range(m - cfg.faulty_rows, m),
                                    seed=stream_seed(cfg.seed, "fault") % (2**31))
    step.fault_hook = step.fault.gradient_hook(params, m, accumulated=step.trainer.average)
    step.num_classes = DATASETS[cfg.dataset].num_classes
    return step


def gaf_threshold(cfg):
    """``cfg.threshold`` parsed (an adaptive threshold object), or the fixed ``cfg.tau``."""
    return parse_threshold(cfg.threshold) if cfg.threshold else cfg.tau


def collector_mode(cfg) -> str:
    """"stacked" when the run records distances: its filter then hands back the step's Gram
    matrix (``result.extra["gram"]``) for the noise scale; decisions are the same in every
    mode."""
    return "stacked" if cfg.record_distances and cfg.num_micro_batches >= 2 else "auto"


def make_collector(params: list[Tensor], cfg):
    """The collector of a GAF run, as ``cfg`` says (threshold, rule, measure)."""
    return GradientCollector(params, tau=gaf_threshold(cfg), rule=cfg.rule,
                             measure=cfg.measure, num_micro_batches=cfg.num_micro_batches,
                             mode=collector_mode(cfg))


def build_step(cfg, model: nn.Module, optimizer: torch.optim.Optimizer,
               noise_rate: float) -> MethodStep:
    """The :class:`MethodStep` of ``cfg.method``, with ``cfg.fault`` attached if set.
    ``noise_rate`` is the training set's known noise fraction: small-loss's forget rate
    when ``cfg.forget_rate`` is None."""
    step = _method_step(cfg, model, optimizer, noise_rate)
    if cfg.fault is not None:
        attach_fault(step, cfg, [p for p in model.parameters() if p.requires_grad])
    return step


def _method_step(cfg, model: nn.Module, optimizer: torch.optim.Optimizer,
                 noise_rate: float) -> MethodStep:
    method = cfg.method
    m = cfg.num_micro_batches
    common = dict(num_micro_batches=m, max_grad_norm=cfg.max_grad_norm,
                  **trainer_options(cfg.amp, cfg.device))  # autocast dtype, GradScaler
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "gaf":
        trainer = GAFTrainer(model, optimizer, F.cross_entropy,
                             collector=make_collector(params, cfg), **common)
        return MethodStep(method, trainer)
    if method in CONTROLS:
        rates = cfg.control_rates
        rate = rates[0] if rates else cfg.control_rate
        if rate is None:
            raise ValueError(
                f"{method} needs its rate (control_rate): give it, or run it in gaf compare "
                "beside a gaf run of the same setting and seed to match GAF's rate"
            )
        kind = RandomSkip if method == "random-skip" else RandomDrop
        control = kind(rate, seed=stream_seed(cfg.seed, "control"))
        trainer = GAFTrainer(model, optimizer, F.cross_entropy, control=control,
                             mode=collector_mode(cfg), **common)
        return MethodStep(method, trainer, control=control,
                          control_rates=list(rates) if rates else None)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    small = None
    if method == "small-loss":
        small = loss_fn = SmallLossLoss()
    elif method == "gce":
        q = cfg.gce_q

        def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
            return generalized_cross_entropy(logits, targets, q)

    trainer = GAFTrainer(model, optimizer, loss_fn, mode="average", **common)
    forget = cfg.forget_rate if cfg.forget_rate is not None else noise_rate
    snapshots = AccumulationSnapshots(params, m) if cfg.record_distances and m >= 2 else None
    return MethodStep(method, trainer, small_loss=small, forget_rate=forget,
                      ramp_epochs=cfg.forget_epochs, snapshots=snapshots)
