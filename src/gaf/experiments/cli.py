"""``gaf`` command line: ``train``, ``compare``, ``probe``, ``report``, ``data``.

Examples::

    gaf compare --out runs/demo                      # the built-in demo (Fashion-MNIST)
    gaf compare --noise-rate 0.2 0.6 --seed 0 1 --epochs 8 --out runs/sweep
    gaf compare --recipe cifar100-sym-sweep --data-dir ~/data --out runs/fig6
    gaf train --method gaf --tau 0.95 --micro-batch-size 16 --num-micro-batches 4
    gaf probe --epochs 4 --sizes 2 8 32 128 --out runs/probe
    gaf report runs/demo/results.json --out runs/again # redraw report and plots
    gaf data --dataset fashion-mnist                 # check the files are found

Every option left unset keeps the recipe's (or the default configuration's) value.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import fields

from gaf.core import RULES, check_tau
from gaf.experiments.config import (
    METHODS,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    micro_batches_per_step,
)
from gaf.experiments.data import DATASETS, DatasetNotFoundError, canonical_name
from gaf.experiments.models import MODELS
from gaf.experiments.noise import NOISE_KINDS, check_rate
from gaf.measures import MEASURES


def _fraction(text: str) -> float:
    try:
        return check_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dataset(text: str) -> str:
    try:
        return canonical_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _size_or_all(text: str) -> int | None:
    if text.lower() in ("all", "0", "none"):
        return None
    return _positive(text)


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _tau(text: str) -> float:
    try:
        return check_tau(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = _nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--dataset", type=_dataset, help=f"one of {', '.join(DATASETS)}")
    d.add_argument("--data-dir", help="directory holding the dataset files (also $GAF_DATA_DIR)")
    d.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never try to download missing files")
    d.add_argument("--train-size", type=_size_or_all,
                   help="random subset of the training split ('all' for everything)")
    d.add_argument("--test-size", type=_size_or_all)
    d.add_argument("--noise", choices=NOISE_KINDS, help="label noise kind")
    d.add_argument("--human-labels",
                   help="CIFAR-N label set: aggre/worse/random1-3 (cifar10), noisy (cifar100)")
    d.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (CIFAR)")
    d.add_argument("--noise-sources", type=_positive, metavar="S",
                   help="noise per source: split the training set into S random sources")
    d.add_argument("--bad-sources", type=_fraction, metavar="F",
                   help="fraction of the sources carrying the --noise kind (F*S whole)")
    d.add_argument("--source-noise-rate", type=_fraction, metavar="R",
                   help="rate inside a bad source (default: the rate that makes the overall "
                        "rate --noise-rate)")
    d.add_argument("--other-source-noise-rate", type=_fraction, metavar="R",
                   help="rate inside the other sources (default 0: clean)")
    d.add_argument("--source-batches", action=argparse.BooleanOptionalAction, default=None,
                   help="with --noise-sources, every micro-batch from one source (default); "
                        "--no-source-batches mixes them")
    m = p.add_argument_group("model and batches")
    m.add_argument("--model", choices=MODELS)
    m.add_argument("--width", type=_positive,
                   help="first-layer channels (default: small_cnn 16, resnets 64)")
    m.add_argument("--micro-batch-size", type=_positive)
    m.add_argument("--num-micro-batches", type=_positive, help="micro-batches per step (M)")
    m.add_argument("--batch-size", type=_positive,
                   help="samples per step; sets M = batch size / micro-batch size")
    m.add_argument("--class-balanced", action=argparse.BooleanOptionalAction, default=None,
                   help="micro-batches with equally many samples of every class")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_positive)
    o.add_argument("--max-steps", type=_positive, help="cap on steps per epoch")
    o.add_argument("--optimizer", choices=OPTIMIZERS)
    o.add_argument("--lr", type=_positive_float)
    o.add_argument("--momentum", type=_nonneg_float)
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    o.add_argument("--weight-decay", type=_nonneg_float)
    o.add_argument("--schedule", choices=SCHEDULES)
    o.add_argument("--warmup-epochs", type=_nonneg_float)
    o.add_argument("--max-grad-norm", type=_positive_float)
    r = p.add_argument_group("run")
    r.add_argument("--device", help="cpu, cuda, cuda:1, auto")
    r.add_argument("--threads", type=_positive, help="torch CPU threads per run")
    r.add_argument("--eval-batch-size", type=_positive)
    r.add_argument("--no-distances", dest="record_distances", action="store_false",
                   default=None, help="do not record micro-gradient distances for averaging")
    r.add_argument("--quiet", dest="progress", action="store_false", default=None,
                   help="no progress output")
    r.add_argument("--no-plots", dest="plots", action="store_false", default=True)
    r.add_argument("--out", help="output directory (results.json, report.md, PNG plots)")


def _add_threshold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", help="adaptive or scheduled threshold for the GAF runs, "
                   "replacing --tau, e.g. null-tail, 'quantile:target_acceptance=0.7' "
                   "(see gaf.thresholds.parse_threshold)")
    p.add_argument("--measure", choices=MEASURES,
                   help="agreement measure for the GAF runs (default cosine)")


_CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}


def _apply(args: argparse.Namespace, base: TrainConfig, parser: argparse.ArgumentParser
           ) -> TrainConfig:
    """Options given on the command line override ``base``; then validate."""
    changes = {k: v for k, v in vars(args).items() if k in _CONFIG_FIELDS and v is not None
               and k not in ("noise_rate", "seed", "tau", "method")}
    cfg = base.replace(**changes)
    mb = args.micro_batch_size or cfg.micro_batch_size
    try:
        if args.batch_size is not None:
            m = micro_batches_per_step(args.batch_size, mb)
            if args.num_micro_batches is not None and args.num_micro_batches != m:
                parser.error(f"--batch-size {args.batch_size} / --micro-batch-size {mb} gives "
                             f"{m} micro-batches, but --num-micro-batches is "
                             f"{args.num_micro_batches}")
            cfg.num_micro_batches = m
        cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaf",
        description="Gradient Agreement Filtering experiments: GAF against plain averaging "
                    "of micro-gradients under label noise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="one training run")
    _add_common(t)
    t.add_argument("--method", choices=METHODS + ("averaging",), default=None)
    t.add_argument("--tau", type=_tau)
    t.add_argument("--rule", choices=RULES)
    _add_threshold_options(t)
    t.add_argument("--noise-rate", type=_fraction, help="fraction of wrong labels, e.g. 0.4")
    t.add_argument("--seed", type=_nonneg_int)

    c = sub.add_parser("compare", help="several methods/settings/seeds side by side")
    _add_common(c)
    c.add_argument("--recipe", help="named configuration (see --list-recipes)")
    c.add_argument("--list-recipes", action="store_true")
    c.add_argument("--methods", nargs="+", choices=METHODS + ("averaging",))
    c.add_argument("--tau", nargs="+", type=_tau, help="GAF thresholds (one run each)")
    c.add_argument("--rule", choices=RULES)
    _add_threshold_options(c)
    c.add_argument("--noise-rate", nargs="+", type=_fraction,
                   help="fractions of wrong labels, e.g. 0.2 0.4")
    c.add_argument("--seed", nargs="+", type=_nonneg_int)
    c.add_argument("--jobs", type=_positive, default=None,
                   help="runs in parallel processes (default: 2 when there are 2+ CPUs and "
                        "the device is cpu, else 1)")
    c.add_argument("--check", action="store_true",
                   help="exit with status 1 unless every GAF run beats averaging by >= 5 "
                        "points of test accuracy and memorises at most half as much")

    p = sub.add_parser("probe", help="micro-gradient cosine distance over training and "
                                     "against micro-batch size")
    _add_common(p)
    p.add_argument("--method", choices=METHODS + ("averaging",), default=None)
    p.add_argument("--tau", type=_tau)
    p.add_argument("--rule", choices=RULES)
    p.add_argument("--noise-rate", type=_fraction)
    p.add_argument("--seed", type=_nonneg_int)
    p.add_argument("--sizes", nargs="+", type=_positive, help="micro-batch sizes to probe")
    p.add_argument("--pairs", type=_positive, default=16, help="pairs per size")
    p.add_argument("--probe-epochs", nargs="+", type=_nonneg_int,
                   help="epochs at which to probe (0 = before training)")

    rep = sub.add_parser("report", help="redraw report.md and plots from a results.json")
    rep.add_argument("results", help="a results.json written by gaf compare/train")
    rep.add_argument("--out", help="output directory (default: beside results.json)")

    dcmd = sub.add_parser("data", help="locate (or download) a dataset and describe it")
    dcmd.add_argument("--dataset", type=_dataset, default="fashion-mnist")
    dcmd.add_argument("--data-dir")
    dcmd.add_argument("--no-download", dest="download", action="store_false", default=True)
    return parser


def _method(m: str | None) -> str | None:
    return "average" if m == "averaging" else m


def cmd_train(args, parser) -> int:
    base = TrainConfig()
    for k in ("method", "tau", "noise_rate", "seed"):
        v = getattr(args, k)
        if v is not None:
            setattr(base, k, _method(v) if k == "method" else v)
    cfg = _apply(args, base, parser)
    from gaf.experiments.compare import run_comparison
    from gaf.experiments.report import format_table, summary_rows

    comp = run_comparison([cfg], args.out, jobs=1, title=f"gaf train: {cfg.label}",
                          plots=args.plots)
    print(format_table(summary_rows(comp.runs), markdown=False))
    _print_outputs(comp.outputs)
    return 0


def cmd_compare(args, parser) -> int:
    from gaf.experiments.compare import expand_grid, run_comparison
    from gaf.experiments.recipes import describe_recipes, get_recipe

    if args.list_recipes:
        print(describe_recipes())
        return 0
    try:
        recipe = get_recipe(args.recipe or "fmnist-demo")
    except ValueError as e:
        parser.error(str(e))
    cfg = _apply(args, recipe.base, parser)
    methods = [_method(m) for m in args.methods] if args.methods else list(recipe.methods)
    taus = args.tau or list(recipe.taus)
    if cfg.threshold:
        taus = taus[:1]  # the threshold object replaces tau: one GAF run per setting
    rates = args.noise_rate or list(recipe.noise_rates)
    seeds = args.seed if args.seed is not None else list(recipe.seeds)
    if args.rule:
        cfg.rule = args.rule
    try:
        configs = expand_grid(cfg, methods, taus, rates, seeds)
    except ValueError as e:
        parser.error(str(e))
    jobs = args.jobs or _default_jobs(configs)
    print(f"gaf compare: {len(configs)} runs ({', '.join(sorted({c.label for c in configs}))})"
          f" on {cfg.dataset}, {cfg.device}, {jobs} at a time", flush=True)
    paper = recipe.paper if recipe.paper else None
    title = f"GAF against averaging ({recipe.name if args.recipe else cfg.dataset})"
    comp = run_comparison(configs, args.out, jobs=jobs, title=title, paper=paper,
                          plots=args.plots)
    from gaf.experiments.report import format_table, gaf_vs_average, summary_rows

    print()
    print(format_table(summary_rows(comp.runs), markdown=False))
    vs = gaf_vs_average(comp.runs)
    for d in vs:
        print(f"{d['gaf']} vs average (noise {100 * d['noise_rate']:g}%, seed {d['seed']}): "
              f"test accuracy {d['test_acc_gain_points']:+.1f} points, memorised ratio "
              f"{d['memorised_ratio']:.2f}")
    print(f"wall time {comp.wall_seconds:.0f} s")
    _print_outputs(comp.outputs)
    if args.check:
        bad = [d for d in vs if not (d["test_acc_gain_points"] >= 5.0
                                     and d["memorised_ratio"] <= 0.5)]
        if not vs or bad:
            print("check FAILED: GAF must gain >= 5 points and memorise <= half of averaging",
                  file=sys.stderr)
            return 1
        print("check passed: GAF >= averaging + 5 points, memorised <= half")
    return 0


def _default_jobs(configs) -> int:
    import os

    if len(configs) < 2 or any(c.device != "cpu" for c in configs):
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def cmd_probe(args, parser) -> int:
    from gaf.experiments.probe import ProbeConfig, run_probe, write_probe

    base = ProbeConfig().train
    for k in ("method", "tau", "noise_rate", "seed"):
        v = getattr(args, k)
        if v is not None:
            setattr(base, k, _method(v) if k == "method" else v)
    cfg = _apply(args, base, parser)
    pcfg = ProbeConfig(train=cfg, pairs=args.pairs)
    if args.sizes:
        pcfg.sizes = tuple(args.sizes)
    if args.probe_epochs is not None:
        pcfg.at_epochs = tuple(args.probe_epochs)
    try:
        pcfg.validate()
    except ValueError as e:
        parser.error(str(e))
    result = run_probe(pcfg)
    for r in result.size_table():
        print(f"epoch {r['epoch']:>3}  micro-batch {r['micro_batch_size']:>4}: "
              f"distance {r['mean']:.3f} ± {r['std']:.3f}")
    if args.out:
        _print_outputs(write_probe(result, args.out, plots=args.plots))
    return 0


def cmd_report(args, parser) -> int:
    from pathlib import Path

    from gaf.experiments.compare import write_outputs
    from gaf.experiments.report import format_table, load_results, summary_rows

    try:
        doc, runs = load_results(args.results)
    except (OSError, ValueError, KeyError) as e:
        parser.error(f"cannot read {args.results}: {e}")
    if not runs:
        parser.error(f"{args.results} holds no runs")
    out = args.out or str(Path(args.results).parent)
    paper = {k: {float(r): v for r, v in d.items()} for k, d in doc.get("paper", {}).items()}
    outputs = write_outputs(runs, out, doc.get("wall_seconds"),
                            title=doc.get("title", "GAF against averaging"), paper=paper or None)
    print(format_table(summary_rows(runs), markdown=False))
    _print_outputs(outputs)
    return 0


def cmd_data(args, parser) -> int:
    from gaf.experiments.data import load_dataset

    d = load_dataset(args.dataset, args.data_dir, download=args.download)
    print(f"{d.name}: {d.num_train} training and {d.num_test} test images of shape "
          f"{tuple(d.train_images.shape[1:])}, {d.num_classes} classes, from {d.source}")
    return 0


def _print_outputs(outputs: dict[str, str]) -> None:
    for name, path in outputs.items():
        print(f"  {name}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"train": cmd_train, "compare": cmd_compare, "probe": cmd_probe,
                "report": cmd_report, "data": cmd_data}
    t0 = time.perf_counter()
    try:
        return commands[args.command](args, parser)
    except DatasetNotFoundError as e:
        print(f"gaf {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gaf {args.command}: interrupted after {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
