"""The training loop: every method steps through :class:`gaf.GAFTrainer`.

One optimizer step takes ``M = num_micro_batches`` micro-batches of ``micro_batch_size``
samples. The loop draws the epoch's micro-batches (:func:`epoch_batches`), sets the
learning rate, and hands each step's batch to the method (:mod:`gaflab.methods`),
which steps the trainer users call: GAF, its blind controls and the averaging baselines
differ in nothing but what decides the update. Per epoch it evaluates, records the
selection precision (:mod:`gaflab.selection`) and warns on collapse
(:mod:`gaflab.collapse`). The loop's own state lives in :class:`LoopState`.

Every run records the cosine distance of each micro-gradient to the running sum of the
earlier ones (the quantity GAF thresholds), averaging included.

Hot path: the only host synchronisation per step is the trainer's decision (the optimizer
needs it on the host). Losses, noise counts and small-loss's kept-sample masks accumulate on
the device and are read once per epoch. Evaluation runs under ``no_grad`` in large batches
over whole tensors, with one transfer of its statistics.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

import gaf
from gaflab.batches import batch_sources, epoch_batches
from gaflab.collapse import collapse_warnings
from gaflab.config import TrainConfig
from gaflab.evaluation import evaluate, heldout_accuracy
from gaflab.methods import MethodStep, build_step
from gaflab.models import build_model
from gaflab.prepare import PreparedData, describe_data, prepare_data
from gaflab.results import FILTERING_METHODS, RunResult
from gaflab.resume import PartialEpoch, RunCheckpoints
from gaflab.seeds import stream_seed
from gaflab.selection import EpochLog
from gaflab.speed import autocast, prepare_model, step_input

# --------------------------------------------------------------------------------------
# Augmentation


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with ``pad`` pixels of zero padding and random horizontal flip."""
    n, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    rows = dy[:, None] + torch.arange(h, device=dev)[None, :]  # [n, h]
    cols = dx[:, None] + torch.arange(w, device=dev)[None, :]  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [n, h, w, C]
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------
# Optimiser and schedule


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at ``step`` (counted over attempted steps, skipped or not)."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if warm and step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, total_steps - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    if cfg.schedule == "step":
        return 0.1 ** (int(frac >= 0.5) + int(frac >= 0.75))
    return 1.0


# --------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
# --------------------------------------------------------------------------------------
# Training


def split_holdout(data: PreparedData, fraction: float, seed: int
                  ) -> tuple[PreparedData, Tensor, Tensor]:
    """Hold out ``fraction`` of the training samples, labels as observed (as noisy as the
    training set's): what a user without clean labels can validate on. Returns the
    remaining training data and the held-out images and labels."""
    n = data.train_y.numel()
    count = int(round(fraction * n))
    if count < 1 or count >= n:
        raise ValueError(f"a held-out fraction of {fraction} leaves no split of {n} samples")
    perm = torch.randperm(n, generator=_generator(stream_seed(seed, "holdout")))
    held, kept = perm[:count].sort().values, perm[count:].sort().values
    held, kept = held.to(data.train_y.device), kept.to(data.train_y.device)
    # Every per-sample training tensor (images, labels, noise mask, ...) keeps its rows.
    changes = {f.name: getattr(data, f.name)[kept] for f in fields(data)
               if not f.name.startswith("test_") and isinstance(getattr(data, f.name), Tensor)
               and getattr(data, f.name).shape[:1] == (n,)}
    rest = replace(data, **changes)
    rest.noise_fraction = float(rest.is_noisy.float().mean())
    return rest, data.train_x[held], data.train_y[held]


@dataclass
class LoopState:
    """The loop's state between steps, in one place: with the model's, the optimizer's and
    the trainer's ``state_dict``, what a run needs to resume where it stopped."""

    order_rng: torch.Generator
    augment_rng: torch.Generator
    epoch: int = 0  # epochs completed
    step: int = 0  # steps attempted, skipped ones included (the lr schedule counts them)
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    eval_seconds: float = 0.0
    best_heldout: float = -math.inf  # early stopping: best held-out accuracy so far
    best_epoch: int | None = None
    best_weights: dict[str, Tensor] | None = None
    stopped: bool = False
    noise_scale: dict | None = None  # gaf.NoiseScale.state_dict() (None: nothing measured)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def train(
    cfg: TrainConfig,
    data: PreparedData | None = None,
    epoch_hook: Callable[[int, nn.Module], None] | None = None,
    progress_bar: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    tag: str | None = None,
) -> RunResult:
    """Train one model as ``cfg`` says and return its per-epoch history.

    ``data`` reuses tensors prepared for the same data settings; ``epoch_hook(epoch,
    model)`` is called before training (epoch 0) and after each epoch's evaluation.
    With ``cfg.progress``, a tqdm bar shows progress on a terminal (``progress_bar``), else
    one line per epoch is printed.

    ``checkpoint_dir``: checkpoint there at every epoch's end and every
    ``cfg.checkpoint_every`` steps (:mod:`gaflab.resume`); with ``resume``,
    continue from its newest usable checkpoint (the hooks of epochs already done are not
    called again), else start afresh. ``tag`` names the run in printed lines (default: its
    label, seed and noise; a grid adds "run k/N").
    """
    tag = tag or run_tag(cfg)
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if data is None:
        data = prepare_data(cfg)
    heldout = None
    if cfg.holdout_fraction > 0:
        data, hx, hy = split_holdout(data, cfg.holdout_fraction, cfg.seed)
        heldout = (hx, hy)
    dev = torch.device(cfg.device)
    # Model init, data order and augmentation each have their own seeded stream, none of
    # which depends on the method: compared runs start equal and see the same batches.
    torch.manual_seed(stream_seed(cfg.seed, "model"))
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size,
                        cfg.width).to(dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, model)
    # The trainer calls `forward` (maybe compiled); weights, optimizer, checkpoints: `model`.
    forward = prepare_model(model, cfg.channels_last, cfg.compile)
    method = build_step(cfg, forward, opt, data.noise_fraction)
    state = LoopState(order_rng=_generator(stream_seed(cfg.seed, "order")),
                      augment_rng=_generator(stream_seed(cfg.seed, "augment")))
    m = cfg.num_micro_batches
    sources = batch_sources(cfg, data)  # None unless micro-batches come one source each
    first = epoch_batches(data.train_y, data.num_classes, cfg.micro_batch_size, m,
                          cfg.class_balanced, _generator(0), sources)
    steps_per_epoch = first.shape[0]
    if cfg.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{data.train_y.numel()} training samples do not fill one step of "
            f"{m} x {cfg.micro_batch_size}"
        )
    result = RunResult(config=cfg.to_dict(), label=cfg.label,
                       num_params=sum(p.numel() for p in params),
                       noise_fraction=data.noise_fraction, data=dict(data.described or {}))
    if heldout is not None:
        result.data.update(train_images=int(data.train_y.numel()),
                           heldout_images=int(heldout[1].numel()))
    print(f"[{tag}] data: {describe_data(result.data)}", flush=True)
    ckpt, partial = _checkpoints(checkpoint_dir, resume, cfg, model, opt, method, state, result,
                                 tag)
    if epoch_hook is not None and state.step == 0:
        epoch_hook(0, model)
    bar = _progress(steps_per_epoch * cfg.epochs, cfg, tag) if progress_bar else None
    first_epoch, first_seconds = state.epoch, state.train_seconds + state.eval_seconds
    if bar is not None and state.step:
        bar.update(state.step)
    while state.epoch < cfg.epochs and not state.stopped:
        row = run_epoch(cfg, data, model, opt, method, state, steps_per_epoch, bar,
                        partial, ckpt)
        partial = None
        result.distance_trace.extend(row.pop("_distances"))
        result.skipped_steps += row.pop("_skipped")
        t0 = time.perf_counter()
        with autocast(cfg.amp, dev):  # evaluate in the precision the model trains in
            row.update(evaluate(model, data, cfg.eval_batch_size))
            if heldout is not None:
                row["heldout_acc"] = heldout_accuracy(model, *heldout, cfg.eval_batch_size)
            if cfg.method == "early-stop":
                _early_stop(cfg, model, state, row["heldout_acc"])
        state.eval_seconds += time.perf_counter() - t0
        result.history.append(row)
        result.steps += steps_per_epoch
        for w in collapse_warnings(cfg, result.history, data.num_classes):
            result.warnings.append(w)
            print(f"[{tag}] warning: {w['message']}", flush=True)
        if epoch_hook is not None:
            epoch_hook(state.epoch, model)
        if bar is not None:
            bar.set_postfix(ep=state.epoch, test=f"{row['test_acc']:.3f}",
                            mem=f"{row['memorised']:.3f}", skip=f"{row['skip_rate']:.2f}",
                            B=f"{row['b_simple']:.0f}")
        elif cfg.progress:
            spent = state.train_seconds + state.eval_seconds - first_seconds
            done = state.epoch - first_epoch
            eta = spent / done * (cfg.epochs - state.epoch) if done else float("nan")
            print(_epoch_line(tag, row, cfg.epochs, eta), flush=True)
        if ckpt is not None:
            ckpt.save()
    if bar is not None:
        bar.close()
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
        result.stopped_epoch = state.best_epoch
    result.train_seconds = state.train_seconds
    result.train_cpu_seconds = state.train_cpu_seconds
    result.eval_seconds = state.eval_seconds
    result.model = model
    result.noise_scale = state.noise_scale
    return result


def run_epoch(cfg: TrainConfig, data: PreparedData, model: nn.Module,
              opt: torch.optim.Optimizer, method: MethodStep, state: LoopState,
              steps_per_epoch: int, bar=None, partial: PartialEpoch | None = None,
              ckpt: RunCheckpoints | None = None) -> dict[str, Any]:
    """One epoch of steps through the method's trainer; returns the epoch's history row
    (without the evaluation). ``partial`` continues an epoch a checkpoint interrupted;
    ``ckpt`` takes the mid-epoch checkpoints."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    dev = data.train_x.device
    m, b = cfg.num_micro_batches, cfg.micro_batch_size
    total_steps = steps_per_epoch * cfg.epochs
    base_lrs = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
    for g, base in zip(opt.param_groups, base_lrs, strict=True):
        g.setdefault("initial_lr", base)
    if partial is None:
        batches = epoch_batches(data.train_y, data.num_classes, b, m, cfg.class_balanced,
                                state.order_rng, batch_sources(cfg, data))[:steps_per_epoch]
        log, start = EpochLog(m, torch.zeros((), device=dev)), 0
    else:
        batches, log, start = partial.batches, partial.log, partial.next_step
        t0 -= partial.seconds
    batches = batches.to(dev)
    method.begin_epoch(state.epoch)
    if partial is not None and partial.kept is not None:
        method.small_loss.kept[:] = partial.kept
    record = cfg.record_distances and m >= 2
    # The collector feeds its NoiseScale from each filtered step's Gram (stacked mode while
    # distances are recorded); averaging's side Grams go into the same object at the end of
    # the epoch. The trainer's state_dict (checkpoints) carries it.
    noise = method.trainer.collector.noise_scale
    for s in range(start, batches.shape[0]):
        f = lr_factor(cfg, state.step, total_steps, steps_per_epoch)
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * f
        idx = batches[s].reshape(-1)
        x = data.train_x[idx]
        if cfg.augment:
            x = augment_batch(x, state.augment_rng)
        out, gram = method.step(step_input(x, cfg.channels_last), data.train_y[idx])
        res = out.result
        log.record(out.loss, out.skipped, res.accepted.numpy(),
                   res.distances.numpy() if record and gram is None else None, res.anchor)
        if gram is not None:  # averaging: distances measured on the side
            log.grams.append(gram)
        state.step += 1
        if bar is not None:
            bar.update(1)
        if ckpt is not None:
            kept = method.small_loss.kept if method.small_loss is not None else None
            ckpt.step_done(state.step, batches, s + 1, log, kept, time.perf_counter() - t0)
    side_grams = log.resolve_grams()
    if side_grams is not None:  # averaging's Grams are of g_k / M: B is scale-free
        for g in side_grams:
            noise.update(g, batches.shape[2])
    if noise.num_steps:
        state.noise_scale = noise.state_dict()
    state.epoch += 1
    n_steps = batches.shape[0]
    selects = cfg.method in FILTERING_METHODS
    kept = method.small_loss.kept if method.small_loss is not None else None
    precision = log.precision(data.is_noisy[batches] if bool(data.noise_fraction > 0) else None,
                              selects, kept)
    if kept is not None:
        kept.clear()
    t1 = time.perf_counter()
    state.train_seconds += t1 - t0
    state.train_cpu_seconds += time.process_time() - cpu0
    dist = log.step_distance
    finite = [d for d in dist if math.isfinite(d)]
    row = {
        "epoch": state.epoch,
        "step": state.step,
        "lr": opt.param_groups[0]["lr"],
        "train_loss": float(log.loss_sum) / n_steps,
        "skip_rate": sum(log.skipped) / n_steps,
        "distance_mean": float(np.mean(finite)) if finite else float("nan"),
        "distance_p10": float(np.percentile(finite, 10)) if finite else float("nan"),
        "distance_p50": float(np.percentile(finite, 50)) if finite else float("nan"),
        "distance_p90": float(np.percentile(finite, 90)) if finite else float("nan"),
        "epoch_seconds": t1 - t0,
        **noise_scale_fields(noise, batches.shape[2]),
        **(log.update_fractions() if selects else {}),
        **precision,
        "_distances": dist,
        "_skipped": sum(log.skipped),
    }
    if method.small_loss is not None:
        row["forget_rate"] = method.small_loss.rate
    return row


def noise_scale_fields(noise: gaf.NoiseScale, b: int) -> dict[str, float]:
    """The epoch's gradient noise scale (gaf.NoiseScale: an exponential average over about
    the last 200 steps) and the cosine distance it forecasts between two micro-gradients of
    ``b`` samples, B / (B + b); NaN when nothing was measured (distances not recorded,
    M = 1, a measure other than cosine). With M = 2 the forecast compares with
    ``distance_p50``."""
    big_b = noise.b_simple
    if big_b is None:
        return {"b_simple": float("nan"), "distance_forecast": float("nan")}
    return {"b_simple": big_b, "distance_forecast": noise.expected_distance(b)}


def _checkpoints(directory, resume: bool, cfg: TrainConfig, model, opt, method, state,
                 result, tag: str) -> tuple[RunCheckpoints | None, PartialEpoch | None]:
    """The run's checkpointer (None without a directory) and, when resuming inside an
    epoch, where that epoch stopped."""
    if directory is None:
        if resume:
            raise ValueError("resume needs the run's checkpoint directory (--out)")
        return None, None
    ckpt = RunCheckpoints(directory, cfg.to_dict(), cfg.checkpoint_every)
    ckpt.bind(model, opt, method, state, result)
    if not resume:
        ckpt.clear()
        return ckpt, None
    partial = ckpt.restore()
    if partial is False:
        print(f"[{tag}] no checkpoint in {directory}: starting afresh", flush=True)
    else:
        where = (f"epoch {state.epoch + 1}, step {partial.next_step} of that epoch"
                 if partial is not None else f"the end of epoch {state.epoch}")
        print(f"[{tag}] resumed from {ckpt.restored_from} at {where} "
              f"({state.step} steps done)", flush=True)
    return ckpt, (partial or None)


@torch.no_grad()
def _early_stop(cfg: TrainConfig, model: nn.Module, state: LoopState, acc: float) -> None:
    """Keep the weights of the best held-out epoch; stop after ``patience`` epochs
    without improvement (None: train every epoch, still report the best one)."""
    if acc > state.best_heldout:
        state.best_heldout, state.best_epoch = acc, state.epoch
        state.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    elif cfg.patience is not None and state.epoch - (state.best_epoch or 0) >= cfg.patience:
        state.stopped = True


def _progress(total: int, cfg: TrainConfig, tag: str):
    if not cfg.progress:
        return None
    try:
        # Only when a progress bar is asked for: tqdm is optional.
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc=tag, unit="step", mininterval=1.0, leave=True,
               dynamic_ncols=True, disable=None)
    if bar.disable:  # not a terminal: one line per epoch instead
        bar.close()
        return None
    return bar


def run_tag(cfg: TrainConfig, position: str | None = None) -> str:
    """How printed lines name a run: label, seed and noise (two seeds of a grid differ),
    and in a grid its position, e.g. ``gaf (tau=0.97) | seed 1 | symmetric 40% | run 2/6``."""
    noise = cfg.noise if cfg.noise in ("none", "human") else f"{cfg.noise} {cfg.noise_rate:.0%}"
    parts = [cfg.label, f"seed {cfg.seed}", noise] + ([position] if position else [])
    return " | ".join(parts)


def _epoch_line(tag: str, row: dict[str, float], epochs: int, eta: float) -> str:
    left = f", ETA {format_duration(eta)}" if math.isfinite(eta) and row["epoch"] < epochs else ""
    return (f"[{tag}] epoch {row['epoch']}/{epochs}: test {row['test_acc']:.4f} "
            f"memorised {row['memorised']:.4f} skip {row['skip_rate']:.2f} "
            f"dist {row['distance_mean']:.3f} B {row['b_simple']:.0f} "
            f"({row['epoch_seconds']:.1f}s{left})")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def default_threads(jobs: int = 1) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, jobs))
