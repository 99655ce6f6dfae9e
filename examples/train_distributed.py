"""Train a classifier with Gradient Agreement Filtering across torch.distributed ranks.

    torchrun --nproc-per-node 4 examples/train_distributed.py            # CPU: gloo
    torchrun --nproc-per-node 8 examples/train_distributed.py --epochs 5  # GPUs: NCCL

The same script runs on CPUs (gloo) and on GPUs (NCCL, one GPU per rank); it also runs as
a single process (``python examples/train_distributed.py``). Every rank draws m
micro-batches from its own shard of the data; each step filters all N·m micro-gradients
with the sharded GAF protocol (communication of one all-reduce) and applies the same
update on every rank. At the end the script checks that every rank holds bit-identical
parameters.

Data: Fashion-MNIST if its IDX files are found (``--data-dir``, ``$GAF_DATA_DIR`` or Debian's
``/usr/share/datasets/fashion-mnist``), otherwise a synthetic 10-class problem; symmetric
label noise (``--noise``, default 40%) is applied to the training labels, identically on
every rank. ``--fault KIND --faulty-ranks F`` corrupts the rows of the last F ranks every
step with :mod:`gaf.faults` (each rank corrupts its own). ``--tau 2`` turns the filter into
plain averaging for comparison; ``--ddp``
wraps the model in DistributedDataParallel to show that recipe (GAF runs DDP's forward and
backward under ``no_sync()``).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gaf import ALL_RULES, FilterSpec
from gaf.distributed import DistributedGAFTrainer
from gaf.faults import FAULT_KINDS, FaultInjector


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training set")
    p.add_argument("--micro-batches", type=int, default=2, help="m, micro-batches per rank")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--tau", type=float, default=0.97, help="cosine-distance threshold (2: mean)")
    p.add_argument("--rule", default="mean", choices=list(ALL_RULES))
    p.add_argument("--rule-options", type=json.loads, default=None,
                   help='the rule\'s options as JSON, e.g. \'{"f": 2}\' for multi-krum '
                        "(default for multi-krum with --fault: f = the faulty rows)")
    p.add_argument("--method", default="sharded", choices=["sharded", "allgather"])
    p.add_argument("--noise", type=float, default=0.4, help="symmetric label-noise rate")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--train-size", type=int, default=20000, help="0: the whole training set")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ddp", action="store_true", help="wrap the model in DDP (no_sync recipe)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds before a stuck collective raises (a rank died)")
    p.add_argument("--fault", default=None, choices=list(FAULT_KINDS),
                   help="corrupt the rows of the last --faulty-ranks ranks (gaf.faults)")
    p.add_argument("--faulty-ranks", type=int, default=1, help="how many ranks are faulty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args()


def filter_spec(args, world: int) -> FilterSpec:
    """The filter, checked against M = ranks × micro-batches before any process starts
    training: multi-Krum with f faulty rows needs M > 2f + 2 (with 2 ranks of 2
    micro-batches and one faulty rank, f = 2 needs M > 6)."""
    if args.fault and not 0 < args.faulty_ranks <= world:
        raise SystemExit(f"--faulty-ranks must be in 1..{world}, got {args.faulty_ranks}")
    options = dict(args.rule_options or {})
    if args.rule == "multi-krum" and args.fault and "f" not in options:
        options["f"] = args.faulty_ranks * args.micro_batches  # every row of a faulty rank
    rows = world * args.micro_batches
    try:
        spec = FilterSpec(tau=args.tau, rule=args.rule, rule_options=options)
        spec.check_rows(rows)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc} (M = {world} ranks × {args.micro_batches} "
                         "micro-batches)") from None
    return spec


# -- data ----------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_fashion_mnist(data_dir: str | None) -> Path | None:
    roots = [data_dir, os.environ.get("GAF_DATA_DIR"), "/usr/share/datasets"]
    for root in filter(None, roots):
        for d in (Path(root), Path(root) / "fashion-mnist"):
            if any((d / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz")):
                return d
    return None


def load_data(args):
    """(x_train, y_train, x_test, y_test, name): float inputs [n, d], int64 labels."""
    d = find_fashion_mnist(args.data_dir)
    if d is not None:

        def part(stem):
            path = d / f"{stem}-ubyte"
            return read_idx(path if path.exists() else path.with_name(path.name + ".gz"))

        xs = [torch.from_numpy(part(f"{s}-images-idx3").copy()).float().div(255).flatten(1)
              for s in ("train", "t10k")]
        ys = [torch.from_numpy(part(f"{s}-labels-idx1").astype(np.int64))
              for s in ("train", "t10k")]
        mean, std = xs[0].mean(), xs[0].std()
        return (xs[0] - mean) / std, ys[0], (xs[1] - mean) / std, ys[1], "Fashion-MNIST"
    # A synthetic 10-class problem: noisy class prototypes in 64 dimensions.
    gen = torch.Generator().manual_seed(1234)
    protos = torch.randn(10, 64, generator=gen)
    y = torch.randint(0, 10, (30000,), generator=gen)
    x = protos[y] + 1.5 * torch.randn(30000, 64, generator=gen)
    return x[:20000], y[:20000], x[20000:], y[20000:], "synthetic"


def noisy(labels: torch.Tensor, rate: float, classes: int, seed: int) -> torch.Tensor:
    """Symmetric noise: a fraction ``rate`` of labels replaced by a different random class."""
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(labels), generator=gen) < rate
    shift = torch.randint(1, classes, (len(labels),), generator=gen)
    return torch.where(flip, (labels + shift) % classes, labels)


# -- training --------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ:  # plain `python`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # Ranks on one machine share its cores.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    # Checked before the group starts: a rule that cannot run on M rows fails here, on
    # every rank, rather than in a traceback at the first step.
    spec = filter_spec(args, int(os.environ["WORLD_SIZE"]))
    # The group's timeout bounds every collective: a rank that dies makes the others raise
    # (gaf.distributed.GAFDistributedError) instead of hanging.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)

    x_train, y_train, x_test, y_test, name = load_data(args)
    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    classes = int(y_train.max()) + 1
    y_noisy = noisy(y_train, args.noise, classes, args.seed)  # the same on every rank
    m, b = args.micro_batches, args.micro_batch_size
    per_step = world * m * b
    steps = int(args.epochs * len(x_train) / per_step)
    log(f"{name}: {len(x_train)} training samples ({args.noise:.0%} noisy labels), "
        f"{world} ranks × {m} micro-batches × {b} samples, {steps} steps, backend {backend}, "
        f"tau={args.tau}, rule={args.rule} {dict(spec.rule_options)}, method={args.method}")

    torch.manual_seed(args.seed)  # rank 0's initialisation is broadcast to all ranks anyway
    model = nn.Sequential(
        nn.Linear(x_train.shape[1], 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, classes)
    ).to(device)
    net = nn.parallel.DistributedDataParallel(model) if args.ddp else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    trainer = DistributedGAFTrainer(
        net, optimizer, nn.functional.cross_entropy, m, spec=spec,
        method=args.method, buffer_sync="broadcast",
    )
    fault = hook = None
    if args.fault:
        bad = range((world - args.faulty_ranks) * m, world * m)  # rows of the last ranks
        fault = FaultInjector.make(args.fault, bad, seed=args.seed)
        hook = fault.gradient_hook(model.parameters(), m, first_row=rank * m)
        log(f"fault: {args.fault} on ranks {world - args.faulty_ranks}..{world - 1}")

    start = time.perf_counter()
    order = torch.empty(0, dtype=torch.long)
    losses = []
    for step in range(steps):
        if len(order) < per_step:  # a new epoch: the same permutation on every rank
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(step))
        take, order = order[:per_step], order[per_step:]
        mine = take[rank * m * b : (rank + 1) * m * b]  # this rank's shard of the step
        targets = y_noisy[mine]
        if fault is not None:  # a no-op unless the fault is "wrong-labels"
            targets = fault.corrupt_labels(targets, m, classes, first_row=rank * m)
        out = trainer.step(x_train[mine].to(device), targets.to(device),
                           on_micro_gradient=hook)
        losses.append(out.loss)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            loss = torch.stack(losses).mean().item()
            losses = []
            stats = trainer.stats
            log(f"step {step + 1:4d}  loss {loss:.3f}  accepted {stats.acceptance_rate:.0%} of "
                f"micro-batches  skipped {stats.skip_rate:.0%} of steps")

    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        test_acc = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
        wrong = y_noisy != y_train
        fit = model(x_train[wrong].to(device)).argmax(1).cpu() == y_noisy[wrong]
    log(f"test accuracy {test_acc:.1%}; noisy training labels memorised {fit.float().mean():.1%}; "
        f"{elapsed:.1f} s")

    # Every rank applied the same filtered gradients: parameters (and the synced buffers)
    # must be bit-identical.
    flat = torch.cat([t.detach().double().reshape(-1) for t in model.state_dict().values()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    same = all(torch.equal(c, copies[0]) for c in copies)
    log(f"parameters and buffers bit-identical on all {world} ranks: {same}")
    dist.destroy_process_group()
    if not same:
        raise SystemExit("ranks diverged")


if __name__ == "__main__":
    main()
