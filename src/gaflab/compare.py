"""Run a grid of configurations (methods × taus × noise rates × seeds) and write outputs.

Runs that share data settings and seed see identical micro-batches (the batch order does
not depend on the method), so GAF and averaging are compared step for step. With
``jobs > 1`` runs go to separate processes, each with ``cpu_count // jobs`` threads: on a
small CPU model two single-threaded runs side by side finish sooner than two two-threaded
runs one after the other.

Long grids: with an output directory every run checkpoints into ``checkpoints/<label>-seed<s>``
below it and records its result there when it finishes; ``resume=True`` skips the finished
runs and continues the others from their checkpoints (:mod:`gaflab.resume`).
Ctrl-C stops the grid: worker processes are terminated (they ignore SIGINT themselves and
exit if the parent dies), and :func:`run_comparison` writes results.json and the report of
the runs that finished before re-raising.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gaflab.config import TrainConfig
from gaflab.methods import CONTROLS, canonical_method
from gaflab.paired import paired_differences
from gaflab.plots import plot_all
from gaflab.prepare import PreparedData, prepare_data
from gaflab.report import gaf_vs_average, markdown_report, write_results
from gaflab.results import RunResult, setting_key
from gaflab.resume import (
    RESULT_FILE,
    check_resume,
    load_finished,
    run_directory_name,
    write_finished,
)
from gaflab.train import default_threads, format_duration, run_tag, train

MethodSpec = str | tuple[str, dict[str, Any]]


def _variant(spec: MethodSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    name, changes = spec
    return name, dict(changes)


def expand_grid(
    base: TrainConfig,
    methods: Sequence[MethodSpec] = ("average", "gaf"),
    taus: Sequence[float] = (0.97,),
    noise_rates: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    settings: Sequence[dict[str, Any]] | None = None,
) -> list[TrainConfig]:
    """One config per (setting, seed, method[, tau]).

    ``settings`` are data settings (e.g. ``{"noise": "asymmetric", "noise_rate": 0.4}``);
    by default one per noise rate. A method is a name or ``(name, config changes)``, e.g.
    ``("gaf", {"rule": "consensus"})``. Only ``gaf`` runs once per tau. A blind control
    without its rate is matched to the GAF runs of the same setting and seed: one control
    per GAF variant (or only to the one its ``matched_to`` names; ``"gaf"`` names the
    plain GAF runs, not the variants), its rate filled in by
    :func:`run_grid` once that GAF run is done.
    """
    if not methods:
        raise ValueError("no methods to compare")
    if settings is None:
        rates = list(noise_rates) if noise_rates else [base.noise_rate]
        settings = [{"noise_rate": float(r)} for r in rates]
    seed_list = list(seeds) if seeds is not None and len(seeds) else [base.seed]
    variants = [_variant(m) for m in methods]
    out = []
    for setting in settings:
        for seed in seed_list:
            gaf_runs = []
            controls = []
            for name, changes in variants:
                for tau in (taus if canonical_method(name) == "gaf" else (base.tau,)):
                    cfg = base.replace(**setting, method=name, tau=float(tau), seed=int(seed),
                                       **changes).validate()
                    if cfg.method in CONTROLS and cfg.control_rate is None \
                            and cfg.control_rates is None:
                        controls.append(cfg)
                        continue
                    if cfg.method == "gaf":
                        gaf_runs.append((cfg, bool(changes)))
                    out.append(cfg)
            for cfg in controls:
                # A control that names its GAF run is matched to that one only; "gaf"
                # names the plain GAF method(s) of the grid, not its variants.
                targets = [g for g, variant in gaf_runs if cfg.matched_to is None
                           or g.label == cfg.matched_to
                           or (cfg.matched_to == "gaf" and not variant)]
                if not targets:
                    wanted = f"the gaf run {cfg.matched_to!r}" if cfg.matched_to else "a gaf run"
                    raise ValueError(
                        f"{cfg.method} has no rate (control_rate) and {wanted} is not in the "
                        "comparison to match: add it to the methods or give the rate")
                for g in targets:
                    matched = cfg.replace(matched_to=g.label)
                    if len(targets) > 1:
                        matched.name = f"{cfg.method} (matched to {g.label})"
                    out.append(matched.validate())
    labels = [(c.label, setting_key(c.to_dict())) for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError("the grid repeats a run (same method, tau, setting and seed)")
    return out


def match_control(control: TrainConfig, gaf: RunResult) -> TrainConfig:
    """``control`` with its rate taken from the GAF run: random-skip skips steps at GAF's
    skip rate, random-drop drops non-anchor micro-batches at GAF's rejection rate; over the
    whole run, or per epoch with ``match_per_epoch``."""
    key = "skip_rate" if control.method == "random-skip" else "non_anchor_drop_rate"
    per_epoch = [float(h[key]) for h in gaf.history]
    if control.match_per_epoch:
        return control.replace(control_rates=per_epoch).validate()
    if key == "skip_rate":
        return control.replace(control_rate=gaf.skip_rate).validate()
    return control.replace(control_rate=sum(per_epoch) / len(per_epoch)).validate()


def _pending_match(cfg: TrainConfig) -> bool:
    return cfg.matched_to is not None and cfg.control_rate is None and cfg.control_rates is None


def data_key(cfg: TrainConfig) -> tuple:
    return (cfg.dataset, cfg.data_dir, cfg.train_size, cfg.test_size, cfg.noise,
            cfg.noise_rate, cfg.human_labels, cfg.noise_sources, cfg.bad_sources,
            cfg.source_noise_rate, cfg.other_source_noise_rate, cfg.seed, cfg.device)


class GridInterrupted(KeyboardInterrupt):
    """Ctrl-C during a grid; ``finished`` holds the runs that completed before it."""

    def __init__(self, finished: list[RunResult]):
        super().__init__()
        self.finished = finished


def run_directories(configs: Sequence[TrainConfig], root: str | os.PathLike | None
                    ) -> list[Path | None]:
    """Each run's checkpoint directory below ``root`` (None without a root): label and seed,
    plus a hash of its settings where two runs of the grid would share a name."""
    if root is None:
        return [None] * len(configs)
    names = [run_directory_name(c.label, c.seed) for c in configs]
    for i, c in enumerate(configs):
        if names.count(names[i]) > 1:
            key = repr(setting_key(c.to_dict())).encode()
            names[i] = f"{names[i]}-{zlib.crc32(key):08x}"
    return [Path(root) / n for n in names]


def _run_one(cfg: TrainConfig, data: PreparedData | None, run_dir: Path | None, resume: bool,
             progress_bar: bool = True, tag: str | None = None) -> RunResult:
    res = train(cfg, data, progress_bar=progress_bar, checkpoint_dir=run_dir, resume=resume,
                tag=tag)
    if run_dir is not None:
        write_finished(run_dir, res)  # gaf compare --resume skips it from now on
    return res


def _worker_init(parent_pid: int) -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it
    # (and terminates the workers), so a worker never dies half-way through a write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    """A killed parent (even SIGKILL) leaves its workers to init: they stop within a second
    instead of training on alone; their last checkpoint stays for --resume."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker(cfg_dict: dict[str, Any], run_dir: str | None, resume: bool, tag: str | None
            ) -> dict[str, Any]:
    cfg = TrainConfig.from_dict(cfg_dict)
    # Bars from several processes would overwrite each other: print epoch lines instead.
    path = None if run_dir is None else Path(run_dir)
    return _run_one(cfg, None, path, resume, progress_bar=False, tag=tag).to_dict()


@dataclass
class Comparison:
    runs: list[RunResult]
    wall_seconds: float
    outputs: dict[str, str] = field(default_factory=dict)


def run_grid(configs: Sequence[TrainConfig], jobs: int = 1,
             checkpoints: str | os.PathLike | None = None, resume: bool = False,
             on_finished: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Run every config, in order of the list; matched controls run after the GAF runs
    they match (their rates come from those runs). ``checkpoints``: the directory of the
    runs' checkpoints; ``resume``: skip finished runs, continue unfinished ones;
    ``on_finished(run)`` is called as each run finishes (or is found finished)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if resume and checkpoints is not None and configs:
        # Before anything runs (or overwrites results.json): is there something to resume,
        # and under these settings?
        dirs = run_directories(configs, checkpoints)
        for i in check_resume([c.to_dict() for c in configs], dirs, Path(checkpoints)):
            print(f"[{configs[i].label}] no checkpoint in {dirs[i]}: this run starts afresh",
                  flush=True)
    n = len(configs)
    tags = {id(c): run_tag(c, f"run {k}/{n}") for k, c in enumerate(configs, 1)}
    progress = _GridProgress(n, jobs, on_finished)
    first = [c for c in configs if not _pending_match(c)]
    done = dict(zip(map(id, first), _run_all(first, jobs, checkpoints, resume, progress,
                                             [tags[id(c)] for c in first]), strict=True))
    gaf_runs = {(r.label, setting_key(r.config)): r for r in done.values()
                if r.config["method"] == "gaf"}
    later = []
    for c in configs:
        if _pending_match(c):
            gaf = gaf_runs.get((c.matched_to, setting_key(c.to_dict())))
            if gaf is None:
                raise ValueError(f"{c.label}: no run {c.matched_to!r} of the same setting "
                                 "and seed to match")
            later.append((c, match_control(c, gaf)))
    try:
        controls = _run_all([m for _, m in later], jobs, checkpoints, resume, progress,
                            [tags[id(c)] for c, _ in later])
    except GridInterrupted as e:
        raise GridInterrupted(list(done.values()) + e.finished) from None
    for (c, _), r in zip(later, controls, strict=True):
        done[id(c)] = r
    return [done[id(c)] for c in configs]


def _run_all(configs: Sequence[TrainConfig], jobs: int,
             checkpoints: str | os.PathLike | None = None, resume: bool = False,
             on_finished: Callable[[RunResult], None] | None = None,
             tags: Sequence[str] | None = None) -> list[RunResult]:
    dirs = run_directories(configs, checkpoints)
    tags = list(tags) if tags is not None else [run_tag(c) for c in configs]
    results: dict[int, RunResult] = _Finished(on_finished)
    if resume:
        for i, (cfg, d) in enumerate(zip(configs, dirs, strict=True)):
            found = load_finished(d, cfg.to_dict()) if d is not None else None
            if found is not None:
                print(f"[{tags[i]}] finished earlier: {d}", flush=True)
                dict.__setitem__(results, i, found)
                if isinstance(on_finished, _GridProgress):
                    on_finished(found, trained=False)
                elif on_finished is not None:
                    on_finished(found)
    todo = [i for i in range(len(configs)) if i not in results]
    started = time.time()
    try:
        if jobs == 1 or len(todo) <= 1:
            _run_serial(configs, dirs, todo, resume, results, tags)
        else:
            _run_parallel(configs, dirs, todo, resume, jobs, results, tags)
    except KeyboardInterrupt:
        # A worker may have recorded its run an instant before the parent heard of it.
        for i in todo:
            if i not in results and dirs[i] is not None and _recorded_since(dirs[i], started):
                results[i] = load_finished(dirs[i], configs[i].to_dict())
        raise GridInterrupted([results[i] for i in sorted(results)]) from None
    return [results[i] for i in range(len(configs))]


class _GridProgress:
    """Says after each finished run how many are done and about how long the rest take
    (the mean wall time per finished run so far, ``jobs`` at a time), then calls ``hook``."""

    def __init__(self, total: int, jobs: int, hook: Callable[[RunResult], None] | None):
        self.total, self.jobs, self.hook = total, max(1, jobs), hook
        self.done = self.trained = 0
        self.start = time.perf_counter()

    def __call__(self, run: RunResult, trained: bool = True) -> None:
        self.done += 1
        self.trained += trained
        left = self.total - self.done
        if trained and left and self.trained:
            per_run = (time.perf_counter() - self.start) / self.trained * min(
                self.jobs, self.total)
            eta = per_run * -(-left // min(self.jobs, self.total))
            print(f"gaf compare: {self.done} of {self.total} runs finished, about "
                  f"{format_duration(eta)} left", flush=True)
        if self.hook is not None:
            self.hook(run)


class _Finished(dict):
    """The grid's finished runs by index; tells ``hook`` of each as it is recorded."""

    def __init__(self, hook: Callable[[RunResult], None] | None):
        super().__init__()
        self.hook = hook

    def __setitem__(self, i: int, run: RunResult) -> None:
        super().__setitem__(i, run)
        if self.hook is not None:
            self.hook(run)


def _recorded_since(run_dir: Path, started: float) -> bool:
    path = run_dir / RESULT_FILE
    # 2 s of slack for file systems whose timestamps are coarse.
    return path.exists() and path.stat().st_mtime >= started - 2.0


def _run_serial(configs, dirs, todo, resume, results, tags) -> None:
    cache: dict[tuple, PreparedData] = {}
    for i in todo:
        cfg = configs[i]
        key = data_key(cfg)
        if key not in cache:
            cache.clear()  # keep one prepared dataset in memory at a time
            cache[key] = prepare_data(cfg)
        res = _run_one(cfg, cache[key], dirs[i], resume, tag=tags[i])
        res.model = None  # a grid keeps numbers, not weights
        results[i] = res


def _run_parallel(configs, dirs, todo, resume, jobs, results, tags) -> None:
    # Fail (or download) here, once, rather than in every worker.
    for key in {data_key(configs[i]): configs[i] for i in todo}.values():
        prepare_data(key)
    threads = default_threads(jobs)
    # spawn: a fresh interpreter per worker; fork after torch has started threads can hang.
    ex = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(os.getpid(),))
    try:
        futures = {}
        for i in todo:
            c = configs[i].replace(threads=configs[i].threads or threads)
            d = None if dirs[i] is None else str(dirs[i])
            futures[i] = ex.submit(_worker, c.to_dict(), d, resume, tags[i])
        index = {f: i for i, f in futures.items()}
        for f in as_completed(futures.values()):  # recorded as they finish, not in order
            results[index[f]] = RunResult.from_dict(f.result())
    except BaseException:
        for i, f in futures.items():  # keep what finished while we waited on another
            if i not in results and f.done() and not f.cancelled() and f.exception() is None:
                results[i] = RunResult.from_dict(f.result())
        _stop_workers(ex)
        raise
    ex.shutdown()


def _stop_workers(ex: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the running workers now (``shutdown``
    alone would wait for their runs to end)."""
    processes = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    for p in processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()


def run_comparison(
    configs: Sequence[TrainConfig],
    out_dir: str | os.PathLike | None,
    jobs: int = 1,
    title: str = "GAF against averaging",
    paper: dict[str, dict[float, float]] | None = None,
    plots: bool = True,
    extra: dict[str, Any] | None = None,
    resume: bool = False,
) -> Comparison:
    """Run the grid and write its outputs to ``out_dir`` (with the runs' checkpoints below
    it, see the module docstring); on Ctrl-C write what finished, then re-raise."""
    t0 = time.perf_counter()
    checkpoints = None if out_dir is None else Path(out_dir) / "checkpoints"
    finished: list[RunResult] = []

    def record(run: RunResult) -> None:
        # results.json grows as runs finish: a long grid's numbers are readable (and
        # survive a crash) before its end; the full outputs replace it at the end.
        finished.append(run)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_results(Path(out_dir) / "results.json", finished,
                      {"title": f"{title} (in progress: {len(finished)} of {len(configs)} "
                                "runs)", "wall_seconds": time.perf_counter() - t0})

    try:
        runs = run_grid(configs, jobs, checkpoints, resume,
                        record if out_dir is not None else None)
    except GridInterrupted as e:
        if out_dir is not None and e.finished:
            write_outputs(e.finished, out_dir, time.perf_counter() - t0,
                          f"{title} (interrupted: {len(e.finished)} of {len(configs)} runs)",
                          paper, plots=False, extra=extra)
        raise
    wall = time.perf_counter() - t0
    comp = Comparison(runs, wall)
    if out_dir is not None:
        comp.outputs = write_outputs(runs, out_dir, wall, title, paper, plots, extra)
    return comp


def write_outputs(
    runs: Sequence[RunResult],
    out_dir: str | os.PathLike,
    wall_seconds: float | None = None,
    title: str = "GAF against averaging",
    paper: dict[str, dict[float, float]] | None = None,
    plots: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    meta = {"title": title, "wall_seconds": wall_seconds, "gaf_vs_average": gaf_vs_average(runs),
            "paired_differences": paired_differences(runs)}
    if paper:
        meta["paper"] = {k: {str(r): v for r, v in d.items()} for k, d in paper.items()}
    meta.update(extra or {})
    outputs["results"] = str(write_results(out / "results.json", runs, meta))
    pngs: list[Path] = []
    if plots:
        pngs = plot_all(runs, out, paper)
        for p in pngs:
            outputs[p.stem] = str(p)
    report = out / "report.md"
    report.write_text(markdown_report(runs, [str(p) for p in pngs], title, wall_seconds))
    outputs["report"] = str(report)
    return outputs
