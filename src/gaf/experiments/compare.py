"""Run a grid of configurations (methods × taus × noise rates × seeds) and write outputs.

Runs that share data settings and seed see identical micro-batches (the batch order does
not depend on the method), so GAF and averaging are compared step for step. With
``jobs > 1`` runs go to separate processes, each with ``cpu_count // jobs`` threads: on a
small CPU model two single-threaded runs side by side finish sooner than two two-threaded
runs one after the other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gaf.experiments.config import TrainConfig
from gaf.experiments.methods import CONTROLS, canonical_method
from gaf.experiments.prepare import PreparedData, prepare_data
from gaf.experiments.results import RunResult, setting_key
from gaf.experiments.train import default_threads, train

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


def _data_key(cfg: TrainConfig) -> tuple:
    return (cfg.dataset, cfg.data_dir, cfg.train_size, cfg.test_size, cfg.noise,
            cfg.noise_rate, cfg.human_labels, cfg.noise_sources, cfg.bad_sources,
            cfg.source_noise_rate, cfg.other_source_noise_rate, cfg.seed, cfg.device)


def _worker(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    cfg = TrainConfig.from_dict(cfg_dict)
    # Bars from several processes would overwrite each other: print epoch lines instead.
    return train(cfg, progress_bar=False).to_dict()


@dataclass
class Comparison:
    runs: list[RunResult]
    wall_seconds: float
    outputs: dict[str, str] = field(default_factory=dict)


def run_grid(configs: Sequence[TrainConfig], jobs: int = 1) -> list[RunResult]:
    """Run every config, in order of the list; matched controls run after the GAF runs
    they match (their rates come from those runs)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    first = [c for c in configs if not _pending_match(c)]
    done = dict(zip(map(id, first), _run_all(first, jobs), strict=True))
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
    for (c, _), r in zip(later, _run_all([m for _, m in later], jobs), strict=True):
        done[id(c)] = r
    return [done[id(c)] for c in configs]


def _run_all(configs: Sequence[TrainConfig], jobs: int) -> list[RunResult]:
    if not configs:
        return []
    if jobs == 1 or len(configs) == 1:
        results: list[RunResult] = []
        cache: dict[tuple, PreparedData] = {}
        for cfg in configs:
            key = _data_key(cfg)
            if key not in cache:
                cache.clear()  # keep one prepared dataset in memory at a time
                cache[key] = prepare_data(cfg)
            res = train(cfg, cache[key])
            res.model = None  # a grid keeps numbers, not weights
            results.append(res)
        return results
    import multiprocessing as mp

    # Fail (or download) here, once, rather than in every worker.
    for key in {_data_key(c): c for c in configs}.values():
        prepare_data(key)
    threads = default_threads(jobs)
    dicts = []
    for cfg in configs:
        c = cfg.replace(threads=cfg.threads or threads)
        dicts.append(c.to_dict())
    # spawn: a fresh interpreter per worker; fork after torch has started threads can hang.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        return [RunResult.from_dict(d) for d in ex.map(_worker, dicts)]


def run_comparison(
    configs: Sequence[TrainConfig],
    out_dir: str | os.PathLike | None,
    jobs: int = 1,
    title: str = "GAF against averaging",
    paper: dict[str, dict[float, float]] | None = None,
    plots: bool = True,
    extra: dict[str, Any] | None = None,
) -> Comparison:
    t0 = time.perf_counter()
    runs = run_grid(configs, jobs)
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
    from gaf.experiments.paired import paired_differences
    from gaf.experiments.report import gaf_vs_average, markdown_report, write_results

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
        from gaf.experiments.plots import plot_all

        pngs = plot_all(runs, out, paper)
        for p in pngs:
            outputs[p.stem] = str(p)
    report = out / "report.md"
    report.write_text(markdown_report(runs, [str(p) for p in pngs], title, wall_seconds))
    outputs["report"] = str(report)
    return outputs
