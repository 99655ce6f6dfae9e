"""One rank of the framework checks (2 gloo processes under torchrun, one launch for all
three, from test_frameworks.py): GAF's DDP hook through accelerate, the Hugging Face
Trainer and Lightning's DDP strategy, each ending bit-identical to a replay that filters the ranks'
gradients with gaf.filter_gradients and steps the same optimizer. Rank 0 writes
OUT/frameworks_worker.json."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import finish, flat_grads, gather_rows, make_net

import gaf

MICRO, STEPS, TAU = 4, 6, 1.0


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def rank_data(rank: int, samples: int = MICRO * STEPS * 2):
    g = torch.Generator().manual_seed(50 + rank)
    return torch.randn(samples, 6, generator=g), torch.randint(0, 3, (samples,), generator=g)


def replay(steps) -> tuple[list[torch.Tensor], dict]:
    """``steps``: per step, this rank's (x, y, loss scale) micro-batches. Filter the ranks'
    gradients in one process (gaf.filter_gradients) and step a plain copy."""
    net = make_net()
    opt = make_optimizer(net.parameters())
    stats = gaf.FilterStats()
    for micro_batches in steps:
        net.zero_grad(set_to_none=True)
        for x, y, scale in micro_batches:
            (F.cross_entropy(net(x), y) * scale).backward()
        result = gaf.filter_gradients(gather_rows(flat_grads(net.parameters())), TAU)
        stats.update(result)
        if result.skipped:
            continue
        offset = 0
        for p in net.parameters():
            p.grad = result.grad[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
    return [p.detach() for p in net.parameters()], stats.state_dict()


def run_accelerate(rank):
    from accelerate import Accelerator

    from gaf.integrations.ddp_hook import register_gaf_hook

    accelerator = Accelerator(cpu=True)
    net = make_net()
    model, optimizer = accelerator.prepare(net, make_optimizer(net.parameters()))
    state = register_gaf_hook(model, optimizer, tau=TAU)
    x, y = rank_data(rank)
    steps, skipped_flags = [], []
    for s in range(STEPS):
        xb, yb = x[s * 2 * MICRO:(s + 1) * 2 * MICRO], y[s * 2 * MICRO:(s + 1) * 2 * MICRO]
        accelerator.backward(F.cross_entropy(model(xb), yb))
        optimizer.step()
        skipped_flags.append(accelerator.optimizer_step_was_skipped == state.skipped)
        optimizer.zero_grad()
        steps.append([(xb, yb, 1.0)])
    params = [p.detach() for p in accelerator.unwrap_model(model).parameters()]
    return params, state.stats.state_dict(), steps, all(skipped_flags)


def run_transformers(rank):
    from transformers import Trainer, TrainingArguments

    from gaf.integrations.ddp_hook import use_gaf_hook

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_net()

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

    # The Trainer shards one dataset: with a sequential sampler rank r reads batches
    # r, r + 2, ... of it. Build that dataset from both ranks' own data.
    parts = [rank_data(r, MICRO * STEPS) for r in range(2)]
    xs = torch.cat([parts[b % 2][0][(b // 2) * MICRO:(b // 2 + 1) * MICRO]
                    for b in range(2 * STEPS)])
    ys = torch.cat([parts[b % 2][1][(b // 2) * MICRO:(b // 2 + 1) * MICRO]
                    for b in range(2 * STEPS)])
    model = Classifier()
    optimizer = make_optimizer(model.parameters())
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = TrainingArguments(
        output_dir=str(OUT / "hf"), per_device_train_batch_size=MICRO, num_train_epochs=1,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, ddp_backend="gloo",
        max_grad_norm=0.0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(xs, ys),
                      optimizers=(optimizer, constant))
    state = use_gaf_hook(trainer, tau=TAU)
    trainer.train()
    x, y = parts[rank]
    steps = [[(x[s * MICRO:(s + 1) * MICRO], y[s * MICRO:(s + 1) * MICRO], 1.0)]
             for s in range(STEPS)]
    return [p.detach() for p in model.net.parameters()], state.stats.state_dict(), steps, True


def run_lightning(rank):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from gaf.distributed import GAFHookState, gaf_hook
    from gaf.integrations.ddp_hook import lightning_gaf_hook

    state = GAFHookState(tau=TAU)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return state.wrap_optimizer(make_optimizer(self.net.parameters()))

    module = Module()
    x, y = rank_data(rank)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=1, accumulate_grad_batches=2,
        strategy=DDPStrategy(ddp_comm_state=state, ddp_comm_hook=gaf_hook,
                             process_group_backend="gloo", bucket_cap_mb=0.0005),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        logger=False, num_sanity_val_steps=0, use_distributed_sampler=False,
        default_root_dir=OUT / "pl", callbacks=[lightning_gaf_hook(state)],
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=MICRO, shuffle=False))
    # Two micro-batches a step (the second synchronised), each loss divided by 2.
    steps = [[(x[(2 * s + k) * MICRO:(2 * s + k + 1) * MICRO],
               y[(2 * s + k) * MICRO:(2 * s + k + 1) * MICRO], 0.5) for k in range(2)]
             for s in range(STEPS)]
    return [p.detach() for p in module.net.parameters()], state.stats.state_dict(), steps, True


def check(run, rank) -> dict:
    params, stats, steps, flags_ok = run(rank)
    assert dist.is_initialized() and dist.get_world_size() == 2
    want, want_stats = replay(steps)
    return {
        "same_as_replay": [bool(torch.equal(a, b)) for a, b in zip(params, want)],
        "stats": stats, "replay_stats": want_stats, "skip_flag_agrees": flags_ok,
        "ranks_identical": bool((gather_rows(torch.cat([p.reshape(-1) for p in params]))
                                 .diff(dim=0) == 0).all()),
    }


def main() -> None:
    global OUT
    OUT = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    # One launch for the three (imports and start-up are most of the time). accelerate
    # keeps process-wide singletons: drop them between the two that use it.
    report = {"accelerate": check(run_accelerate, rank)}
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    report["transformers"] = check(run_transformers, rank)
    report["lightning"] = check(run_lightning, rank)
    finish(OUT, "frameworks_worker", report)


if __name__ == "__main__":
    main()
