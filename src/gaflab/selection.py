"""Selection precision: how noisy is what a method kept, against what it dropped.

With a known noise mask (synthetic noise, CIFAR-N), every epoch records

``kept_noise_fraction``     noise fraction of the samples that entered an update: those of
                            the micro-batches accepted in taken steps, or for a method that
                            selects samples (small-loss) of the kept samples;
``dropped_noise_fraction``  the same for everything else;
``*_chance_std``            the standard deviation the kept (dropped) fraction would have if
                            the same number of micro-batches (samples) were chosen at random
                            from the epoch's: sqrt(σ²/n · (N - n)/(N - 1)), σ² the variance
                            of the units' noise fractions (sampling without replacement);
``taken_noise_fraction``,   noise fraction of the samples of taken and of skipped steps,
``skipped_noise_fraction``  with their chance spread over steps;
``distance_noise_spearman`` rank correlation of a micro-batch's distance (to the running
                            sum, as the rule tested it) with its noise fraction; GAF gains
                            from its choice only if this is positive.

Methods that keep everything (averaging, GCE) have NaN in the kept/dropped fields, never 0.
Decisions arrive on the host with each step (GAF's one sync); the noise counts and the
kept-sample masks stay on the device and are read once per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from gaf.core import decide

NAN = float("nan")
PRECISION_FIELDS = (
    "kept_noise_fraction", "dropped_noise_fraction", "kept_noise_chance_std",
    "dropped_noise_chance_std", "taken_noise_fraction", "skipped_noise_fraction",
    "taken_noise_chance_std", "skipped_noise_chance_std", "distance_noise_spearman",
)


def chance_std(values: np.ndarray, n: int) -> float:
    """Std of the mean of ``n`` units drawn without replacement from ``values``."""
    total = values.size
    if n <= 0 or total < 2:
        return NAN
    var = float(values.var())
    return math.sqrt(max(var / n * (total - n) / (total - 1), 0.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0 … n-1 with ties sharing their mean rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation; NaN with fewer than 3 pairs or a constant side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3:
        return NAN
    ra, rb = average_ranks(a), average_ranks(b)
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return NAN
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb))


def _fraction(noisy: float, count: float) -> float:
    return noisy / count if count > 0 else NAN


def micro_batch_precision(noisy: np.ndarray, size: int, used: np.ndarray,
                          skipped: np.ndarray) -> dict[str, float]:
    """Precision of a micro-batch choice. ``noisy`` [steps, M] counts noisy samples per
    micro-batch of ``size`` samples; ``used`` [steps, M] marks micro-batches that entered an
    update; ``skipped`` [steps] marks skipped steps."""
    frac = noisy / size
    n_used = int(used.sum())
    n_all = used.size
    step_frac = frac.mean(axis=1)
    n_skip = int(skipped.sum())
    return {
        "kept_noise_fraction": _fraction(float(noisy[used].sum()), n_used * size),
        "dropped_noise_fraction": _fraction(float(noisy[~used].sum()), (n_all - n_used) * size),
        "kept_noise_chance_std": chance_std(frac.reshape(-1), n_used),
        "dropped_noise_chance_std": chance_std(frac.reshape(-1), n_all - n_used),
        "taken_noise_fraction": float(step_frac[~skipped].mean()) if n_skip < skipped.size
        else NAN,
        "skipped_noise_fraction": float(step_frac[skipped].mean()) if n_skip else NAN,
        "taken_noise_chance_std": chance_std(step_frac, skipped.size - n_skip),
        "skipped_noise_chance_std": chance_std(step_frac, n_skip),
    }


def sample_precision(kept_noisy: float, kept: int, total_noisy: float, total: int
                     ) -> dict[str, float]:
    """Precision of a sample choice (small-loss): binary units, σ² = π(1 - π)."""
    pi = total_noisy / total if total else NAN
    units = np.array([1.0] * int(round(total_noisy)) + [0.0] * (total - int(round(total_noisy))))
    return {
        "kept_noise_fraction": _fraction(kept_noisy, kept),
        "dropped_noise_fraction": _fraction(total_noisy - kept_noisy, total - kept),
        "kept_noise_chance_std": chance_std(units, kept) if math.isfinite(pi) else NAN,
        "dropped_noise_chance_std": chance_std(units, total - kept) if math.isfinite(pi)
        else NAN,
    }


@dataclass
class EpochLog:
    """What the loop records per step, turned into the epoch's statistics by :meth:`close`.

    Host: the decisions (accepted rows, distances, anchor, skipped) that came back with
    each step. Device: the summed loss and small-loss's kept-sample masks.
    """

    num_micro_batches: int
    loss_sum: Tensor
    accepted: list[np.ndarray] = field(default_factory=list)
    distances: list[np.ndarray] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    step_distance: list[Tensor | float] = field(default_factory=list)
    grams: list[Tensor] = field(default_factory=list)  # averaging: per step, on the device

    def record(self, loss: Tensor, skipped: bool, accepted: np.ndarray | None = None,
               distances: np.ndarray | None = None, anchor: int = 0) -> None:
        self.loss_sum += loss
        self.skipped.append(bool(skipped))
        if accepted is not None:
            self.accepted.append(np.asarray(accepted, dtype=bool))
        if distances is not None:
            self.add_distances(distances, anchor)

    def resolve_grams(self) -> None:
        """Averaging's per-step Gram matrices become distances: one transfer for the epoch,
        then :func:`gaf.core.decide` at tau = 2 (every valid row accepted) reports each
        row's distance to the running sum of the earlier ones, as GAF would test it."""
        if not self.grams:
            return
        host = torch.stack(self.grams).cpu()
        self.grams.clear()
        for g in host:
            self.add_distances(decide(g, 2.0, "mean").distances)

    def add_distances(self, distances: np.ndarray, anchor: int = 0) -> None:
        """One step's distances (rows in order; the anchor's is 0 and left out of means)."""
        d = np.asarray(distances, dtype=np.float64)
        self.distances.append(d)
        rest = [v for i, v in enumerate(d.tolist()) if i != anchor]
        self.step_distance.append(float(np.mean(rest)) if rest else NAN)
        self.anchors.append(anchor)

    def precision(self, is_noisy_batches: Tensor | None, selects_steps: bool,
                  kept_samples: list[Tensor] | None = None) -> dict[str, float]:
        """Selection statistics of the epoch (NaN when the method keeps everything or the
        noise mask is unknown). ``is_noisy_batches`` [steps, M, b] bool, on the device."""
        out = dict.fromkeys(PRECISION_FIELDS, NAN)
        if is_noisy_batches is None:
            return out
        steps, m, b = is_noisy_batches.shape
        counts = is_noisy_batches.sum(-1)
        if kept_samples:
            kept = torch.stack(kept_samples).view(steps, m, b)
            packed = torch.stack([counts, (kept & is_noisy_batches).sum(-1), kept.sum(-1)])
        else:
            packed = counts[None]
        host = packed.cpu().numpy().astype(np.float64)  # the epoch's one transfer
        noisy = host[0]
        if kept_samples:
            out.update(sample_precision(float(host[1].sum()), int(host[2].sum()),
                                        float(noisy.sum()), noisy.size * b))
        elif selects_steps and len(self.accepted) == steps:
            skipped = np.asarray(self.skipped, dtype=bool)
            used = np.stack(self.accepted) & ~skipped[:, None]
            out.update(micro_batch_precision(noisy, b, used, skipped))
        if len(self.distances) == steps:
            dist = np.stack(self.distances)
            not_anchor = np.ones_like(dist, dtype=bool)
            not_anchor[np.arange(steps), np.maximum(np.asarray(self.anchors), 0)] = False
            out["distance_noise_spearman"] = spearman(dist[not_anchor], noisy[not_anchor] / b)
        return out

    def update_fractions(self) -> dict[str, float]:
        """Share of micro-batches that entered an update, and share of non-anchor
        micro-batches rejected (the rate a matched random-drop uses)."""
        if not self.accepted:
            return {"update_fraction": NAN, "non_anchor_drop_rate": NAN}
        acc = np.stack(self.accepted)
        skipped = np.asarray(self.skipped, dtype=bool)
        used = acc & ~skipped[:, None]
        steps, m = acc.shape
        non_anchor = steps * (m - 1)
        return {
            "update_fraction": float(used.sum()) / acc.size,
            "non_anchor_drop_rate": (1.0 - float(acc.sum() - steps) / non_anchor)
            if non_anchor else NAN,
        }
