"""One rank of a 2-process gloo run, started by torchrun from the tests: for each framework
named, trains with its integration, then with gaf.distributed.DistributedGAFTrainer from the
same start on the same rank-local micro-batches, and writes whether both ended with the same
bits (OUT_DIR/rank{r}.json, one report per framework).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py
       FRAMEWORK... OUT_DIR     (FRAMEWORK: lightning, accelerate, transformers)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as pytest has it

from gaf.distributed import DistributedGAFTrainer  # noqa: E402
from integrations.tiny import make_data, make_net  # noqa: E402

MICRO, M, TAU, SAMPLES = 4, 2, 0.6, 48


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def run_lightning(x, y, out: Path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from gaf.integrations.lightning import GAFCallback
    from integrations.test_lightning import Module

    module = Module(make_net(), make_optimizer)
    callback = GAFCallback(tau=TAU)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, accumulate_grad_batches=M,
        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, gradient_clip_val=0.5, default_root_dir=out,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=MICRO, shuffle=False))
    return list(module.net.parameters()), callback.stats


def run_accelerate(x, y, out: Path):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    from gaf.integrations.accelerate import GAFAccumulator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=M)
    net = make_net()
    optimizer = make_optimizer(net.parameters())
    # Each rank reads its own data: no sharding by accelerate.
    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO, shuffle=False)
    model, optimizer = accelerator.prepare(net, optimizer)
    gaf_step = GAFAccumulator(accelerator, model, optimizer, tau=TAU)
    for xb, yb in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(xb), yb))
            gaf_step.after_backward()
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
    return list(accelerator.unwrap_model(model).parameters()), gaf_step.stats


def run_transformers(x, y, out: Path):
    from transformers import TrainingArguments

    from gaf.integrations.transformers import GAFHFTrainer
    from integrations.test_transformers import Classifier, Rows

    # The Trainer shards one dataset: with a sequential sampler rank r reads micro-batches
    # r, r + 2, r + 4, ... of it, which is what make_rank_data gave this rank.
    world_x, world_y = make_data(2 * SAMPLES, seed=10)
    model = Classifier(make_net())
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=M, num_train_epochs=1, max_grad_norm=0.5,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, ddp_backend="gloo",
    )
    optimizer = make_optimizer(model.parameters())
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # not HF's decay
    trainer = GAFHFTrainer(model=model, args=args, train_dataset=Rows(world_x, world_y),
                           optimizers=(optimizer, constant), tau=TAU)
    trainer.train()
    return list(model.net.parameters()), trainer.gaf_stats


def make_rank_data(framework: str, rank: int):
    if framework != "transformers":
        return make_data(SAMPLES, seed=10 + rank)
    x, y = make_data(2 * SAMPLES, seed=10)
    picks = [i for i in range(len(x)) if (i // MICRO) % 2 == rank]
    return x[picks], y[picks]


def check(framework: str, rank: int, out: Path) -> dict:
    import torch.distributed as dist

    x, y = make_rank_data(framework, rank)
    runs = {"lightning": run_lightning, "accelerate": run_accelerate,
            "transformers": run_transformers}
    params, stats = runs[framework](x, y, out)
    assert dist.is_initialized() and dist.get_world_size() == 2
    net = make_net()
    ref = DistributedGAFTrainer(net, make_optimizer(net.parameters()), F.cross_entropy, M,
                                tau=TAU, max_grad_norm=0.5, buffer_sync=None)
    for start in range(0, SAMPLES, MICRO * M):
        ref.step(x[start:start + MICRO * M], y[start:start + MICRO * M])
    same = [bool(torch.equal(a.detach(), b.detach()))
            for a, b in zip(params, net.parameters(), strict=True)]
    gathered = [None, None]
    dist.all_gather_object(gathered, [p.detach().double().sum().item() for p in params])
    return {
        "rank": rank, "same_as_reference": same, "stats": stats.state_dict(),
        "reference_stats": ref.stats.state_dict(), "ranks_agree": gathered[0] == gathered[1],
    }


def main() -> None:
    *frameworks, out = sys.argv[1:]
    out, rank = Path(out), int(os.environ["RANK"])
    report = {}
    for framework in frameworks:
        (out / framework).mkdir(exist_ok=True)
        report[framework] = check(framework, rank, out / framework)
        if "accelerate" in sys.modules:  # process-wide singletons: the next run starts afresh
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
    (out / f"rank{rank}.json").write_text(json.dumps(report))

    import torch.distributed as dist

    # Leave together, close the group, and end without the interpreter's shutdown: the DDP
    # model keeps gloo's threads alive past destroy_process_group, and one that takes the
    # GIL while Python finalises aborts the process (see distributed_hooks/common.exit_now).
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
