"""The compute study: do small micro-batches with GAF do the work of large ones?

The paper's third claim, tested at a fixed budget of samples processed. For every micro-batch
size b (M = 2 micro-batches of b samples per step), three methods train through the lab's own
step (``gaflab.train``, the same ``GAFTrainer`` as every lab run):

- ``average``: plain averaging of the two micro-gradients;
- ``gaf``: the paper's rule at tau 0.97;
- ``random-skip``: GAF's blind control, skipping steps at random at GAF's skip rate of the same
  epoch (matched per epoch, same seed, same learning rate as GAF).

Every run processes the same number of samples (``train_size × epochs``) on a cosine learning
rate decay to zero. The learning rate is chosen fairly, the same way for every (method, b):

1. **tune**: every lr of a geometric grid, on a seed that is never reported (100); the
   control runs at each lr too, matched to GAF at that lr (this grid is the stability
   picture: accuracy at every lr, per method and b);
2. **seeds**: at the lr with the best final test accuracy on the tuning seed, seeds 0-4:
   averaging at its own best lr, GAF at its own, the control at GAF's (it is GAF's control:
   same lr, same skip rate, only the choice is blind);
3. **scale**: GAF once more at its tuned lr on seed 0, recording the gradient noise scale
   B_simple per epoch from each step's Gram matrix (``gaf.NoiseScale``), beside the observed
   and forecast micro-gradient distances.

Each cell (one ``run_comparison`` of one setting, lr and seed) lands as one JSON in the raw
directory as soon as it finishes; a cell already there is skipped, so the study resumes
where it stopped. ``gaf study compute-report`` turns the raw files into tables and figures.

Presets: ``fmnist`` (the 2-core study: Fashion-MNIST, the MLP, 8k images × 8 epochs) and
``paper`` (CIFAR-100, ResNet-18 on a GPU, the paper's scale; never run here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from gaflab.compare import expand_grid, run_comparison
from gaflab.config import TrainConfig

GAF = "gaf"
METHODS = ("average", GAF, "random-skip")
TUNE_SEED = 100
NOISE_SETTINGS = {
    # 40% of the labels wrong, spread evenly over the samples.
    "sym40": {"noise": "symmetric", "noise_rate": 0.4},
    # 40% wrong, all of them in 4 of 10 sources; every micro-batch from one source.
    "source40": {"noise": "symmetric", "noise_rate": 0.4, "noise_sources": 10,
                 "bad_sources": 0.4},
}


@dataclass(frozen=True)
class Preset:
    base: TrainConfig
    sizes: tuple[int, ...]
    lrs: tuple[float, ...]
    noises: tuple[str, ...] = ("sym40", "source40")
    seeds: tuple[int, ...] = (0, 1, 2)
    note: str = ""


PRESETS = {
    "fmnist": Preset(
        base=TrainConfig(dataset="fashion-mnist", model="mlp", train_size=8000, test_size=5000,
                         epochs=8, schedule="cosine", num_micro_batches=2, tau=0.97,
                         match_per_epoch=True, threads=1, download=False),
        sizes=(2, 4, 8, 16, 32, 64, 128), lrs=(0.000625, 0.0025, 0.01, 0.04, 0.16),
        seeds=(0, 1, 2, 3, 4),
        note="2 CPU cores: the MLP (784-96-10), its 7 x 5 x 3 grid and 5 seeds in about an hour"),
    "paper": Preset(
        base=TrainConfig(dataset="cifar100", model="resnet18", train_size=None,
                         test_size=None, epochs=50, schedule="cosine", num_micro_batches=2,
                         tau=0.97, match_per_epoch=True, augment=True, weight_decay=1e-2,
                         device="cuda", download=False),
        sizes=(8, 16, 32, 64, 128, 256), lrs=(0.0025, 0.01, 0.04),
        note="CIFAR-100, ResNet-18, a GPU: the paper's setting (data from --data-dir)"),
}


@dataclass
class Cell:
    """One run_comparison: a noise setting, a size, an lr, a seed and the methods it runs."""

    noise: str
    size: int
    lr: float
    seed: int
    methods: tuple[str, ...] = field(default=METHODS)
    tag: str = ""  # "scale": a run that measures the noise scale, not reported for accuracy

    @property
    def name(self) -> str:
        name = f"{self.noise}_b{self.size}_lr{self.lr:g}_s{self.seed}_{'-'.join(self.methods)}"
        return f"{name}_{self.tag}" if self.tag else name


def cell_configs(preset: Preset, cell: Cell) -> list[TrainConfig]:
    base = replace(preset.base, micro_batch_size=cell.size, lr=cell.lr, progress=False)
    methods = [m if m != "random-skip" else ("random-skip", {"matched_to": GAF})
               for m in cell.methods]
    return expand_grid(base, methods=methods, taus=(base.tau,), seeds=(cell.seed,),
                       settings=[NOISE_SETTINGS[cell.noise]])


def run_cell(preset: Preset, cell: Cell, raw: Path) -> Path:
    """Run ``cell`` unless its raw file exists; the raw file is written atomically."""
    dest = raw / f"{cell.name}.json"
    if dest.exists():
        return dest
    configs = [c.validate() for c in cell_configs(preset, cell)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gaf-compute-") as tmp:
        run_comparison(configs, tmp, jobs=1, title=f"compute study {cell.name}", plots=False)
        data = json.loads((Path(tmp) / "results.json").read_text())
    # The per-step distance trace is 8k numbers a run at b = 4; the history keeps its
    # percentiles per epoch, which is what the report reads.
    for run in data["runs"]:
        run.pop("distance_trace", None)
    data["study"] = {"cell": cell.__dict__ | {"methods": list(cell.methods)},
                     "wall_seconds": time.perf_counter() - t0}
    raw.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_text(json.dumps(data, indent=1, allow_nan=False, default=_strict))
    tmp_dest.replace(dest)
    return dest


def _strict(value):
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def final_accuracy(path: Path) -> dict[str, float]:
    """method → final test accuracy of a raw cell (GAF's control under its method name)."""
    runs = json.loads(path.read_text())["runs"]
    return {r["config"]["method"]: r["summary"]["final_test_acc"] for r in runs}


def best_lrs(preset: Preset, raw: Path, noise: str, size: int) -> dict[str, float] | None:
    """method → the lr of the best final test accuracy on the tuning seed; None until every
    lr of the grid has run."""
    scores: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    for lr in preset.lrs:
        path = raw / f"{Cell(noise, size, lr, TUNE_SEED).name}.json"
        if not path.exists():
            return None
        for method, acc in final_accuracy(path).items():
            # A run that diverged reports no accuracy (null): it ranks last.
            scores[method].append((acc if acc is not None else -1.0, lr))
    best = {m: max(v)[1] for m, v in scores.items() if v}
    best["random-skip"] = best[GAF]  # GAF's control runs at GAF's lr
    return best


def seed_cells(preset: Preset, raw: Path, noise: str, size: int) -> list[Cell]:
    """The reported seeds' cells at the tuned lrs (one cell when averaging and GAF agree)."""
    best = best_lrs(preset, raw, noise, size)
    if best is None:
        return []
    cells = []
    for seed in preset.seeds:
        if best["average"] == best[GAF]:
            cells.append(Cell(noise, size, best[GAF], seed))
        else:
            cells.append(Cell(noise, size, best[GAF], seed, (GAF, "random-skip")))
            cells.append(Cell(noise, size, best["average"], seed, ("average",)))
    return cells


def scale_cell(preset: Preset, raw: Path, noise: str, size: int) -> list[Cell]:
    """GAF at its tuned lr on the first reported seed, run again to record the gradient
    noise scale per epoch (``b_simple`` in the history, from each step's Gram matrix)."""
    best = best_lrs(preset, raw, noise, size)
    return [] if best is None else [Cell(noise, size, best[GAF], preset.seeds[0], (GAF,),
                                         "scale")]


def plan(preset: Preset, raw: Path, phase: str) -> list[Cell]:
    cells: list[Cell] = []
    for noise in preset.noises:
        for size in preset.sizes:
            if phase == "tune":
                cells += [Cell(noise, size, lr, TUNE_SEED) for lr in preset.lrs]
            elif phase == "seeds":
                cells += seed_cells(preset, raw, noise, size)
            elif phase == "scale":
                cells += scale_cell(preset, raw, noise, size)
    return cells


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Preset]:
    ap = argparse.ArgumentParser(
        prog="gaf study compute", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="fmnist")
    ap.add_argument("--phase", choices=("tune", "seeds", "scale", "all"), default="all",
                    help="all: tune, then the reported seeds of every size whose grid is "
                         "done, then the noise-scale runs")
    ap.add_argument("--raw", default="results/compute-study/raw", help="raw results directory")
    ap.add_argument("--noises", nargs="+", choices=sorted(NOISE_SETTINGS))
    ap.add_argument("--sizes", nargs="+", type=int, help="micro-batch sizes b (M = 2)")
    ap.add_argument("--lrs", nargs="+", type=float, help="the learning-rate grid")
    ap.add_argument("--seeds", nargs="+", type=int, help="reported seeds")
    ap.add_argument("--train-size", type=int)
    ap.add_argument("--test-size", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--device")
    ap.add_argument("--width", type=int, help="model width (MLP hidden units, CNN channels)")
    ap.add_argument("--data-dir")
    ap.add_argument("--dry-run", action="store_true", help="list the cells still to run")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    base = preset.base
    for name in ("train_size", "test_size", "epochs", "device", "data_dir", "width"):
        if getattr(args, name) is not None:
            base = replace(base, **{name: getattr(args, name)})
    for name in ("sizes", "lrs", "seeds", "noises"):
        if getattr(args, name):
            preset = replace(preset, **{name: tuple(getattr(args, name))})
    preset = replace(preset, base=base)
    bad = [b for b in preset.sizes if b < 1]
    if bad or any(lr <= 0 for lr in preset.lrs):
        ap.error(f"sizes and learning rates must be positive, got {preset.sizes} {preset.lrs}")
    return args, preset


def main(argv: list[str] | None = None) -> int:
    args, preset = parse_args(sys.argv[1:] if argv is None else argv)
    raw = Path(args.raw)
    raw.mkdir(parents=True, exist_ok=True)
    if not shutil.disk_usage(raw).free:
        raise SystemExit(f"error: no space left in {raw}")
    phases = ("tune", "seeds", "scale") if args.phase == "all" else (args.phase,)
    for phase in phases:
        todo = [c for c in plan(preset, raw, phase) if not (raw / f"{c.name}.json").exists()]
        print(f"compute study, {phase}: {len(todo)} cells to run in {raw}", flush=True)
        if args.dry_run:
            print("\n".join(c.name for c in todo))
            continue
        t0 = time.perf_counter()
        for k, cell in enumerate(todo, start=1):
            run_cell(preset, cell, raw)
            done = time.perf_counter() - t0
            eta = done / k * (len(todo) - k)
            print(f"[{k}/{len(todo)}] {cell.name} ({done / 60:.1f} min, ETA {eta / 60:.0f} min)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
