"""The methods beside GAF: losses, small-loss selection, selection precision, collapse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from gaflab.config import TrainConfig
from gaflab.methods import (
    SmallLossLoss,
    canonical_method,
    forget_rate_at,
    generalized_cross_entropy,
)
from gaflab.prepare import PreparedData
from gaflab.selection import (
    EpochLog,
    chance_std,
    micro_batch_precision,
    sample_precision,
    spearman,
)
from gaflab.train import train


def synthetic_data(n: int = 256, noise: float = 0.3, side: int = 8, seed: int = 5):
    """A learnable 10-class task (a bright patch per class) with symmetric label noise."""
    gen = torch.Generator().manual_seed(seed)
    k = 10
    clean = torch.randint(0, k, (n,), generator=gen)
    x = torch.randn(n, 1, side, side, generator=gen) * 0.3
    for c in range(k):
        r, q = divmod(c, 4)
        x[clean == c, 0, 2 * r : 2 * r + 2, 2 * q : 2 * q + 2] += 2.0
    flip = torch.rand(n, generator=gen) < noise
    y = torch.where(flip, (clean + 1 + torch.randint(0, k - 1, (n,), generator=gen)) % k, clean)
    return PreparedData(train_x=x, train_y=y, clean_y=clean, is_noisy=y != clean,
                        test_x=x[:64], test_y=clean[:64], num_classes=k, in_channels=1,
                        image_size=side, noise_fraction=float((y != clean).float().mean()),
                        source="synthetic")


def config(**kw) -> TrainConfig:
    base = dict(epochs=1, train_size=None, micro_batch_size=8, num_micro_batches=2, lr=0.05,
                progress=False, threads=1, download=False, width=4, seed=1)
    base.update(kw)
    return TrainConfig(**base)


# -- losses ---------------------------------------------------------------------------


def test_gce_matches_hand_computed_values_and_tends_to_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    y = torch.tensor([0, 2])
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = math.exp(-1) / (1 + math.e + math.exp(-1))
    want = ((1 - p0**0.7) / 0.7 + (1 - p1**0.7) / 0.7) / 2
    assert float(generalized_cross_entropy(logits, y, 0.7)) == pytest.approx(want, rel=1e-6)
    mae = ((1 - p0) + (1 - p1)) / 2  # q = 1: mean absolute error on the label's probability
    assert float(generalized_cross_entropy(logits, y, 1.0)) == pytest.approx(mae, rel=1e-6)
    ce = float(F.cross_entropy(logits, y))
    assert float(generalized_cross_entropy(logits, y, 0.0)) == pytest.approx(ce, rel=1e-7)
    assert float(generalized_cross_entropy(logits, y, 1e-5)) == pytest.approx(ce, rel=1e-4)
    with pytest.raises(ValueError, match="q must lie in"):
        generalized_cross_entropy(logits, y, 1.5)


def test_small_loss_keeps_the_smallest_losses_of_a_hand_made_batch():
    # Confident-correct rows (small loss) and confident-wrong rows (large loss).
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [4.0, 0.0], [0.0, 1.0],
                           [5.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    y = torch.tensor([0, 1, 1, 1, 1, 0, 0, 1])
    per = F.cross_entropy(logits, y, reduction="none")
    loss = SmallLossLoss(rate=0.25)  # keep int(0.75 * 8) = 6
    value = loss(logits, y)
    kept = loss.kept[-1]
    expect = torch.zeros(8, dtype=torch.bool)
    expect[torch.argsort(per)[:6]] = True
    assert torch.equal(kept, expect)
    assert not kept[2] and not kept[4]  # the two confidently wrong rows are dropped
    assert float(value) == pytest.approx(float(per[expect].mean()), rel=1e-6)
    loss.rate = 0.99
    loss(logits, y)
    assert int(loss.kept[-1].sum()) == 1  # at least one sample is kept


def test_small_loss_schedule_follows_co_teaching():
    assert [forget_rate_at(e, 0.4, 10) for e in (0, 5, 10, 15)] == pytest.approx(
        [0.0, 0.2, 0.4, 0.4])
    assert forget_rate_at(3, 0.4, 0) == 0.4
    data = synthetic_data(n=128)
    res = train(config(method="small-loss", epochs=3, forget_epochs=2, forget_rate=0.5), data)
    assert [h["forget_rate"] for h in res.history] == pytest.approx([0.0, 0.25, 0.5])
    # the known noise rate when no forget rate is given
    res = train(config(method="small-loss", epochs=1, forget_epochs=0), data)
    assert res.history[0]["forget_rate"] == pytest.approx(data.noise_fraction)


def test_method_names_and_errors():
    assert canonical_method("Averaging") == "average"
    assert canonical_method("small_loss") == "small-loss"
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        canonical_method("sgd")
    with pytest.raises(ValueError, match="early-stop needs a held-out split"):
        TrainConfig(method="early-stop").validate()
    with pytest.raises(ValueError, match="control rate must be a probability"):
        TrainConfig(method="random-skip", control_rate=1.5).validate()
    with pytest.raises(ValueError, match="gce_q"):
        TrainConfig(method="gce", gce_q=-0.1).validate()


# -- selection precision ----------------------------------------------------------------


def test_oracle_selector_reads_zero_and_random_reads_the_base_rate():
    rng = np.random.default_rng(0)
    steps, m, b = 400, 4, 8
    noisy = rng.random((steps, m, b)) < 0.4
    counts = noisy.sum(-1).astype(float)
    skipped = np.zeros(steps, dtype=bool)
    # Micro-batch oracle: keeps exactly the micro-batches without a noisy sample.
    clean_mb = counts == 0
    p = micro_batch_precision(counts, b, clean_mb, skipped)
    assert p["kept_noise_fraction"] == 0.0
    assert p["dropped_noise_fraction"] > 0.4
    # Sample oracle: keeps exactly the clean samples.
    s = sample_precision(kept_noisy=0.0, kept=int((~noisy).sum()),
                         total_noisy=float(noisy.sum()), total=noisy.size)
    assert s["kept_noise_fraction"] == 0.0 and s["dropped_noise_fraction"] == 1.0
    # A random choice of half the micro-batches reads the base rate within its spread,
    # and the spread is the one random choices show.
    base = counts.sum() / noisy.size
    reads = []
    for _ in range(300):
        used = np.zeros(steps * m, dtype=bool)
        used[rng.choice(steps * m, steps * m // 2, replace=False)] = True
        reads.append(micro_batch_precision(counts, b, used.reshape(steps, m), skipped))
    kept = np.array([r["kept_noise_fraction"] for r in reads])
    spread = reads[0]["kept_noise_chance_std"]
    assert abs(kept[0] - base) < 3 * spread
    assert kept.std() == pytest.approx(spread, rel=0.15)
    assert np.mean(np.abs(kept - base) < 2 * spread) > 0.9


def test_chance_std_and_spearman():
    values = np.array([0.0, 1.0, 0.0, 1.0])
    # choosing all units leaves no spread; one unit out of four: sqrt(.25 * 3/3)
    assert chance_std(values, 4) == 0.0
    assert chance_std(values, 1) == pytest.approx(0.5)
    assert math.isnan(chance_std(values, 0))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share ranks
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_epoch_log_reads_decisions_against_the_noise_mask():
    log = EpochLog(2, torch.zeros(()))
    # step 0 taken with both rows, step 1 skipped (only the anchor accepted)
    log.record(torch.tensor(1.0), False, np.array([True, True]), np.array([0.0, 0.5]), 0)
    log.record(torch.tensor(1.0), True, np.array([True, False]), np.array([0.0, 1.2]), 0)
    noisy = torch.tensor([[[0, 0], [0, 1]], [[1, 1], [1, 0]]], dtype=torch.bool)
    p = log.precision(noisy, selects_steps=True)
    assert p["kept_noise_fraction"] == pytest.approx(1 / 4)
    assert p["dropped_noise_fraction"] == pytest.approx(3 / 4)
    assert p["taken_noise_fraction"] == pytest.approx(1 / 4)
    assert p["skipped_noise_fraction"] == pytest.approx(3 / 4)
    assert log.update_fractions() == {"update_fraction": 0.5, "non_anchor_drop_rate": 0.5}
    # averaging keeps everything: no precision, NaN rather than 0
    assert all(math.isnan(v) for k, v in log.precision(noisy, selects_steps=False).items()
               if k != "distance_noise_spearman")


def test_runs_record_precision_fields_per_epoch():
    data = synthetic_data(n=256)
    gaf = train(config(method="gaf", tau=0.97, epochs=2), data)
    avg = train(config(method="average", epochs=2), data)
    small = train(config(method="small-loss", epochs=2, forget_epochs=0, forget_rate=0.3), data)
    for h in gaf.history:
        assert 0.0 <= h["kept_noise_fraction"] <= 1.0
        assert h["kept_noise_chance_std"] > 0.0
    for h in avg.history:
        assert math.isnan(h["kept_noise_fraction"]) and math.isnan(h["dropped_noise_fraction"])
    for h in small.history:
        # small-loss keeps the samples the model fits: less noisy than those it drops
        assert h["kept_noise_fraction"] < h["dropped_noise_fraction"]
    assert small.summary()["kept_noise_fraction"] < data.noise_fraction


# -- collapse ---------------------------------------------------------------------------


def test_collapse_warning_fires_on_a_collapsed_run_and_not_on_a_healthy_one(capsys):
    data = synthetic_data(n=256, noise=0.2)
    healthy = train(config(method="gaf", tau=0.97, epochs=3, lr=0.05), data)
    assert healthy.warnings == []
    # tau = 0 skips every step: nothing is trained on, and the filter says so.
    frozen = train(config(method="gaf", tau=0.0, epochs=1), data)
    kinds = {w["kind"] for w in frozen.warnings}
    assert "low-acceptance" in kinds
    # a learning rate that blows the weights up: predictions at chance, announced once
    blown = train(config(method="average", lr=1e4, epochs=4, momentum=0.0), data)
    chance = [w for w in blown.warnings if w["kind"] == "chance-accuracy"]
    assert len(chance) == 1 and chance[0]["epoch"] == 2 and chance[0]["since"] == 1
    assert "at chance" in chance[0]["message"]
    printed = capsys.readouterr().out
    assert "warning: epoch 2:" in printed
    assert blown.to_dict()["warnings"] == blown.warnings


# -- early stopping ---------------------------------------------------------------------


def test_early_stop_keeps_the_best_heldout_epoch():
    data = synthetic_data(n=256)
    res = train(config(method="early-stop", holdout_fraction=0.25, epochs=3), data)
    accs = [h["heldout_acc"] for h in res.history]
    assert res.stopped_epoch == 1 + int(np.argmax(accs))
    assert res.final == res.history[res.stopped_epoch - 1]
    # trained on the other 75%: fewer steps per epoch than without the split
    assert res.steps == 3 * (192 // 16)
    # patience 1 stops one epoch after the last improvement
    short = train(config(method="early-stop", holdout_fraction=0.25, epochs=6, patience=1,
                         lr=1e-4), data)
    assert len(short.history) <= 6 and short.stopped_epoch is not None


def test_collapse_is_announced_once_per_streak():
    from gaflab.collapse import collapse_warnings

    cfg = TrainConfig(method="gaf").validate()
    accs = [0.5, 0.1, 0.1, 0.6, 0.105, 0.1]  # at chance in epochs 2-3 and 5-6
    used = [0.9, 0.9, 0.1, 0.1, 0.9, 0.2]  # starved in epochs 3-4 and 6
    history, fired = [], []
    for e, (a, u) in enumerate(zip(accs, used, strict=True), start=1):
        history.append({"epoch": e, "train_acc_observed": a, "update_fraction": u})
        fired += [(w["epoch"], w["kind"]) for w in collapse_warnings(cfg, history, 10)]
    assert fired == [(2, "chance-accuracy"), (3, "low-acceptance"), (5, "chance-accuracy"),
                     (6, "low-acceptance")]
    # averaging has no acceptance to starve
    avg = TrainConfig(method="average").validate()
    assert collapse_warnings(avg, [{"epoch": 1, "update_fraction": 0.0}], 10) == []


# -- blind controls ---------------------------------------------------------------------


def _same_bits(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(),
                                                 strict=True))


def test_control_path_gives_gafs_bits_at_tau_two_and_tau_zero():
    data = synthetic_data(n=128)
    gaf2 = train(config(method="gaf", tau=2.0), data)
    for method in ("random-skip", "random-drop"):
        keep_all = train(config(method=method, control_rate=0.0), data)
        assert keep_all.skipped_steps == 0 and _same_bits(keep_all, gaf2), method
    gaf0 = train(config(method="gaf", tau=0.0), data)
    assert gaf0.skip_rate == 1.0
    for method in ("random-skip", "random-drop"):
        drop_all = train(config(method=method, control_rate=1.0), data)
        assert drop_all.skip_rate == 1.0 and _same_bits(drop_all, gaf0), method
    # the control decides blind, but the distances it reports are GAF's at tau 2
    assert keep_all.distance_trace == pytest.approx(gaf2.distance_trace, abs=1e-12)


def test_matched_controls_take_gafs_skip_rate():
    from gaflab.compare import match_control

    data = synthetic_data(n=1200, noise=0.4)
    cfg = config(method="gaf", tau=0.97, epochs=2, micro_batch_size=1, lr=0.01,
                 record_distances=False)
    gaf = train(cfg, data)
    assert 0.05 < gaf.skip_rate < 0.95
    for per_epoch in (False, True):
        ctl_cfg = match_control(cfg.replace(method="random-skip", matched_to=gaf.label,
                                            match_per_epoch=per_epoch), gaf)
        ctl = train(ctl_cfg, data)
        assert abs(ctl.skip_rate - gaf.skip_rate) < 0.02, per_epoch
        if per_epoch:
            for h, g in zip(ctl.history, gaf.history, strict=True):
                assert abs(h["skip_rate"] - g["skip_rate"]) < 0.03
        # blind: what it keeps is as noisy as the rest, within the chance spread
        h = ctl.history[-1]
        assert abs(h["kept_noise_fraction"] - h["dropped_noise_fraction"]) < 4 * (
            h["kept_noise_chance_std"] + h["dropped_noise_chance_std"])
