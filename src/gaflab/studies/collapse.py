"""Why the paper's rule collapses at 32 micro-batches of one sample: what it accepts.

Trains the toolkit's small CNN through ``gaf.GAFTrainer`` on Fashion-MNIST with 40%
symmetric noise, M = 32 micro-batches of 1 sample, SGD lr 0.05 with Nesterov momentum (the
setting in which training fell to chance), and records per epoch: how many samples the rule
accepted per step, how noisy they were, which classes their labels name, which classes the
model predicts on the test set, and the test accuracy. ``--rule`` and ``--lr`` change the
setting for comparison.

    gaf study collapse --out results/collapse/probe.json   (docs/collapse.md)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

import gaf
from gaflab.models import build_model
from gaflab.results import strict_json
from gaflab.studies.common import study_data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gaf study collapse",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rule", default="mean")
    ap.add_argument("--tau", type=float, default=0.97)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None,
                    help="where the datasets are (default: the lab's lookup, $GAF_DATA_DIR)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = study_data("fashion-mnist", "sym40", args.seed, args.train_size, 2000,
                      args.data_dir)
    torch.manual_seed(args.seed)
    model = build_model("small_cnn", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, num_micro_batches=args.m,
                             tau=args.tau, rule=args.rule)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(args.seed)
    n = data.train_y.numel()
    steps = n // args.m
    epochs = []
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n, generator=gen)[: steps * args.m].view(steps, args.m)
        accepted, noisy_acc, labels_acc, taken = 0, 0, np.zeros(10), 0
        norm_ratio = []
        for s in range(steps):
            idx = perm[s]
            # The plain mean of all M micro-gradients, summed on the side, to compare the
            # size of the filtered direction with what averaging would have stepped along.
            total = [torch.zeros_like(p) for p in params]

            def add(k, total=total):
                for t, p in zip(total, params, strict=True):
                    if p.grad is not None:
                        t.add_(p.grad)

            out = trainer.step(data.train_x[idx], data.train_y[idx], on_micro_gradient=add)
            mask = out.result.accepted.numpy()
            if not out.skipped:
                plain = torch.sqrt(sum((t / args.m).pow(2).sum() for t in total))
                norm_ratio.append(float(out.result.grad.norm() / plain))
                taken += 1
                accepted += int(mask.sum())
                noisy_acc += int(data.is_noisy[idx][mask].sum())
                labels_acc += np.bincount(data.train_y[idx][mask].numpy(), minlength=10)
        with torch.no_grad():
            model.eval()
            pred = model(data.test_x).argmax(1)
            model.train()
        row = {
            "epoch": epoch,
            "taken_steps": taken / steps,
            "accepted_per_taken_step": accepted / max(taken, 1),
            "accepted_noise_fraction": noisy_acc / max(accepted, 1),
            # |filtered direction| / |mean of all M micro-gradients|, median over taken steps
            "direction_norm_ratio": float(np.median(norm_ratio)) if norm_ratio else None,
            "accepted_label_share": (labels_acc / max(labels_acc.sum(), 1)).round(3).tolist(),
            "test_acc": float((pred == data.test_y).float().mean()),
            "test_prediction_share": (np.bincount(pred.numpy(), minlength=10) / len(pred))
            .round(3).tolist(),
        }
        epochs.append(row)
        print(strict_json(row, indent=None), flush=True)
    if args.out:
        config = {k: v for k, v in vars(args).items() if k != "data_dir"}
        with open(args.out, "w") as f:
            f.write(strict_json({"config": config, "epochs": epochs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
