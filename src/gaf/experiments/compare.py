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
from gaf.experiments.prepare import PreparedData, prepare_data
from gaf.experiments.results import RunResult
from gaf.experiments.train import default_threads, train


def expand_grid(
    base: TrainConfig,
    methods: Sequence[str] = ("average", "gaf"),
    taus: Sequence[float] = (0.97,),
    noise_rates: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[TrainConfig]:
    """One config per (noise rate, seed, method[, tau]); ``average`` ignores tau."""
    if not methods:
        raise ValueError("no methods to compare")
    rates = list(noise_rates) if noise_rates else [base.noise_rate]
    seed_list = list(seeds) if seeds is not None and len(seeds) else [base.seed]
    out = []
    for rate in rates:
        for seed in seed_list:
            for method in methods:
                for tau in (taus if method == "gaf" else (base.tau,)):
                    cfg = base.replace(method=method, tau=float(tau), noise_rate=float(rate),
                                       seed=int(seed))
                    out.append(cfg.validate())
    labels = [(c.label, c.noise_rate, c.seed) for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError("the grid repeats a run (same method, tau, noise and seed)")
    return out


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
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
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
    from gaf.experiments.report import gaf_vs_average, markdown_report, write_results

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    meta = {"title": title, "wall_seconds": wall_seconds, "gaf_vs_average": gaf_vs_average(runs)}
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
