from __future__ import annotations

import math

import pytest
import torch

from gaflab.noise import (
    ASYMMETRIC_MAPS,
    asymmetric_noise,
    check_rate,
    cifar100_superclass_map,
    human_noise,
    symmetric_noise,
)


def balanced(n: int, k: int) -> torch.Tensor:
    return torch.arange(n) % k


def test_symmetric_exact_rate_and_always_a_different_class():
    y = balanced(10_000, 10)
    nl = symmetric_noise(y, 0.4, 10, seed=3)
    assert nl.num_noisy == 4000 and nl.noise_fraction == pytest.approx(0.4)
    assert torch.equal(nl.clean, y)
    assert torch.equal(nl.is_noisy, nl.labels != y)
    assert int(nl.labels.min()) >= 0 and int(nl.labels.max()) <= 9


def test_symmetric_wrong_labels_spread_over_the_other_classes():
    y = torch.zeros(9000, dtype=torch.long)
    nl = symmetric_noise(y, 1.0, 10, seed=0)
    counts = torch.bincount(nl.labels, minlength=10)
    assert counts[0] == 0
    # 9000 flips over 9 classes: 1000 each, binomial std ~ 30
    assert (counts[1:] - 1000).abs().max() < 150


def test_symmetric_is_seeded():
    y = balanced(1000, 10)
    a, b = symmetric_noise(y, 0.3, 10, seed=1), symmetric_noise(y, 0.3, 10, seed=1)
    c = symmetric_noise(y, 0.3, 10, seed=2)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_rate_zero_and_one():
    y = balanced(100, 10)
    assert symmetric_noise(y, 0.0, 10).num_noisy == 0
    assert symmetric_noise(y, 1.0, 10).num_noisy == 100


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf, "x", None])
def test_bad_rates_are_value_errors(bad):
    with pytest.raises(ValueError, match="noise rate"):
        check_rate(bad)
    with pytest.raises(ValueError):
        symmetric_noise(balanced(10, 10), bad, 10)


def test_labels_outside_the_classes_are_rejected():
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        symmetric_noise(torch.tensor([0, 10]), 0.5, 10)


def test_asymmetric_flips_only_mapped_classes_to_their_targets():
    y = balanced(10_000, 10)
    flip = ASYMMETRIC_MAPS["cifar10"]
    nl = asymmetric_noise(y, 0.4, 10, flip, seed=0)
    for c in range(10):
        members = y == c
        changed = nl.is_noisy & members
        if c in flip:
            assert int(changed.sum()) == 400  # exactly round(0.4 * 1000)
            assert set(nl.labels[changed].tolist()) == {flip[c]}
        else:
            assert int(changed.sum()) == 0
    assert nl.noise_fraction == pytest.approx(0.4 * len(flip) / 10)


def test_asymmetric_maps_are_valid_for_their_datasets():
    for name, flip in ASYMMETRIC_MAPS.items():
        assert all(0 <= s < 10 and 0 <= t < 10 and s != t for s, t in flip.items()), name
    assert ASYMMETRIC_MAPS["fashion-mnist"][0] == 6  # T-shirt/top -> Shirt
    with pytest.raises(ValueError, match="bad asymmetric flip"):
        asymmetric_noise(balanced(10, 10), 0.5, 10, {3: 3})


def test_cifar100_superclass_map_cycles_within_each_superclass():
    fine = torch.arange(100)
    coarse = torch.tensor([(7 * f) % 20 for f in range(100)])  # scrambled groups of 5
    m = cifar100_superclass_map(fine, coarse)
    assert len(m) == 100
    for f, g in m.items():
        assert coarse[f] == coarse[g] and f != g
    # following the map from any class visits its whole superclass and returns
    start, seen = 0, [0]
    while m[seen[-1]] != start:
        seen.append(m[seen[-1]])
    assert sorted(seen) == sorted(i for i in range(100) if coarse[i] == coarse[0])


def test_human_noise_mask():
    clean = torch.tensor([0, 1, 2, 3])
    noisy = torch.tensor([0, 2, 2, 0])
    nl = human_noise(noisy, clean)
    assert nl.is_noisy.tolist() == [False, True, False, True]
    assert nl.kind == "human" and nl.noise_fraction == 0.5
    with pytest.raises(ValueError, match="human labels"):
        human_noise(noisy[:3], clean)
