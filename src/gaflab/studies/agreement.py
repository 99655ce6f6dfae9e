"""Agreement study: does GAF's choice of micro-gradients beat a blind choice of the same size?

For one setting (dataset, noise, M micro-batches of b samples, grouping, seed) every method
is trained *together*: R copies of one small MLP, stacked with ``torch.func.vmap``, start
from the same weights and see the same micro-batches in the same order. Per step each copy
gets its M micro-gradients; what differs is only which of them the copy keeps:

``average``           all of them (plain data-parallel averaging).
``gaf``               the paper's rule at tau (``gaf.core.decide``, rule "mean").
``gaf-consensus``     the consensus rule at tau (each row against the sum of the others).
``gaf-null-tail``     the paper's rule with the adaptive ``null-tail:z=1`` threshold.
``control:<gaf>``     a blind control of a GAF copy: each non-anchor micro-batch kept with
                      probability 1 - q_e, the step skipped when fewer than two are kept (for
                      M = 2 this is skipping the step with probability q_e), where q_e is the
                      GAF copy's rejection rate in the same epoch (pass 1 trains the GAF
                      copies; pass 2 the controls, matched epoch by epoch).
``small-loss``        co-teaching's selection (Han et al. 2018), single network: each step
                      keeps the 1 - r(t) fraction of the step's samples with the smallest
                      loss, r ramped linearly from 0 to the noise rate over the first 10
                      epochs (a third of the run if shorter).
``gce``               generalized cross-entropy (Zhang & Sabuncu 2018), q = 0.7.

Early stopping is read off each copy's curve: the test accuracy at the evaluation where
accuracy on a *noisy* held-out split (10% of the training subset, never trained on, labels
as noisy as the training set) was highest.

Grouping: ``random`` (micro-batches cut from a permutation: noise spread evenly) or
``by-noise`` (the same noisy labels, micro-batches cut separately from the clean and the
noisy samples, so each is all clean or all noisy: noise that comes per source).

Selection precision, per epoch and copy: noise fraction of the kept and of the dropped
micro-batches (samples, for small-loss), the chance spread (the standard deviation of the
kept fraction under a random choice of the same number of micro-batches), and the rank
correlation of the paper's distance with a micro-batch's noise fraction.

Resumable: every setting is written to ``<out>/<key>.json`` when it finishes and skipped
when that file exists. :mod:`gaflab.studies.agreement_report` builds the tables from them
(``docs/agreement-study.md``).

    gaf study agreement --tier 1        # writes results/agreement/raw/<setting>.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F  # noqa: N812

from gaf.core import RULES, decide, result_from_decision
from gaf.thresholds import parse_threshold
from gaflab.models import MLP
from gaflab.results import strict_json
from gaflab.studies.common import (
    parse_noise,
    sgd_step,
    stacked_copies,
    study_data,
    versions,
)


@dataclass(frozen=True)
class Setting:
    dataset: str = "fashion-mnist"
    noise: str = "sym40"  # symN / asymN
    m: int = 2  # micro-batches per step
    b: int = 32  # samples per micro-batch
    grouping: str = "random"  # random | by-noise
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.dataset}_{self.noise}_{self.m}x{self.b}_{self.grouping}_s{self.seed}"


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or GCE (1 - p_y^q) / q where q > 0 (Zhang & Sabuncu 2018)."""
    logp = F.log_softmax(logits, dim=-1).gather(-1, y[..., None]).squeeze(-1)
    ce = -logp
    safe_q = torch.where(q > 0, q, torch.ones_like(q))
    gce = (1.0 - torch.exp(safe_q * logp)) / safe_q
    return torch.where(q > 0, gce, ce)


def epoch_micro_batches(n: int, m: int, b: int, noisy: torch.Tensor, grouping: str,
                        gen: torch.Generator, labels: torch.Tensor,
                        num_classes: int = 10) -> torch.Tensor:
    """[steps, M, b] sample indices for one epoch."""
    if grouping == "random":
        steps = n // (m * b)
        return torch.randperm(n, generator=gen)[: steps * m * b].view(steps, m, b)
    if grouping == "balanced":  # b / K samples of each observed class, as the authors' code
        per = b // num_classes
        pools = [torch.nonzero(labels == c).reshape(-1) for c in range(num_classes)]
        k = min(len(p) for p in pools) // per
        cols = [p[torch.randperm(len(p), generator=gen)][: k * per].view(k, per) for p in pools]
        micro = torch.cat(cols, 1)
        micro = micro.gather(1, torch.argsort(torch.rand(micro.shape, generator=gen), 1))
        steps = k // m
        return micro[: steps * m].view(steps, m, b)
    pools = [torch.nonzero(noisy).reshape(-1), torch.nonzero(~noisy).reshape(-1)]
    micro = []
    for pool in pools:
        pool = pool[torch.randperm(len(pool), generator=gen)]
        k = len(pool) // b  # leftovers (< b per pool) sit out this epoch
        micro.append(pool[: k * b].view(k, b))
    micro = torch.cat(micro)
    micro = micro[torch.randperm(len(micro), generator=gen)]
    steps = len(micro) // m
    return micro[: steps * m].view(steps, m, b)


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class Copy:
    name: str
    kind: str  # average | gaf | control | small-loss | gce
    rule: str = "mean"
    threshold: str = "2.0"
    matched_to: str | None = None


def pass_one_copies(args) -> list[Copy]:
    if args.only == "consensus":  # a supplement for settings run before the rule existed
        return [Copy(f"gaf-consensus {args.consensus_tau:g}", "gaf", "consensus",
                     str(args.consensus_tau))]
    copies = [Copy("average", "average"), Copy(f"gaf {args.tau:g}", "gaf", "mean", str(args.tau))]
    if "consensus" in RULES:
        copies.append(Copy(f"gaf-consensus {args.consensus_tau:g}", "gaf", "consensus",
                           str(args.consensus_tau)))
    copies.append(Copy("gaf null-tail", "gaf", "mean", "null-tail:z=1"))
    copies += [Copy("small-loss", "small-loss"), Copy("gce", "gce")]
    return copies


def run_pass(s: Setting, copies: list[Copy], data, split, args, rates=None) -> dict:
    """Train ``copies`` together; ``rates[name][epoch-1]`` drives the control copies."""
    train_idx, held_idx = split
    x_all = data.train_x.flatten(1)
    y_all, noisy_all = data.train_y, data.is_noisy
    x_tr, y_tr, noisy_tr = x_all[train_idx], y_all[train_idx], noisy_all[train_idx]
    n = x_tr.shape[0]
    r = len(copies)
    torch.manual_seed(1000 + s.seed)
    model = MLP(args.hidden)
    names, params, bufs = stacked_copies(model, r)
    q = torch.tensor([args.gce_q if c.kind == "gce" else 0.0 for c in copies])

    def loss_fn(p, x, y, w, qq):
        losses = per_sample_loss(functional_call(model, p, (x,)), y, qq)
        return (losses * w).sum() / w.sum().clamp_min(1.0)

    grads_of = vmap(grad(loss_fn), in_dims=(0, None, None, 0, 0))
    forward = vmap(lambda p, x: functional_call(model, p, (x,)), in_dims=(0, None))
    thresholds = [parse_threshold(c.threshold) for c in copies]
    order = torch.Generator().manual_seed(2000 + s.seed)
    coin = np.random.default_rng(3000 + s.seed)
    kind, noise_rate = parse_noise(s.noise)
    forget = noise_rate if kind == "symmetric" else float(data.noise_fraction)
    ramp = min(10, max(1, args.epochs // 3))
    history: list[dict] = []
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        batches = epoch_micro_batches(n, s.m, s.b, noisy_tr, s.grouping, order, y_tr)
        steps = batches.shape[0]
        forget_now = forget * min(1.0, (epoch - 1) / ramp)
        acc = {k: np.zeros(r) for k in ("kept_noisy", "kept", "drop_noisy", "drop", "kept_mb",
                                        "skips", "take_noisy", "take", "skip_noisy", "skip",
                                        "na_rej")}
        dist_rec = [([], []) for _ in range(r)]
        mb_frac_all: list[float] = []
        for st in range(steps):
            idx = batches[st]  # [M, b]
            x, y = x_tr[idx], y_tr[idx]
            frac = noisy_tr[idx].double().mean(1).numpy()  # [M]
            mb_frac_all.extend(frac.tolist())
            w = torch.ones(r, s.m, s.b)
            sl = [i for i, c in enumerate(copies) if c.kind == "small-loss"]
            if sl and forget_now > 0:
                with torch.no_grad():
                    logits = forward({k: v[sl] for k, v in params.items()}, x.reshape(-1, 784))
                    losses = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1).repeat(len(sl)),
                                             reduction="none").view(len(sl), -1)
                keep = int(round((1 - forget_now) * s.m * s.b))
                for j, i in enumerate(sl):
                    mask = torch.zeros(s.m * s.b)
                    mask[torch.argsort(losses[j])[:keep]] = 1.0
                    w[i] = mask.view(s.m, s.b)
            rows = [torch.cat([g[nm].reshape(r, -1) for nm in names], 1)
                    for g in (grads_of(params, x[k], y[k], w[:, k], q) for k in range(s.m))]
            stack = torch.stack(rows, 1)  # [R, M, P]
            grams = torch.einsum("rmp,rnp->rmn", stack, stack)
            weights = np.zeros((r, s.m))
            for i, c in enumerate(copies):
                if c.kind in ("average", "gce"):
                    weights[i] = 1.0 / s.m
                    acc["take"][i] += 1
                    continue
                if c.kind == "small-loss":
                    kept = w[i].sum(1).numpy()
                    weights[i] = kept / kept.sum()
                    noisy_kept = (w[i] * noisy_tr[idx].float()).sum().item()
                    acc["kept_noisy"][i] += noisy_kept
                    acc["kept"][i] += kept.sum()
                    acc["drop_noisy"][i] += noisy_tr[idx].sum().item() - noisy_kept
                    acc["drop"][i] += s.m * s.b - kept.sum()
                    continue
                tau = thresholds[i].value()
                dec = decide(grams[i], tau, c.rule)
                if c.kind == "control":
                    qe = rates[c.matched_to][epoch - 1]
                    accepted = np.zeros(s.m, dtype=bool)
                    accepted[0] = True
                    accepted[1:] = coin.random(s.m - 1) >= qe
                    accepted &= dec.valid
                    if accepted.sum() >= 2:
                        weights[i] = accepted / accepted.sum()
                else:
                    thresholds[i].observe(result_from_decision(dec, stack[i, 0], tau, c.rule))
                    accepted = dec.accepted.copy()
                    acc["na_rej"][i] += (~accepted[1:]).sum()
                    if not dec.skipped:
                        weights[i] = dec.weights
                    if c.rule == "mean":
                        d = dec.distances[1:].tolist()
                        dist_rec[i][0].extend(d)
                        dist_rec[i][1].extend(frac[1:].tolist())
                taken = weights[i].sum() > 0
                kept_mask = accepted if taken else np.zeros(s.m, dtype=bool)
                nb = frac * s.b
                acc["kept_noisy"][i] += nb[kept_mask].sum()
                acc["kept"][i] += s.b * kept_mask.sum()
                acc["drop_noisy"][i] += nb[~kept_mask].sum()
                acc["drop"][i] += s.b * (~kept_mask).sum()
                acc["kept_mb"][i] += kept_mask.sum()
                acc["take" if taken else "skip"][i] += 1
                acc["take_noisy" if taken else "skip_noisy"][i] += nb.sum()
                acc["skips"][i] += int(not taken)
            wt = torch.from_numpy(weights).to(stack.dtype)
            direction = torch.einsum("rm,rmp->rp", wt, stack)
            sgd_step(params, bufs, direction, torch.from_numpy(weights.sum(1) > 0), names, args)
        sd_mb = float(np.std(mb_frac_all))
        evaluate_now = epoch % args.eval_every == 0 or epoch == args.epochs
        ev = evaluate(model, params, x_all, data, train_idx, held_idx) if evaluate_now else None
        for i, c in enumerate(copies):
            row = {"copy": c.name, "epoch": epoch,
                   "skip_rate": acc["skips"][i] / steps,
                   # the rule's rejections of non-anchor rows, before the skip rule:
                   # the rate a blind control must drop at to match it
                   "nonanchor_rejection_rate": acc["na_rej"][i] / (steps * (s.m - 1))}
            if c.kind in ("gaf", "control", "small-loss"):
                row["kept_noise_fraction"] = acc["kept_noisy"][i] / max(acc["kept"][i], 1)
                row["dropped_noise_fraction"] = (acc["drop_noisy"][i] / acc["drop"][i]
                                                 if acc["drop"][i] else float("nan"))
            if c.kind in ("gaf", "control"):
                k = acc["kept_mb"][i]
                row["chance_spread"] = sd_mb / np.sqrt(k) if k else float("nan")
                per_step = s.m * s.b
                row["taken_noise_fraction"] = acc["take_noisy"][i] / max(acc["take"][i] * per_step,
                                                                         1)
                row["skipped_noise_fraction"] = (acc["skip_noisy"][i] / (acc["skip"][i] * per_step)
                                                 if acc["skip"][i] else float("nan"))
            if dist_rec[i][0]:
                row["distance_noise_spearman"] = spearman(*dist_rec[i])
            if ev is not None:
                row.update({k: v[i] for k, v in ev.items()})
            history.append(row)
        if args.verbose and ev is not None:
            print(f"  {s.key} epoch {epoch}: " + " | ".join(
                f"{c.name} {ev['test_acc'][i]:.3f}" for i, c in enumerate(copies)), flush=True)
    return {"history": history, "seconds": time.perf_counter() - t0, "steps_per_epoch": steps}


@torch.no_grad()
def evaluate(model, params, x_all, data, train_idx, held_idx) -> dict:
    def predict(x):
        return vmap(lambda p: functional_call(model, p, (x,)).argmax(1))(params)  # [R, N]

    test = (predict(data.test_x.flatten(1)) == data.test_y).double().mean(1)
    pred = predict(x_all)
    tr, noisy = pred[:, train_idx], data.is_noisy[train_idx]
    y_tr = data.train_y[train_idx]
    mem = ((tr == y_tr) & noisy).double().sum(1) / noisy.sum().clamp_min(1)
    held = (pred[:, held_idx] == data.train_y[held_idx]).double().mean(1)
    obs = (tr == y_tr).double().mean(1)
    return {"test_acc": test.tolist(), "memorised": mem.tolist(),
            "heldout_noisy_acc": held.tolist(), "train_acc_observed": obs.tolist()}


def run_setting(s: Setting, args) -> dict:
    data = study_data(s.dataset, s.noise, s.seed, args.train_size, args.test_size,
                      args.data_dir)
    n = data.train_y.numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4000 + s.seed))
    held = int(round(args.heldout * n))
    split = (perm[held:].sort().values, perm[:held].sort().values)
    first = pass_one_copies(args)
    p1 = run_pass(s, first, data, split, args)
    rates = {}
    for c in first:
        if c.kind == "gaf":
            rows = [h for h in p1["history"] if h["copy"] == c.name]
            rates[c.name] = [h["nonanchor_rejection_rate"] for h in rows]
    controls = [Copy(f"control:{name}", "control", matched_to=name) for name in rates]
    p2 = run_pass(s, controls, data, split, args, rates)
    return {"setting": asdict(s), "key": s.key, "history": p1["history"] + p2["history"],
            "seconds": p1["seconds"] + p2["seconds"], "steps_per_epoch": p1["steps_per_epoch"],
            "noise_fraction": data.noise_fraction, "train_size": int(split[0].numel()),
            "heldout_size": held, "forget_rate_known": True}


TIERS = {
    # The demo's question at the study's scale, then where the choice can see the noise.
    1: dict(datasets=["fashion-mnist"], noise=["sym40"], mb=[(2, 32), (4, 16), (8, 4)],
            grouping=["random", "by-noise"]),
    2: dict(datasets=["fashion-mnist"], noise=["sym20", "sym60", "sym80", "asym40"],
            mb=[(2, 32)], grouping=["random", "by-noise"]),
    3: dict(datasets=["fashion-mnist"], noise=["sym40"], mb=[(2, 10), (8, 10)],
            grouping=["balanced"]),
    4: dict(datasets=["mnist"], noise=["sym40"], mb=[(2, 32), (4, 16)],
            grouping=["random", "by-noise"]),
    5: dict(datasets=["fashion-mnist"], noise=["sym40"], mb=[(2, 64)],
            grouping=["random", "by-noise"]),
}


def settings_for(args) -> list[Setting]:
    tier = TIERS[args.tier]
    out = []
    for dataset in args.datasets or tier["datasets"]:
        for noise in args.noise or tier["noise"]:
            for m, b in tier["mb"]:
                for grouping in tier["grouping"]:
                    for seed in args.seeds:
                        out.append(Setting(dataset, noise, m, b, grouping, seed))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gaf study agreement",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--tier", type=int, choices=sorted(TIERS), default=1,
                    help="1: 40%% noise at 2x32/4x16/8x4; 2: other noise; 3: class-balanced; "
                         "4: MNIST; 5: 2x64")
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--noise", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=5000)
    ap.add_argument("--heldout", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--tau", type=float, default=0.97)
    ap.add_argument("--consensus-tau", type=float, default=1.0)
    ap.add_argument("--gce-q", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None,
                    help="where the datasets are (default: the lab's lookup, $GAF_DATA_DIR)")
    ap.add_argument("--out", default="results/agreement/raw")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--only", choices=["consensus"], default=None,
                    help="train only these copies (and their controls); written beside the "
                         "setting's main file as <key>.<only>.json and merged by the report")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in settings_for(args):
        path = out / (f"{s.key}.{args.only}.json" if args.only else f"{s.key}.json")
        if path.exists():
            continue
        res = run_setting(s, args)
        res["config"] = {k: v for k, v in vars(args).items()
                         if k not in ("out", "verbose", "only", "data_dir")}
        res["versions"] = versions()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(strict_json(res))
        tmp.replace(path)
        last = {h["copy"]: h for h in res["history"] if h["epoch"] == args.epochs}
        print(f"{s.key}: {res['seconds']:.0f}s " + " | ".join(
            f"{k} {v['test_acc']:.3f}/{v['skip_rate']:.2f}" for k, v in last.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
