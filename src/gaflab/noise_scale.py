"""``gaf noise-scale``: the gradient noise scale of the user's own setting, from a short run.

Runs ``--steps`` training steps of the setting the options describe (the same options as
``gaf train``; one epoch at most), feeds every step's Gram matrix to
:class:`gaf.NoiseScale`, and prints B_simple = tr(Σ)/|G|² with what it forecasts: the cosine
distance D(b) = B/(B+b) between two micro-gradients of b samples, and the micro-batch size
b* = B(1-tau)/tau above which the paper's rule at tau accepts (docs/noise-scale.md).
"""

from __future__ import annotations

import argparse
import math

import gaf
from gaflab.config import TrainConfig
from gaflab.options import (
    METHODS_HELP,
    add_common_options,
    apply_options,
    fraction,
    method_name,
    nonneg_int,
    positive,
    tau_value,
)
from gaflab.train import train

FORECAST_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("noise-scale", help="measure the gradient noise scale B_simple over a "
                       "short run; forecast agreement per micro-batch size",
                       description=__doc__.split("\n\n")[1])
    add_common_options(p)
    p.add_argument("--steps", type=positive, default=200, help="training steps (default 200)")
    p.add_argument("--method", type=method_name, default="average", help=METHODS_HELP)
    p.add_argument("--tau", type=tau_value, default=0.97,
                   help="the threshold to forecast for (and GAF's, with --method gaf)")
    p.add_argument("--noise-rate", type=fraction, default=0.0,
                   help="fraction of wrong labels (default 0: your data as it is)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    return p


def cmd_noise_scale(args, parser) -> int:
    base = TrainConfig(method=args.method, tau=args.tau, noise_rate=args.noise_rate,
                       seed=args.seed, epochs=1)
    cfg = apply_options(args, base, parser)
    if not cfg.record_distances or cfg.num_micro_batches < 2:
        parser.error("the noise scale needs M >= 2 micro-batches and recorded distances")
    cfg = cfg.replace(epochs=1, max_steps=args.steps)
    result = train(cfg, progress_bar=False)
    noise = gaf.NoiseScale()
    if result.noise_scale is not None:
        noise.load_state_dict(result.noise_scale)
    print(report(noise, cfg, result.steps, args.steps, result.final))
    return 0


def report(noise: gaf.NoiseScale, cfg: TrainConfig, steps: int, asked: int,
           row: dict) -> str:
    b, tau = cfg.micro_batch_size, cfg.tau
    head = (f"{cfg.dataset}, {cfg.model}, {cfg.num_micro_batches} x {b}, {cfg.method}: "
            f"{steps} steps" + (f" (one epoch holds {steps}; {asked} asked)"
                                if steps < asked else ""))
    big_b = noise.b_simple
    if big_b is None:
        return head + "\nno step had two valid micro-gradients: nothing measured"
    lines = [head,
             f"B_simple = tr(Σ)/|G|² = {big_b:.1f}   (|G|² {noise.grad_sq:.4g}, "
             f"tr(Σ) {noise.trace_cov:.4g}; averaged over ~200 steps)"]
    if math.isinf(big_b):
        lines.append("the averaged |G|² is not above zero: noise dominates; run longer or "
                     "with larger micro-batches")
        return "\n".join(lines)
    lines.append(f"at b = {b}: forecast distance {noise.expected_distance(b):.3f}, observed "
                 f"median {row.get('distance_p50', float('nan')):.3f}, skip rate "
                 f"{row.get('skip_rate', float('nan')):.2f} (method {cfg.method})")
    lines.append(f"the paper's rule at tau {tau} accepts from about b* = B(1-tau)/tau = "
                 f"{noise.micro_batch_for(tau):.1f} samples per micro-batch")
    lines.append("\n   b   forecast D(b)   D(b) <= tau")
    for size in FORECAST_SIZES:
        d = noise.expected_distance(size)
        lines.append(f"{size:4d}   {d:13.3f}   {'yes' if d <= tau else 'no'}")
    return "\n".join(lines)
