"""GAF in a Hugging Face accelerate loop: ``accelerator.accumulate`` over M micro-batches.

    python examples/accelerate_gaf.py                               # one CPU process
    torchrun --nproc-per-node 2 examples/accelerate_gaf.py          # 2 CPU processes (gloo)
    accelerate launch --cpu --num_processes 2 examples/accelerate_gaf.py

GAFAccumulator takes each micro-gradient after ``accelerator.backward``; at the window's
last micro-batch it filters them (with several processes: every rank's together, DDP's
all-reduce turned off). ``optimizer.step()`` does nothing on a skipped step and sets
accelerate's skip flag, so the prepared scheduler holds too.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from toy_problem import accuracy, make_mlp, noisy_problem

from gaf.integrations.accelerate import GAFAccumulator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tau", type=float, default=0.97)
    p.add_argument("--micro-batches", type=int, default=2, help="M per process")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = p.parse_args()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.micro_batches,
                              mixed_precision=args.mixed_precision)
    torch.manual_seed(0)
    x, y, _ = noisy_problem(2048, noise=0.3)
    test_x, _, test_y = noisy_problem(1024, noise=0.0, seed=1)
    net = make_mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.micro_batch_size, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(net, optimizer, loader, scheduler)
    gaf_step = GAFAccumulator(accelerator, model, optimizer, tau=args.tau)

    for _ in range(args.epochs):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(xb), yb))
                gaf_step.after_backward()
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

    if accelerator.is_main_process:
        s = gaf_step.stats
        test_accuracy = accuracy(accelerator.unwrap_model(model), test_x, test_y)
        print(f"tau {args.tau}, {accelerator.num_processes} process(es): {s.steps} steps, "
              f"{s.skipped_steps} skipped ({100 * s.skip_rate:.1f}%), clean test accuracy "
              f"{100 * test_accuracy:.1f}%")


if __name__ == "__main__":
    main()
