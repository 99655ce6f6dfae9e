"""TensorBoard and CSV logs of GAF statistics from a plain GAFTrainer loop.

    python examples/tensorboard_gaf.py --log-dir runs/tensorboard
    tensorboard --logdir runs/tensorboard       # gaf/skipped, gaf/distance, epoch/...

Writes ``steps.csv`` and ``epochs.csv`` beside the event files.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from toy_problem import accuracy, make_mlp, noisy_problem

import gaf
from gaf.integrations.tensorboard import StatsLogger


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-dir", default="runs/tensorboard")
    p.add_argument("--tau", type=float, default=0.97)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(0)
    x, y, _ = noisy_problem(2048, noise=0.3)
    test_x, _, test_y = noisy_problem(1024, noise=0.0, seed=1)
    net = make_mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    trainer = gaf.GAFTrainer(net, optimizer, F.cross_entropy, num_micro_batches=2,
                             tau=args.tau, max_grad_norm=1.0)
    step = 0
    with StatsLogger(args.log_dir) as logger:
        for epoch in range(args.epochs):
            order = torch.randperm(len(x))
            for start in range(0, len(x), 64):
                idx = order[start:start + 64]
                logger.log_step(step, trainer.step(x[idx], y[idx]), trainer.stats)
                step += 1
            logger.log_epoch(epoch, {"skip_rate": trainer.stats.skip_rate,
                                     "test_accuracy": accuracy(net, test_x, test_y)})
    print(f"{step} steps, skip rate {100 * trainer.stats.skip_rate:.1f}%; logs in {args.log_dir}")


if __name__ == "__main__":
    main()
