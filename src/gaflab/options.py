"""Command-line options of ``gaf train`` / ``gaf compare`` / ``gaf probe``: argument types
that name the problem with a bad value, the option groups, and how the options given
override a base configuration."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields

from gaf.core import check_tau
from gaf.core.measures import MEASURES
from gaf.faults import FAULT_KINDS
from gaflab.config import (
    METHODS,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    micro_batches_per_step,
)
from gaflab.data import DATASETS, canonical_name
from gaflab.methods import canonical_method
from gaflab.models import MODELS
from gaflab.noise import NOISE_KINDS, check_rate


def fraction(text: str) -> float:
    try:
        return check_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def dataset_name(text: str) -> str:
    try:
        return canonical_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


class _Explicit:
    """An option value that stands for None in the configuration but was given on the
    command line: apply_options drops unset options (None), and must not drop this one."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


ALL = _Explicit("all")  # --train-size all / --test-size all: the whole split


def _size_or_all(text: str) -> int | _Explicit:
    if text.strip().lower() in ("all", "0", "none"):
        return ALL
    return positive(text)


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def tau_value(text: str) -> float:
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


def add_common_options(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--dataset", type=dataset_name, help=f"one of {', '.join(DATASETS)}")
    d.add_argument("--data-dir", help="directory holding the dataset files (also $GAF_DATA_DIR)")
    d.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never try to download missing files")
    d.add_argument("--train-size", type=_size_or_all,
                   help="random subset of the training split ('all' or 0: everything; "
                        "more than the split holds: everything, with a warning)")
    d.add_argument("--test-size", type=_size_or_all, help="as --train-size, for the test split")
    d.add_argument("--noise", choices=NOISE_KINDS, help="label noise kind")
    d.add_argument("--human-labels",
                   help="CIFAR-N label set: aggre/worse/random1-3 (cifar10), noisy (cifar100)")
    d.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (CIFAR)")
    d.add_argument("--noise-sources", type=positive, metavar="S",
                   help="noise per source: split the training set into S random sources")
    d.add_argument("--bad-sources", type=fraction, metavar="F",
                   help="fraction of the sources carrying the --noise kind (F*S whole)")
    d.add_argument("--source-noise-rate", type=fraction, metavar="R",
                   help="rate inside a bad source (default: the rate that makes the overall "
                        "rate --noise-rate)")
    d.add_argument("--other-source-noise-rate", type=fraction, metavar="R",
                   help="rate inside the other sources (default 0: clean)")
    d.add_argument("--source-batches", action=argparse.BooleanOptionalAction, default=None,
                   help="with --noise-sources, every micro-batch from one source (default); "
                        "--no-source-batches mixes them")
    m = p.add_argument_group("model and batches")
    m.add_argument("--model", choices=MODELS)
    m.add_argument("--width", type=positive,
                   help="first-layer channels (default: small_cnn 16, resnets 64)")
    m.add_argument("--micro-batch-size", type=positive)
    m.add_argument("--num-micro-batches", type=positive, help="micro-batches per step (M)")
    m.add_argument("--batch-size", type=positive,
                   help="samples per step; sets M = batch size / micro-batch size")
    m.add_argument("--class-balanced", action=argparse.BooleanOptionalAction, default=None,
                   help="micro-batches with equally many samples of every class")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=positive)
    o.add_argument("--max-steps", type=positive, help="cap on steps per epoch")
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
    r.add_argument("--threads", type=positive, help="torch CPU threads per run")
    r.add_argument("--eval-batch-size", type=positive)
    r.add_argument("--no-distances", dest="record_distances", action="store_false",
                   default=None, help="do not record micro-gradient distances for averaging")
    r.add_argument("--quiet", dest="progress", action="store_false", default=None,
                   help="no progress output")
    r.add_argument("--no-plots", dest="plots", action="store_false", default=True)
    r.add_argument("--out", help="output directory (results.json, report.md, PNG plots)")


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def method_name(text: str) -> str:
    try:
        return canonical_method(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_method_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods other than GAF (see gaflab.methods)")
    g.add_argument("--control-rate", type=_probability,
                   help="random-skip's p / random-drop's q (default in gaf compare: matched "
                        "to the GAF run of the same setting and seed)")
    g.add_argument("--match-per-epoch", action="store_true", default=None,
                   help="matched controls follow GAF's rate epoch by epoch")
    g.add_argument("--forget-rate", type=_probability,
                   help="small-loss: fraction of samples dropped once ramped (default: the "
                        "training set's known noise rate)")
    g.add_argument("--forget-epochs", type=nonneg_int,
                   help="small-loss: epochs over which the forget rate ramps up (default 10)")
    g.add_argument("--gce-q", type=_probability, help="gce: the exponent q (default 0.7)")
    g.add_argument("--holdout-fraction", type=_probability,
                   help="hold out this fraction of the training set, labels as noisy, for "
                        "early-stop (give it to every compared run: same micro-batches)")
    g.add_argument("--patience", type=positive,
                   help="early-stop: stop after this many epochs without improvement "
                        "(default: run every epoch, keep the best)")


def add_long_run_options(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("fault injection (gaf.faults)")
    f.add_argument("--fault", choices=FAULT_KINDS,
                   help="corrupt the last --faulty-rows micro-batches of every step")
    f.add_argument("--faulty-rows", type=positive, metavar="F",
                   help="how many micro-batches per step are faulty (default 1)")
    s = p.add_argument_group("speed and long runs")
    s.add_argument("--amp", choices=("bf16", "fp16", "none"),
                   help="mixed precision: bf16 autocast, or fp16 autocast with a GradScaler")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout for the model and its inputs")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (the first steps pay the compilation)")
    s.add_argument("--checkpoint-every", type=positive, metavar="STEPS",
                   help="checkpoint every STEPS steps too (with --out, every run checkpoints "
                        "at each epoch's end into OUT/checkpoints)")
    s.add_argument("--resume", action="store_true",
                   help="continue the runs checkpointed in --out (finished ones are skipped); "
                        "the settings must be those of the interrupted command")


def add_threshold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", help="adaptive or scheduled threshold for the GAF runs, "
                   "replacing --tau, e.g. null-tail, 'quantile:target_acceptance=0.7' "
                   "(see gaf.thresholds.parse_threshold)")
    p.add_argument("--measure", choices=MEASURES,
                   help="agreement measure for the GAF runs (default cosine)")


_CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}
METHODS_HELP = "one of " + ", ".join(METHODS)


def apply_options(args: argparse.Namespace, base: TrainConfig, parser: argparse.ArgumentParser
           ) -> TrainConfig:
    """Options given on the command line override ``base``; then validate."""
    changes = {k: None if isinstance(v, _Explicit) else v for k, v in vars(args).items()
               if k in _CONFIG_FIELDS and v is not None
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


def show_defaults(parser: argparse.ArgumentParser, base: TrainConfig, where: str = "") -> None:
    """Append each option's default to its --help text: the configuration's value for
    options that set one of its fields (they default to None so that a recipe's value
    stands; ``where`` says so), argparse's own default for the others."""
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest in ("help", "dry_run"):
            continue
        text = action.help or ""
        if "default" in text:
            continue
        flag = isinstance(action, argparse.BooleanOptionalAction)
        if action.dest in _CONFIG_FIELDS and (action.nargs != 0 or flag):
            value = getattr(base, action.dest)
            if flag:
                value = "--" + ("" if value else "no-") + action.dest.replace("_", "-")
            elif value is None:
                value = "none"
            shown = f"default: {value}{where}"
        elif action.default is not None and action.nargs != 0:
            shown = "default: %(default)s"
        else:
            continue
        action.help = f"{text} ({shown})" if text else shown
