"""The training loop: plain averaging or GAF over the same micro-batches.

One optimizer step takes ``M = num_micro_batches`` micro-batches of ``micro_batch_size``
samples.

``average``  plain gradient accumulation: each micro-batch's loss is divided by M and
             back-propagated into the same ``.grad``; one optimizer step. This is what
             data-parallel SGD computes.
``gaf``      :class:`gaf.GradientCollector` takes each micro-gradient out of ``.grad``;
             ``finish()`` writes the filtered mean back, or reports a skipped step, in
             which case the optimizer does not step (momentum is not advanced either).

Both methods record the cosine distance of each micro-gradient to the running sum of the
earlier ones (the quantity GAF thresholds); for ``average`` it is measured on the side
from snapshots of the accumulated gradient and does not change the update.

Hot path: the only host synchronisation per step is GAF's accept/skip decision (the
optimizer needs it on the host). Losses, and averaging's side distances, accumulate on the
device and are read once per epoch. Evaluation runs under ``no_grad`` in large batches over
whole tensors, with one transfer of its statistics.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from gaf.experiments.batches import batch_sources, epoch_batches
from gaf.experiments.config import TrainConfig, stream_seed
from gaf.experiments.models import build_model
from gaf.experiments.prepare import PreparedData, prepare_data


@dataclass
class RunResult:
    """Everything a run produced; ``to_dict`` is what results.json stores."""

    config: dict[str, Any]
    label: str
    history: list[dict[str, float]] = field(default_factory=list)
    distance_trace: list[float] = field(default_factory=list)  # per step, mean over rows
    num_params: int = 0
    steps: int = 0
    skipped_steps: int = 0
    noise_fraction: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # not saved

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}

    @property
    def final_test_acc(self) -> float:
        return float(self.final.get("test_acc", float("nan")))

    @property
    def best_test_acc(self) -> float:
        return max((h["test_acc"] for h in self.history), default=float("nan"))

    @property
    def final_memorised(self) -> float:
        return float(self.final.get("memorised", float("nan")))

    @property
    def skip_rate(self) -> float:
        return self.skipped_steps / self.steps if self.steps else 0.0

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "label": self.label,
            "method": c["method"],
            "tau": c["tau"] if c["method"] == "gaf" else None,
            "rule": c["rule"] if c["method"] == "gaf" else None,
            "noise": c["noise"],
            "noise_rate": c["noise_rate"],
            "seed": c["seed"],
            "final_test_acc": self.final_test_acc,
            "best_test_acc": self.best_test_acc,
            "final_memorised": self.final_memorised,
            "final_train_acc_clean": float(self.final.get("train_acc_clean", float("nan"))),
            "skip_rate": self.skip_rate,
            "distance_median": _median(self.distance_trace),
            "train_seconds": self.train_seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "config": self.config,
            "summary": self.summary(),
            "history": self.history,
            "distance_trace": [round(float(d), 5) for d in self.distance_trace],
            "num_params": self.num_params,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "noise_fraction": self.noise_fraction,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        nan = float("nan")  # results.json stores NaN as null
        return cls(
            config=d["config"],
            label=d["label"],
            history=[{k: nan if v is None else v for k, v in h.items()} for h in d["history"]],
            distance_trace=[nan if v is None else v for v in d.get("distance_trace", [])],
            num_params=d.get("num_params", 0),
            steps=d.get("steps", 0),
            skipped_steps=d.get("skipped_steps", 0),
            noise_fraction=d.get("noise_fraction", 0.0),
            train_seconds=d.get("train_seconds", 0.0),
            eval_seconds=d.get("eval_seconds", 0.0),
        )


def _median(xs: list[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return float(np.median(finite)) if finite else float("nan")


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
def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    was_training = model.training
    model.eval()
    preds = [model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=x.device)


def evaluate(model: nn.Module, data: PreparedData, batch_size: int) -> dict[str, float]:
    """Test accuracy; on the training set: accuracy on clean samples, and on noisy samples
    the fraction predicted with their noisy label (memorised) or their true label."""
    test_pred = predict(model, data.test_x, batch_size)
    train_pred = predict(model, data.train_x, batch_size)
    noisy = data.is_noisy
    clean = ~noisy
    hit_obs = (train_pred == data.train_y).float()
    hit_true = (train_pred == data.clean_y).float()
    n_noisy = noisy.sum().clamp_min(1)
    stats = torch.stack([
        (test_pred == data.test_y).float().mean(),
        (hit_obs * clean).sum() / clean.sum().clamp_min(1),
        (hit_obs * noisy).sum() / n_noisy,
        (hit_true * noisy).sum() / n_noisy,
        hit_obs.mean(),
    ]).tolist()  # one host transfer
    has_noisy = bool(noisy.any())
    return {
        "test_acc": stats[0],
        "train_acc_clean": stats[1],
        "memorised": stats[2] if has_noisy else float("nan"),
        "noisy_true": stats[3] if has_noisy else float("nan"),
        "train_acc_observed": stats[4],
    }


# --------------------------------------------------------------------------------------
# Training


def _flat_grad(params: list[Tensor], out: Tensor) -> Tensor:
    torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
               for p in params], out=out)
    return out


def _make_collector(params: list[Tensor], cfg: TrainConfig):
    from gaf import GradientCollector
    from gaf.thresholds import parse_threshold

    tau = parse_threshold(cfg.threshold) if cfg.threshold else cfg.tau
    return GradientCollector(params, tau=tau, rule=cfg.rule, measure=cfg.measure)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def train(
    cfg: TrainConfig,
    data: PreparedData | None = None,
    epoch_hook: Callable[[int, nn.Module], None] | None = None,
    progress_bar: bool = True,
) -> RunResult:
    """Train one model as ``cfg`` says and return its per-epoch history.

    ``data`` reuses tensors prepared for the same data settings; ``epoch_hook(epoch,
    model)`` is called before training (epoch 0) and after each epoch's evaluation.
    With ``cfg.progress``, a tqdm bar shows progress on a terminal (``progress_bar``), else
    one line per epoch is printed.
    """
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if data is None:
        data = prepare_data(cfg)
    dev = torch.device(cfg.device)
    # Model init, data order and augmentation each have their own seeded stream, none of
    # which depends on the method: compared runs start equal and see the same batches.
    torch.manual_seed(stream_seed(cfg.seed, "model"))
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size,
                        cfg.width).to(dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    opt = make_optimizer(cfg, model)
    base_lrs = [g["lr"] for g in opt.param_groups]
    order_gen = _generator(stream_seed(cfg.seed, "order"))
    aug_gen = _generator(stream_seed(cfg.seed, "augment"))
    m = cfg.num_micro_batches
    is_gaf = cfg.method == "gaf"
    collector = _make_collector(params, cfg) if is_gaf else None
    record = cfg.record_distances and not is_gaf and m >= 2
    snap = torch.empty(m, num_params, device=dev) if record else None

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
    total_steps = steps_per_epoch * cfg.epochs
    result = RunResult(config=cfg.to_dict(), label=cfg.label, num_params=num_params,
                       noise_fraction=data.noise_fraction)

    if epoch_hook is not None:
        epoch_hook(0, model)
    bar = _progress(total_steps, cfg) if progress_bar else None
    step = 0
    t_train = t_eval = 0.0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        batches = epoch_batches(data.train_y, data.num_classes, cfg.micro_batch_size, m,
                                cfg.class_balanced, order_gen, sources)[:steps_per_epoch].to(dev)
        loss_sum = torch.zeros((), device=dev)
        epoch_dist: list[float] = []
        device_dist: list[Tensor] = []  # averaging: read once per epoch
        epoch_skips = 0
        for s in range(batches.shape[0]):
            f = lr_factor(cfg, step, total_steps, steps_per_epoch)
            for g, base in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = base * f
            idx = batches[s].reshape(-1)
            x = data.train_x[idx]
            if cfg.augment:
                x = augment_batch(x, aug_gen)
            x = x.view(m, cfg.micro_batch_size, *x.shape[1:])
            y = data.train_y[idx].view(m, cfg.micro_batch_size)
            opt.zero_grad(set_to_none=True)
            for k in range(m):
                loss = F.cross_entropy(model(x[k]), y[k])
                loss_sum += loss.detach()
                if is_gaf:
                    loss.backward()
                    collector.collect()
                else:
                    (loss / m).backward()
                    if record:
                        _flat_grad(params, snap[k])
            if is_gaf:
                res = collector.finish()
                dist = res.distances.tolist()
                epoch_dist.append(_mean_non_anchor(dist, res.anchor))
                if res.skipped:
                    epoch_skips += 1
                    step += 1
                    if bar is not None:
                        bar.update(1)
                    continue
            elif record:
                device_dist.append(_average_distance(snap))
            if cfg.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
        n_steps = batches.shape[0]
        train_loss = float(loss_sum) / (n_steps * m)
        if device_dist:
            epoch_dist = torch.stack(device_dist).tolist()
        t1 = time.perf_counter()
        metrics = evaluate(model, data, cfg.eval_batch_size)
        t2 = time.perf_counter()
        t_train += t1 - t0
        t_eval += t2 - t1
        result.steps += n_steps
        result.skipped_steps += epoch_skips
        result.distance_trace.extend(epoch_dist)
        finite = [d for d in epoch_dist if math.isfinite(d)]
        row = {
            "epoch": epoch,
            "step": step,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": train_loss,
            **metrics,
            "skip_rate": epoch_skips / n_steps,
            "distance_mean": float(np.mean(finite)) if finite else float("nan"),
            "distance_p10": float(np.percentile(finite, 10)) if finite else float("nan"),
            "distance_p50": float(np.percentile(finite, 50)) if finite else float("nan"),
            "distance_p90": float(np.percentile(finite, 90)) if finite else float("nan"),
            "epoch_seconds": t1 - t0,
        }
        result.history.append(row)
        if epoch_hook is not None:
            epoch_hook(epoch, model)
        if bar is not None:
            bar.set_postfix(ep=epoch, test=f"{metrics['test_acc']:.3f}",
                            mem=f"{metrics['memorised']:.3f}", skip=f"{row['skip_rate']:.2f}")
        elif cfg.progress:
            print(_epoch_line(cfg.label, row), flush=True)
    if bar is not None:
        bar.close()
    result.train_seconds = t_train
    result.eval_seconds = t_eval
    result.model = model
    return result


def _mean_non_anchor(distances: list[float], anchor: int) -> float:
    vals = [d for i, d in enumerate(distances) if i != anchor]
    return float(np.mean(vals)) if vals else float("nan")


def _average_distance(snapshots: Tensor) -> Tensor:
    """Mean distance of an accumulation step's micro-gradients to the running sum of the
    earlier ones, as a 0-d tensor on the gradients' device (no host synchronisation).

    ``snapshots[k]`` is the accumulated gradient after micro-batch k, so micro-gradient k is
    ``snapshots[k] - snapshots[k-1]`` (up to the common factor 1/M, which no cosine sees).
    With the Gram matrix G of the micro-gradients and s_k = g_0 + … + g_{k-1}:
    ``s_k·g_k = Σ_{i<k} G[i, k]`` and ``|s_k|² = Σ_{i,j<k} G[i, j]``: the distances the
    paper's rule measures when it accepts everything (tau = 2). A zero or non-finite
    micro-gradient gives NaN here, which the epoch statistics leave out.
    """
    micro = torch.diff(snapshots, dim=0, prepend=torch.zeros_like(snapshots[:1]))
    g = (micro @ micro.T).double()  # float64: the sums below cancel
    col = g.cumsum(0)  # col[k-1, k] = Σ_{i<k} G[i, k]
    block = col.cumsum(1)  # block[k-1, k-1] = Σ_{i,j<k} G[i, j]
    k = torch.arange(1, g.shape[0], device=g.device)
    dot = col[k - 1, k]
    norm_sq = block[k - 1, k - 1] * g[k, k]
    dist = (1.0 - dot / norm_sq.sqrt()).clamp(0.0, 2.0)
    return dist.mean()


def _progress(total: int, cfg: TrainConfig):
    if not cfg.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc=cfg.label, unit="step", mininterval=1.0, leave=True,
               dynamic_ncols=True, disable=None)
    if bar.disable:  # not a terminal: one line per epoch instead
        bar.close()
        return None
    return bar


def _epoch_line(label: str, row: dict[str, float]) -> str:
    return (f"[{label}] epoch {row['epoch']}: test {row['test_acc']:.4f} "
            f"memorised {row['memorised']:.4f} skip {row['skip_rate']:.2f} "
            f"dist {row['distance_mean']:.3f} ({row['epoch_seconds']:.1f}s)")


def default_threads(jobs: int = 1) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, jobs))
