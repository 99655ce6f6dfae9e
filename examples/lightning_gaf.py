"""GAF in PyTorch Lightning: automatic optimisation, ``accumulate_grad_batches`` = M.

    python examples/lightning_gaf.py                         # one CPU process
    python examples/lightning_gaf.py --devices 2             # DDP, 2 CPU processes (gloo)
    python examples/lightning_gaf.py --precision bf16-mixed  # autocast to bfloat16

A noisy 4-class problem (toy_problem.py: 30% of the training labels random), an MLP, SGD
with momentum. Each of the M accumulated batches is one micro-gradient; GAFCallback
filters them, skips steps on which fewer than two agree (no optimizer step, step-interval
LR schedulers held), clips the filtered gradient (``gradient_clip_val``) and logs its
statistics under ``gaf/``. ``--tau 2`` accepts everything (plain accumulation).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from toy_problem import accuracy, make_mlp, noisy_problem

from gaf.integrations.lightning import GAFCallback


class Classifier(pl.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.net = make_mlp()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule,
                                                         "interval": "step"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tau", type=float, default=0.97)
    p.add_argument("--micro-batches", type=int, default=2, help="M: accumulate_grad_batches")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--devices", type=int, default=1, help="CPU processes (2 or more: DDP)")
    p.add_argument("--precision", default="32-true")
    args = p.parse_args()

    torch.manual_seed(0)
    x, y, _ = noisy_problem(2048, noise=0.3)
    test_x, _, test_y = noisy_problem(1024, noise=0.0, seed=1)
    model = Classifier(lr=0.05)
    gaf = GAFCallback(tau=args.tau)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto", precision=args.precision,
        max_epochs=args.epochs, accumulate_grad_batches=args.micro_batches,
        gradient_clip_val=1.0, callbacks=[gaf], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=args.micro_batch_size, shuffle=True)
    trainer.fit(model, loader)
    if trainer.is_global_zero:
        test_accuracy = accuracy(model.net, test_x, test_y)
        s = gaf.stats
        print(f"tau {args.tau}: {s.steps} steps, {s.skipped_steps} skipped "
              f"({100 * s.skip_rate:.1f}%), micro-gradients accepted "
              f"{100 * s.acceptance_rate:.1f}%, clean test accuracy {100 * test_accuracy:.1f}%")


if __name__ == "__main__":
    main()
