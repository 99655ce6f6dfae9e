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
import contextlib
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gaf.core import ALL_RULES
from gaflab.checkpoint import CheckpointError, CheckpointMismatchError
from gaflab.compare import data_key, expand_grid, run_comparison, write_outputs
from gaflab.config import TrainConfig
from gaflab.data import DatasetFileError, DatasetNotFoundError, load_dataset
from gaflab.goal import check_goal, describe
from gaflab.methods import CONTROLS
from gaflab.noise_scale import add_parser as add_noise_scale_parser
from gaflab.noise_scale import cmd_noise_scale
from gaflab.options import (
    METHODS_HELP,
    add_common_options,
    add_long_run_options,
    add_method_options,
    add_threshold_options,
    apply_options,
    dataset_name,
    fraction,
    method_name,
    nonneg_int,
    positive,
    show_defaults,
    tau_value,
)
from gaflab.prepare import describe_data, prepare_data
from gaflab.probe import ProbeConfig, run_probe, write_probe
from gaflab.recipes import describe_recipes, get_recipe
from gaflab.report import (
    DIFFERENCE_COLUMNS,
    SELECTION_COLUMNS,
    difference_rows,
    format_table,
    load_results,
    selection_rows,
    summary_rows,
)
from gaflab.results import strict_json
from gaflab.studies import STUDIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaf",
        description="Gradient Agreement Filtering experiments: GAF against plain averaging "
                    "of micro-gradients under label noise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="one training run")
    add_common_options(t)
    t.add_argument("--method", type=method_name, default=None, help=METHODS_HELP)
    t.add_argument("--tau", type=tau_value)
    t.add_argument("--rule", choices=ALL_RULES)
    add_threshold_options(t)
    add_method_options(t)
    t.add_argument("--noise-rate", type=fraction, help="fraction of wrong labels, e.g. 0.4")
    t.add_argument("--seed", type=nonneg_int)
    add_long_run_options(t)
    _add_tensorboard_option(t)
    _add_dry_run_option(t)
    show_defaults(t, TrainConfig())

    c = sub.add_parser("compare", help="several methods/settings/seeds side by side")
    add_common_options(c)
    c.add_argument("--recipe", help="named configuration (see --list-recipes)")
    c.add_argument("--list-recipes", action="store_true")
    c.add_argument("--methods", nargs="+", type=method_name, help=METHODS_HELP)
    c.add_argument("--tau", nargs="+", type=tau_value, help="GAF thresholds (one run each)")
    c.add_argument("--rule", choices=ALL_RULES)
    add_threshold_options(c)
    add_method_options(c)
    c.add_argument("--noise-rate", nargs="+", type=fraction,
                   help="fractions of wrong labels, e.g. 0.2 0.4")
    c.add_argument("--seed", nargs="+", type=nonneg_int)
    add_long_run_options(c)
    _add_tensorboard_option(c)
    _add_dry_run_option(c)
    c.add_argument("--jobs", type=positive, default=None,
                   help="runs in parallel processes (default: 2 when there are 2+ CPUs and "
                        "the device is cpu, else 1)")
    c.add_argument("--check", action="store_true",
                   help="judge every GAF run against its matched blind control (goal >= 2 "
                        "points) and averaging (goal >= 5), print the verdict and write "
                        "check.json; exit 1 if the comparison is incomplete")
    c.add_argument("--require-goal", action="store_true",
                   help="with --check: also exit 1 when the goal is not met")
    show_defaults(c, get_recipe("plain").base, ", or the --recipe's")

    p = sub.add_parser("probe", help="micro-gradient cosine distance over training and "
                                     "against micro-batch size")
    add_common_options(p)
    p.add_argument("--method", type=method_name, default=None, help=METHODS_HELP)
    p.add_argument("--tau", type=tau_value)
    p.add_argument("--rule", choices=ALL_RULES)
    p.add_argument("--noise-rate", type=fraction)
    p.add_argument("--seed", type=nonneg_int)
    p.add_argument("--sizes", nargs="+", type=positive, help="micro-batch sizes to probe")
    p.add_argument("--pairs", type=positive, default=16, help="pairs per size")
    p.add_argument("--probe-epochs", nargs="+", type=nonneg_int,
                   help="epochs at which to probe (0 = before training)")
    show_defaults(p, ProbeConfig().train)

    rep = sub.add_parser("report", help="redraw report.md and plots from a results.json")
    rep.add_argument("results", help="a results.json written by gaf compare/train")
    rep.add_argument("--out", help="output directory (default: beside results.json)")

    st = sub.add_parser("study", help="run a study or rebuild its report (gaflab.studies)",
                        description="The studies of docs/*-study.md and docs/collapse.md; "
                                    "`gaf study NAME --help` lists a study's options.")
    st.add_argument("name", choices=sorted(STUDIES))
    st.add_argument("study_args", nargs=argparse.REMAINDER, help="the study's own options")

    add_noise_scale_parser(sub)

    dcmd = sub.add_parser("data", help="locate (or download) a dataset and describe it")
    dcmd.add_argument("--dataset", type=dataset_name, default="fashion-mnist")
    dcmd.add_argument("--data-dir")
    dcmd.add_argument("--no-download", dest="download", action="store_false", default=True)
    return parser


def cmd_train(args, parser) -> int:
    base = TrainConfig()
    for k in ("method", "tau", "noise_rate", "seed"):
        v = getattr(args, k)
        if v is not None:
            setattr(base, k, v)
    cfg = apply_options(args, base, parser)
    if cfg.method in CONTROLS and cfg.control_rate is None:
        parser.error(f"{cfg.method} needs --control-rate in gaf train (gaf compare matches it "
                     "to the GAF run of the same setting and seed)")
    if args.dry_run:
        return _dry_run([cfg])
    _check_resume(args, parser)
    _check_tensorboard(args, parser)
    check_out(args.out)
    comp = run_comparison([cfg], args.out, jobs=1, title=f"gaf train: {cfg.label}",
                          plots=args.plots, resume=args.resume)
    print(format_table(summary_rows(comp.runs), markdown=False))
    _print_method_tables(comp.runs)
    _print_outputs(comp.outputs)
    _write_tensorboard(args, comp.runs)
    return 0


def _print_method_tables(runs) -> None:
    """Selection precision, paired differences and warnings, after the summary table."""
    for title, rows, header in (
        ("what each method kept (noise fraction %: last epoch, range over epochs)",
         selection_rows(runs), SELECTION_COLUMNS),
        ("GAF − other, paired by seed (mean ± 95% interval)", difference_rows(runs),
         DIFFERENCE_COLUMNS),
    ):
        if rows:
            print(f"\n{title}:")
            print(format_table(rows, header, markdown=False))
    for r in runs:
        for w in r.warnings:
            print(f"warning, {r.label} (seed {r.config['seed']}): {w['message']}")


def cmd_compare(args, parser) -> int:
    if args.list_recipes:
        print(describe_recipes())
        return 0
    try:
        recipe = get_recipe(args.recipe or "plain")
    except ValueError as e:
        parser.error(str(e))
    cfg = apply_options(args, recipe.base, parser)
    methods = list(args.methods) if args.methods else list(recipe.methods)
    taus = args.tau or list(recipe.taus)
    if cfg.threshold:
        taus = taus[:1]  # the threshold object replaces tau: one GAF run per setting
    rates = args.noise_rate or list(recipe.noise_rates)
    settings = None if args.noise_rate else recipe.settings
    seeds = args.seed if args.seed is not None else list(recipe.seeds)
    if args.rule:
        cfg.rule = args.rule
    try:
        configs = expand_grid(cfg, methods, taus, rates, seeds, settings)
    except ValueError as e:
        parser.error(str(e))
    jobs = args.jobs or _default_jobs(configs)
    print(f"gaf compare: {len(configs)} runs ({', '.join(sorted({c.label for c in configs}))})"
          f" on {cfg.dataset}, {cfg.device}, {jobs} at a time", flush=True)
    if args.dry_run:
        return _dry_run(configs)
    paper = recipe.paper if recipe.paper else None
    title = f"GAF against averaging ({recipe.name if args.recipe else cfg.dataset})"
    _check_resume(args, parser)
    _check_tensorboard(args, parser)
    check_out(args.out)
    comp = run_comparison(configs, args.out, jobs=jobs, title=title, paper=paper,
                          plots=args.plots, resume=args.resume)
    print()
    print(format_table(summary_rows(comp.runs), markdown=False))
    _print_method_tables(comp.runs)
    print(f"wall time {comp.wall_seconds:.0f} s")
    _print_outputs(comp.outputs)
    _write_tensorboard(args, comp.runs)
    if args.check:
        return _report_goal(comp.runs, args.out, args.require_goal)
    return 0


def _report_goal(runs, out: str | None, require: bool) -> int:
    verdict = check_goal(runs)
    for line in describe(verdict):
        print(line, file=sys.stdout if verdict["complete"] else sys.stderr)
    if out:
        with open(os.path.join(out, "check.json"), "w") as f:
            f.write(strict_json(verdict) + "\n")  # NaN (one seed: no spread) as null
    if not verdict["complete"] or (require and not verdict["met"]):
        return 1
    return 0


def _check_resume(args, parser) -> None:
    if args.resume and not args.out:
        parser.error("--resume continues the runs checkpointed in --out: give --out")


class OutputDirError(OSError):
    """--out cannot hold the outputs (a file, not writable, full): found before training."""


PROBE_BYTES = 1 << 16  # what the start-up probe writes and syncs: a full disk shows here


def check_out(out: str | None, option: str = "--out") -> None:
    """Make sure ``out`` can be written, before any run starts: create it, write a probe
    file, sync and remove it. An OutputDirError says why not (rather than a traceback
    after the first epoch, when the first checkpoint or results.json is written)."""
    if not out:
        return
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{option} {out} is a file, not a directory: give a directory "
                             "(it is created if missing)")
    probe = path / f".gaf-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputDirError(f"{option} {out} cannot be written ({e.strerror or e}"
                             f"{': ' + str(e.filename) if e.filename else ''}): choose a "
                             "writable directory with free space") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def _default_jobs(configs) -> int:
    if len(configs) < 2 or any(c.device != "cpu" for c in configs):
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def cmd_probe(args, parser) -> int:
    base = ProbeConfig().train
    for k in ("method", "tau", "noise_rate", "seed"):
        v = getattr(args, k)
        if v is not None:
            setattr(base, k, v)
    cfg = apply_options(args, base, parser)
    pcfg = ProbeConfig(train=cfg, pairs=args.pairs)
    if args.sizes:
        pcfg.sizes = tuple(args.sizes)
    if args.probe_epochs is not None:
        pcfg.at_epochs = tuple(args.probe_epochs)
    try:
        pcfg.validate()
    except ValueError as e:
        parser.error(str(e))
    check_out(args.out)
    result = run_probe(pcfg)
    for r in result.size_table():
        print(f"epoch {r['epoch']:>3}  micro-batch {r['micro_batch_size']:>4}: "
              f"distance {r['mean']:.3f} ± {r['std']:.3f}")
    if args.out:
        _print_outputs(write_probe(result, args.out, plots=args.plots))
    return 0


def cmd_report(args, parser) -> int:
    try:
        doc, runs = load_results(args.results)
    except (OSError, ValueError, KeyError) as e:
        parser.error(f"cannot read {args.results}: {e}")
    if not runs:
        parser.error(f"{args.results} holds no runs")
    out = args.out or str(Path(args.results).parent)
    check_out(out)
    paper = {k: {float(r): v for r, v in d.items()} for k, d in doc.get("paper", {}).items()}
    outputs = write_outputs(runs, out, doc.get("wall_seconds"),
                            title=doc.get("title", "GAF against averaging"), paper=paper or None)
    print(format_table(summary_rows(runs), markdown=False))
    _print_method_tables(runs)
    _print_outputs(outputs)
    return 0


def cmd_data(args, parser) -> int:
    d = load_dataset(args.dataset, args.data_dir, download=args.download)
    print(f"{d.name}: {d.num_train} training and {d.num_test} test images of shape "
          f"{tuple(d.train_images.shape[1:])}, {d.num_classes} classes, from {d.source}")
    return 0


def _add_dry_run_option(p) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="check the settings, load the data and print what each run would "
                        "train on (images, source), then stop: nothing trained or written")


def _dry_run(configs) -> int:
    """Each run's data line, from the same preparation a real run uses."""
    cache: dict = {}
    for cfg in configs:
        key = data_key(cfg)
        if key not in cache:
            cache.clear()
            cache[key] = prepare_data(cfg).described
        print(f"[{cfg.label}] data: {describe_data(cache[key])}")
        print(f"[{cfg.label}] would train {cfg.epochs} epoch(s) of {cfg.num_micro_batches} x "
              f"{cfg.micro_batch_size} micro-batches on {cfg.device} (seed {cfg.seed}, noise "
              f"{cfg.noise} {cfg.noise_rate:g})", flush=True)
    return 0


def _add_tensorboard_option(p) -> None:
    p.add_argument("--tensorboard", metavar="DIR",
                   help="also write each finished run's per-epoch statistics and per-step "
                        "distances as TensorBoard logs (and epochs.csv) in DIR/<run>")


def _check_tensorboard(args, parser) -> None:
    """Before any training: --tensorboard needs the tensorboard package."""
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        parser.error("--tensorboard needs the tensorboard package: "
                     "pip install 'gaf[tensorboard]'")
    check_out(args.tensorboard, "--tensorboard")  # written after the runs: check it now


def _write_tensorboard(args, runs) -> None:
    if args.tensorboard:
        # Here, not at the top: tensorboard is an optional extra, needed only with the flag.
        from gaf.integrations.tensorboard import write_runs

        dirs = write_runs(args.tensorboard, runs)
        print(f"  tensorboard: {args.tensorboard} ({len(dirs)} runs; "
              f"tensorboard --logdir {args.tensorboard})")


def _print_outputs(outputs: dict[str, str]) -> None:
    for name, path in outputs.items():
        print(f"  {name}: {path}")


def cmd_study(args, parser) -> int:
    # By name, so that only the study asked for is loaded.
    module = importlib.import_module(STUDIES[args.name])
    return module.main(list(args.study_args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"train": cmd_train, "compare": cmd_compare, "probe": cmd_probe,
                "report": cmd_report, "data": cmd_data, "study": cmd_study,
                "noise-scale": cmd_noise_scale}
    t0 = time.perf_counter()
    try:
        return commands[args.command](args, parser)
    except (DatasetNotFoundError, DatasetFileError, CheckpointError, CheckpointMismatchError,
            OutputDirError) as e:
        print(f"gaf {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        # A write that failed mid-run (disk full, directory removed): name it, no traceback.
        print(f"gaf {args.command}: cannot write {e.filename}: {e.strerror or e}; the runs "
              "checkpointed so far continue with --resume once there is room", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        finished, out = getattr(e, "finished", None), getattr(args, "out", None)
        done = f"; {len(finished)} finished run(s) written" if finished and out else ""  # compare
        hint = "; rerun the same command with --resume to continue" if out else ""
        print(f"gaf {args.command}: interrupted after {time.perf_counter() - t0:.0f} s"
              f"{done}{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
