"""Noise per source: the split, the noise in each source, and micro-batches of one source."""

from __future__ import annotations

import json

import pytest
import torch

from gaflab.batches import batch_sources, epoch_batches
from gaflab.cli import main
from gaflab.config import TrainConfig
from gaflab.noise import ASYMMETRIC_MAPS
from gaflab.prepare import prepare_data
from gaflab.source_noise import resolve_source_rates, source_noise, split_sources
from gaflab.train import train


def _labels(n: int, k: int = 10) -> torch.Tensor:
    return torch.arange(n) % k


def test_bad_sources_carry_all_the_noise_and_the_mask_matches_the_labels():
    res = source_noise(_labels(1000), 10, "symmetric", num_sources=10, bad_sources=0.4,
                       bad_rate=1.0, seed=3)
    y = res.noisy
    assert torch.equal(y.is_noisy, y.labels != y.clean)
    assert y.num_noisy == 400 and y.noise_fraction == 0.4  # exact: S divides N, rates 0 and 1
    assert int(res.bad.sum()) == 4 and res.source.bincount().tolist() == [100] * 10
    for s in range(10):
        in_s = res.source == s
        assert bool(y.is_noisy[in_s].all()) == bool(res.bad[s])
        assert bool(y.is_noisy[in_s].any()) == bool(res.bad[s])


def test_overall_rate_within_rounding_for_unequal_sources_and_two_rates():
    n, s = 1003, 10
    res = source_noise(_labels(n), 10, "symmetric", num_sources=s, bad_sources=0.3,
                       bad_rate=0.7, other_rate=0.1, seed=0)
    asked = 0.3 * 0.7 + 0.7 * 0.1
    assert res.noisy.rate == pytest.approx(asked)
    assert abs(res.noisy.noise_fraction - asked) < 1.5 * s / n
    for k in range(s):
        in_k = res.source == k
        m = int(in_k.sum())
        rate = 0.7 if res.bad[k] else 0.1
        assert int(res.noisy.is_noisy[in_k].sum()) == round(rate * m)  # each source exact


def test_asymmetric_noise_per_source_flips_only_mapped_classes_in_bad_sources():
    flip = ASYMMETRIC_MAPS["fashion-mnist"]
    res = source_noise(_labels(2000), 10, "asymmetric", num_sources=8, bad_sources=0.5,
                       bad_rate=1.0, seed=1, flip_map=flip)
    y = res.noisy
    assert torch.equal(y.is_noisy, y.labels != y.clean)
    noisy_idx = torch.nonzero(y.is_noisy).reshape(-1)
    assert all(flip[int(c)] == int(o)
               for c, o in zip(y.clean[noisy_idx], y.labels[noisy_idx], strict=True))
    assert bool(res.bad[res.source[noisy_idx]].all())  # noise only inside bad sources
    mapped = torch.tensor([int(c) in flip for c in y.clean])
    in_bad = res.bad[res.source]
    assert torch.equal(y.is_noisy, mapped & in_bad)  # rate 1: every mapped label in a bad source


def test_same_seed_same_sources_labels_and_batches():
    a = source_noise(_labels(500), 10, "symmetric", 5, 0.4, 1.0, seed=7)
    b = source_noise(_labels(500), 10, "symmetric", 5, 0.4, 1.0, seed=7)
    c = source_noise(_labels(500), 10, "symmetric", 5, 0.4, 1.0, seed=8)
    assert torch.equal(a.source, b.source) and torch.equal(a.bad, b.bad)
    assert torch.equal(a.noisy.labels, b.noisy.labels)
    assert not torch.equal(a.source, c.source)

    def order(seed):
        return epoch_batches(a.noisy.labels, 10, 8, 4, False,
                             torch.Generator().manual_seed(seed), a.source)

    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))


def test_a_micro_batch_never_mixes_sources():
    sources = split_sources(1000, 7, torch.Generator().manual_seed(0))
    b = epoch_batches(_labels(1000), 10, 16, 4, False, torch.Generator().manual_seed(1),
                      sources)
    # 7 sources of 142-143 samples: 8 micro-batches of 16 each, 56 in all, 14 steps of 4
    assert b.shape == (14, 4, 16)
    assert b.unique().numel() == b.numel()
    per_micro = sources[b]  # [steps, M, b]
    assert bool((per_micro == per_micro[..., :1]).all())
    # the micro-batches of a step come from different sources too, at times
    assert any(per_micro[s, :, 0].unique().numel() > 1 for s in range(b.shape[0]))


def test_per_source_batches_reject_bad_input():
    labels = _labels(100)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="99 source ids for 100 samples"):
        epoch_batches(labels, 10, 5, 2, False, g, torch.zeros(99, dtype=torch.int64))
    with pytest.raises(ValueError, match="integers"):
        epoch_batches(labels, 10, 5, 2, False, g, torch.zeros(100))
    with pytest.raises(ValueError, match="both class-balanced and one source"):
        epoch_batches(labels, 10, 10, 2, True, g, torch.zeros(100, dtype=torch.int64))
    with pytest.raises(ValueError, match="fill one step of 2 micro-batches"):
        epoch_batches(labels, 10, 60, 2, False, g, torch.arange(100) % 2)
    with pytest.raises(ValueError, match="noise_sources 200 exceeds the 100"):
        split_sources(100, 200, g)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(noise_sources=1, bad_sources=1.0), "noise_sources must be an integer >= 2"),
        (dict(noise_sources=10, bad_sources=0.25), "2.5 sources; choose a multiple of 1/10"),
        (dict(noise_sources=10), "noise_sources needs bad_sources"),
        (dict(noise_sources=10, bad_sources=0.0), r"bad_sources must be a fraction in \(0, 1\]"),
        (dict(bad_sources=0.4), "bad_sources needs noise_sources"),
        (dict(source_noise_rate=0.5), "source_noise_rate needs noise_sources"),
        (dict(other_source_noise_rate=0.1), "other_source_noise_rate needs noise_sources"),
        (dict(noise_sources=10, bad_sources=0.4, noise="none"),
         "noise_sources needs noise symmetric or asymmetric"),
        (dict(noise_sources=10, bad_sources=0.2, noise_rate=0.4),
         "needs a rate of 2 inside the bad sources"),
        (dict(noise_sources=10, bad_sources=0.4, source_noise_rate=1.5),
         "source_noise_rate: noise rate must be in"),
        (dict(noise_sources=10, bad_sources=0.4, class_balanced=True, micro_batch_size=10),
         "class_balanced and noise_sources"),
    ],
)
def test_bad_source_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).validate()


def test_rates_resolve_from_the_overall_rate_or_the_bad_rate():
    assert resolve_source_rates(0.4, 0.4, None, 0.0) == (1.0, 0.4)
    assert resolve_source_rates(0.4, 0.5, None, 0.0) == (0.8, 0.4)
    bad, overall = resolve_source_rates(0.9, 0.4, 0.5, 0.1)  # noise_rate is then implied
    assert bad == 0.5 and overall == pytest.approx(0.4 * 0.5 + 0.6 * 0.1)
    cfg = TrainConfig(noise_sources=10, bad_sources=0.4, source_noise_rate=0.5).validate()
    assert cfg.noise_rate == pytest.approx(0.2) and cfg.bad_source_noise_rate == 0.5
    cfg = TrainConfig(noise_sources=10, bad_sources=0.4).validate()
    assert cfg.noise_rate == 0.4 and cfg.bad_source_noise_rate == 1.0


def _tiny(fmnist_dir, **kw) -> TrainConfig:
    base = dict(data_dir=str(fmnist_dir), train_size=None, epochs=1, micro_batch_size=8,
                num_micro_batches=4, progress=False, threads=1, noise_sources=8,
                bad_sources=0.25, noise_rate=0.25)
    base.update(kw)
    return TrainConfig(**base)


def test_prepared_data_keeps_sources_and_the_noise_mask(fmnist_dir):
    cfg = _tiny(fmnist_dir)
    data = prepare_data(cfg)
    assert data.train_source.dtype == torch.int64 and data.train_source.shape == (320,)
    assert torch.equal(data.is_noisy, data.train_y != data.clean_y)
    assert data.noise_fraction == 0.25  # 2 of 8 sources of 40 samples, all wrong
    noisy_sources = data.train_source[data.is_noisy].unique()
    assert noisy_sources.numel() == 2
    assert torch.equal(batch_sources(cfg, data), data.train_source)
    assert batch_sources(cfg.replace(source_batches=False), data) is None
    assert prepare_data(cfg.replace(noise_sources=None, bad_sources=None)).train_source is None
    data.train_source = None
    with pytest.raises(ValueError, match="carries no source ids"):
        batch_sources(cfg, data)


def test_training_with_noise_per_source_runs(fmnist_dir):
    res = train(_tiny(fmnist_dir, method="gaf", max_steps=3))
    assert res.steps == 3 and res.noise_fraction == 0.25 and len(res.history) == 1


def test_cli_train_with_noise_sources(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--data-dir", str(fmnist_dir), "--train-size", "all", "--epochs", "1",
                 "--micro-batch-size", "8", "--num-micro-batches", "2", "--max-steps", "2",
                 "--noise-sources", "10", "--bad-sources", "0.4", "--threads", "1",
                 "--quiet", "--out", str(out)])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    run = doc["runs"][0] if "runs" in doc else doc
    assert run["config"]["noise_sources"] == 10 and run["config"]["bad_sources"] == 0.4
    assert run["noise_fraction"] == 0.4
    capsys.readouterr()
    err = _cli_error(capsys, ["train", "--noise-sources", "10", "--bad-sources", "0.25"])
    assert "2.5 sources" in err


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_report_keeps_noise_per_source_apart_from_noise_over_samples():
    from gaflab.report import summary_rows
    from gaflab.results import RunResult

    row = {"test_acc": 0.5, "memorised": 0.1, "train_acc_clean": 0.6}
    spread = TrainConfig(method="average").validate()
    per_source = spread.replace(noise_sources=10, bad_sources=0.4).validate()
    mixed = per_source.replace(source_batches=False)
    runs = [RunResult(config=c.to_dict(), label=c.label, history=[row])
            for c in (spread, per_source, mixed)]
    noise = [r[1] for r in summary_rows(runs)]
    assert noise == ["symmetric 40%", "symmetric 40% in 4/10 sources",
                     "symmetric 40% in 4/10 sources, mixed micro-batches"]
