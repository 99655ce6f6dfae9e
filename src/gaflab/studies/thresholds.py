"""Thresholds and measures study: fixed tau grid vs adaptive thresholds vs agreement measures.

All methods of one setting (dataset, noise, seed) are trained *together*: R copies of the
same small MLP, stacked with torch.func.vmap, start from the same initial weights and see
the same micro-batches in the same order; only the filter differs. Per step each copy
gets its 2 micro-gradients, the library decides which to keep
(``gaf.core.decide`` on the Gram matrix for cosine, ``gaf.core.decide_with`` for the
other measures), the copy's threshold object (``gaf.thresholds``) sees the step's
``FilterResult`` exactly as ``GradientCollector.finish`` would show it, and the copies
that did not skip take a Nesterov-SGD step (torch.optim.SGD's arithmetic, masked per copy
so a skipped copy advances neither weights nor momentum). Batching the copies is what
makes a 30-setting × 11-to-13-method study fit a single shared CPU thread.

Usage (the committed results were made with the defaults; ``docs/thresholds-study.md``):

    gaf study thresholds --out results/thresholds/results.json
    gaf study thresholds --seeds 7 8 --noise sym30 asym20 --out /tmp/r.json

Noise settings: ``symN`` (N% symmetric) and ``asymN`` (N% asymmetric, the toolkit's
class map). The data come from the lab's dataset lookup (``--data-dir``, ``$GAF_DATA_DIR``,
the system locations; ``gaf data --dataset mnist`` fetches MNIST).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F  # noqa: N812

from gaf.core import decide, decide_with, result_from_decision
from gaf.core.measures import make_oracle
from gaf.thresholds import Threshold, parse_threshold
from gaflab.models import MLP
from gaflab.results import strict_json
from gaflab.studies.common import parse_noise, sgd_step, stacked_copies, study_data, versions


@dataclass
class Method:
    name: str
    threshold: str  # parse_threshold spec
    measure: str = "cosine"
    group: str = "fixed"
    skip_prob: float = 0.0  # control: average, but skip steps at random with this rate


def default_methods() -> list[Method]:
    ms = [Method("average (tau=2)", "2.0", group="fixed")]
    for tau in (0.9, 0.95, 0.97, 1.0):
        ms.append(Method(f"fixed {tau:g}", f"{tau}", group="fixed"))
    ms += [
        Method("moving-average k=1", "moving-average:k=1,tau_max=1", group="adaptive"),
        Method("quantile 0.7", "quantile:target_acceptance=0.7", group="adaptive"),
        Method("quantile 0.85", "quantile:target_acceptance=0.85", group="adaptive"),
        Method("null-tail z=1", "null-tail:z=1", group="adaptive"),
        Method("sign 0.97", "0.97", "sign", group="measure"),
        Method("sign moving-average", "moving-average:k=1,tau_max=1", "sign", group="measure"),
        Method("layerwise 0.97", "0.97", "layerwise", group="measure"),
        Method("layerwise moving-average", "moving-average:k=1,tau_max=1", "layerwise",
               group="measure"),
    ]
    return ms


def heldout_methods() -> list[Method]:
    """Round 2, on held-out seeds: the candidates, the references and two controls.

    "random skip p" averages every step but skips it with probability p (a seeded coin,
    blind to the gradients): it separates the effect of *which* steps are skipped from the
    effect of skipping that many. ``{warmup}`` is replaced by a third of the run's steps.
    """
    return [
        Method("average (tau=2)", "2.0", group="fixed"),
        Method("fixed 0.85", "0.85", group="fixed"),
        Method("fixed 0.9", "0.9", group="fixed"),
        Method("fixed 0.97", "0.97", group="fixed"),
        Method("random skip 35%", "2.0", group="control", skip_prob=0.35),
        Method("random skip 60%", "2.0", group="control", skip_prob=0.6),
        Method("moving-average k=1", "moving-average:k=1,tau_max=1", group="adaptive"),
        Method("quantile 0.7", "quantile:target_acceptance=0.7", group="adaptive"),
        Method("null-tail z=1", "null-tail:z=1", group="adaptive"),
        Method("null-tail z=1, warm-up 1/3", "null-tail:z=1,warmup_steps={warmup}",
               group="adaptive"),
        Method("fixed 0.9, warm-up 1/3", "step:values=2/0.9,milestones={warmup}",
               group="adaptive"),
    ]


METHOD_SETS = {"main": default_methods, "heldout": heldout_methods}


def run_setting(dataset: str, noise: str, seed: int, methods: list[Method], args) -> dict:
    kind, rate = parse_noise(noise)
    data = study_data(dataset, noise, seed, args.train_size, args.test_size, args.data_dir)
    x_train, y_train = data.train_x.flatten(1), data.train_y
    x_test = data.test_x.flatten(1)
    n = x_train.shape[0]
    r = len(methods)
    torch.manual_seed(1000 + seed)
    model = MLP(args.hidden)
    names, params, bufs = stacked_copies(model, r)
    segments = [params[k][0].numel() for k in names]

    def loss_fn(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    grads_of = vmap(grad(loss_fn), in_dims=(0, None, None))
    gen = torch.Generator().manual_seed(2000 + seed)
    coin = torch.Generator().manual_seed(3000 + seed)  # the random-skip controls
    b, mm = args.micro_batch, 2
    steps_per_epoch = n // (b * mm)
    warmup = steps_per_epoch * args.epochs // 3
    thresholds: list[Threshold] = [
        parse_threshold(m.threshold.replace("{warmup}", str(warmup))) for m in methods]
    skipped = np.zeros(r, dtype=int)
    tau_sum = np.zeros(r)
    history = []
    dist_log = [[] for _ in range(r)]
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=gen)[: steps_per_epoch * b * mm]
        perm = perm.view(steps_per_epoch, mm, b)
        ep_skip = np.zeros(r, dtype=int)
        ep_tau = np.zeros(r)
        ep_dist = [[] for _ in range(r)]
        for s in range(steps_per_epoch):
            rows = []
            for k in range(mm):
                idx = perm[s, k]
                g = grads_of(params, x_train[idx], y_train[idx])
                rows.append(torch.cat([g[name].reshape(r, -1) for name in names], dim=1))
            stack = torch.stack(rows, dim=1)  # [R, M, P]
            grams = torch.einsum("rmp,rnp->rmn", stack, stack)  # float32 as gram_matrix
            weights = np.zeros((r, mm))
            flips = torch.rand(r, generator=coin).tolist()
            for i, m in enumerate(methods):
                tau = thresholds[i].value()
                if m.measure == "cosine":
                    dec = decide(grams[i], tau, "mean")
                else:
                    dec = decide_with(make_oracle(stack[i], m.measure, segments), tau, "mean")
                res = result_from_decision(dec, stack[i, 0], tau, "mean")
                thresholds[i].observe(res)
                ep_tau[i] += tau
                ep_dist[i].append(float(dec.distances[1]))
                if res.skipped or flips[i] < m.skip_prob:
                    ep_skip[i] += 1
                else:
                    weights[i] = dec.weights
            w = torch.from_numpy(weights).to(stack.dtype)
            direction = torch.einsum("rm,rmp->rp", w, stack)
            step_mask = torch.from_numpy(weights.sum(1) > 0)
            sgd_step(params, bufs, direction, step_mask, names, args)
        skipped += ep_skip
        tau_sum += ep_tau
        for i in range(r):
            dist_log[i].extend(ep_dist[i])
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            ev = evaluate(model, params, x_train, data, x_test)
            for i in range(r):
                history.append({"method": methods[i].name, "epoch": epoch,
                                "test_acc": ev["test_acc"][i], "memorised": ev["memorised"][i],
                                "skip_rate": ep_skip[i] / steps_per_epoch,
                                "tau_mean": ep_tau[i] / steps_per_epoch,
                                "dist_p10": float(np.percentile(ep_dist[i], 10)),
                                "dist_p50": float(np.percentile(ep_dist[i], 50)),
                                "dist_p90": float(np.percentile(ep_dist[i], 90))})
    seconds = time.perf_counter() - t0  # the last epoch always evaluates: ev is final
    total = steps_per_epoch * args.epochs
    runs = []
    for i, m in enumerate(methods):
        runs.append({
            "dataset": dataset, "noise": noise, "noise_kind": kind, "noise_rate": rate,
            "seed": seed, "method": m.name, "group": m.group, "threshold": m.threshold,
            "measure": m.measure, "test_acc": ev["test_acc"][i],
            "memorised": ev["memorised"][i], "skip_rate": skipped[i] / total,
            "tau_mean": tau_sum[i] / total,
            "threshold_state": {k: v for k, v in thresholds[i].state_dict().items()
                                if k != "distances"},
        })
    return {"runs": runs, "history": [dict(h, dataset=dataset, noise=noise, seed=seed)
                                      for h in history],
            "seconds": seconds, "noise_fraction": data.noise_fraction}


@torch.no_grad()
def evaluate(model, params, x_train, data, x_test) -> dict:
    def predict(x):
        return vmap(lambda p: functional_call(model, p, (x,)).argmax(1))(params)  # [R, N]

    test = (predict(x_test) == data.test_y).double().mean(1)
    train = predict(x_train)
    noisy = data.is_noisy
    if noisy.any():
        mem = ((train == data.train_y) & noisy).double().sum(1) / noisy.sum()
    else:
        mem = torch.full((train.shape[0],), float("nan"), dtype=torch.float64)
    return {"test_acc": test.tolist(), "memorised": mem.tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gaf study thresholds",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist"])
    ap.add_argument("--noise", nargs="+", default=["sym0", "sym20", "sym40", "sym60", "asym40"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None,
                    help="where the datasets are (default: the lab's lookup, $GAF_DATA_DIR)")
    ap.add_argument("--methods", choices=sorted(METHOD_SETS), default="main")
    ap.add_argument("--out", default="results/thresholds/results.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    methods = METHOD_SETS[args.methods]()
    out = {"config": vars(args), "methods": [m.__dict__ for m in methods],
           "versions": versions(),
           "runs": [], "history": [], "settings": []}
    t_start = time.perf_counter()
    for dataset in args.datasets:
        for noise in args.noise:
            for seed in args.seeds:
                res = run_setting(dataset, noise, seed, methods, args)
                out["runs"] += res["runs"]
                out["history"] += res["history"]
                out["settings"].append({"dataset": dataset, "noise": noise, "seed": seed,
                                        "seconds": res["seconds"],
                                        "noise_fraction": res["noise_fraction"]})
                best = max(res["runs"], key=lambda x: x["test_acc"])
                print(f"{dataset} {noise} seed {seed}: {res['seconds']:.0f}s, best "
                      f"{best['method']} {best['test_acc']:.4f}; "
                      + " | ".join(f"{x['method']}: {x['test_acc']:.3f}/{x['skip_rate']:.2f}"
                                   for x in res["runs"]), flush=True)
                out["total_seconds"] = time.perf_counter() - t_start
                with open(args.out, "w") as f:
                    f.write(strict_json(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
