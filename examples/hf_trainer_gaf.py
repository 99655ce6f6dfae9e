"""GAF in the Hugging Face Trainer: ``gradient_accumulation_steps`` = M.

    python examples/hf_trainer_gaf.py                          # one CPU process
    torchrun --nproc-per-node 2 examples/hf_trainer_gaf.py     # 2 CPU processes (gloo)

GAFHFTrainer is a ``transformers.Trainer``: each accumulated micro-batch is a
micro-gradient; skipped steps go through the Trainer's own skip check (its LR scheduler
holds), ``max_grad_norm`` clips the filtered gradient, and ``gaf/*`` statistics appear in
the Trainer's logs (``trainer.state.log_history``, and any ``report_to`` logger).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from toy_problem import accuracy, make_mlp, noisy_problem
from transformers import TrainingArguments

from gaf.integrations.transformers import GAFHFTrainer


class Classifier(nn.Module):
    """What the Trainer expects of a model: keyword inputs, a dict holding the loss."""

    def __init__(self):
        super().__init__()
        self.net = make_mlp()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tau", type=float, default=0.97)
    p.add_argument("--micro-batches", type=int, default=2, help="gradient_accumulation_steps")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(0)
    x, y, _ = noisy_problem(2048, noise=0.3)
    test_x, _, test_y = noisy_problem(1024, noise=0.0, seed=1)
    model = Classifier()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.micro_batches, num_train_epochs=args.epochs,
            learning_rate=0.05, max_grad_norm=1.0, logging_steps=16, report_to="none",
            save_strategy="no", use_cpu=True, disable_tqdm=True,
            ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        trainer = GAFHFTrainer(model=model, args=training_args, train_dataset=Rows(x, y),
                               optimizers=(optimizer, None), tau=args.tau)
        trainer.train()
    if trainer.is_world_process_zero():
        logs = [row for row in trainer.state.log_history if "gaf/skipped" in row]
        print("skip rate per logging interval:",
              " ".join(f"{row['gaf/skipped']:.2f}" for row in logs))
        s = trainer.gaf_stats
        print(f"tau {args.tau}: {s.steps} steps, {s.skipped_steps} skipped "
              f"({100 * s.skip_rate:.1f}%), clean test accuracy "
              f"{100 * accuracy(model.net, test_x, test_y):.1f}%")


if __name__ == "__main__":
    main()
