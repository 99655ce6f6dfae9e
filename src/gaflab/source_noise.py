"""Label noise that comes per source: a bad shard, annotator or worker.

The training set is split into ``S`` sources at random (sizes differ by at most one
sample). A fraction ``F`` of them, chosen at random, are *bad*: inside each, the noise of
the chosen kind (:func:`~gaflab.noise.symmetric_noise` or
:func:`~gaflab.noise.asymmetric_noise`) is drawn at ``bad_rate``; in the other
sources at ``other_rate`` (0 by default: clean). Every sample keeps its source id and its
noise mask, so training can draw each micro-batch from one source and selection precision
and memorisation are measured as for noise spread over samples.

Rates. The overall rate is ``F * bad_rate + (1 - F) * other_rate`` (for asymmetric noise,
like ``noise_rate``, it is the rate inside the flipped classes). :func:`resolve_source_rates`
derives ``bad_rate`` from a wanted overall rate when it is not given, so that
``S = 10, F = 0.4`` at the overall 40% makes four sources entirely wrong and six clean.
The realised fraction is within rounding of the asked one: each source flips
``round(rate * n_s)`` of its own samples (per class for asymmetric noise), so it is exact
when sources are equal in size (S divides N) and each ``rate * n_s`` is whole (e.g. rates
0 and 1); otherwise, for symmetric noise, less than ``1.5 S / N`` away (half a sample of
rounding per source, and less than one sample per source from the unequal sizes).

``F * S`` must be a whole number of sources: fractions that are not are refused rather
than rounded, so the asked rate is the rate trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gaflab.noise import NoisyLabels, asymmetric_noise, check_rate, symmetric_noise

SOURCE_NOISE_KINDS: tuple[str, ...] = ("symmetric", "asymmetric")


@dataclass(frozen=True)
class SourceNoise:
    noisy: NoisyLabels  # labels, clean labels, per-sample mask, over all N samples
    source: Tensor  # int64 [N], the source of each sample, 0..S-1
    bad: Tensor  # bool [S], which sources carry the noise at the bad rate


def check_source_split(num_sources: object, bad_sources: object) -> int:
    """The number of bad sources, ``F * S``; ValueError naming the setting otherwise."""
    if isinstance(num_sources, bool) or not isinstance(num_sources, int) or num_sources < 2:
        raise ValueError(f"noise_sources must be an integer >= 2, got {num_sources!r}")
    try:
        f = float(bad_sources)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"bad_sources must be the fraction of sources that carry the noise, in (0, 1], "
            f"got {bad_sources!r}"
        ) from None
    if not (math.isfinite(f) and 0.0 < f <= 1.0):
        raise ValueError(f"bad_sources must be a fraction in (0, 1], got {bad_sources!r}")
    count = f * num_sources
    if abs(count - round(count)) > 1e-9:
        raise ValueError(
            f"bad_sources {f:g} of {num_sources} sources is {count:g} sources; choose a "
            f"multiple of 1/{num_sources}"
        )
    return int(round(count))


def resolve_source_rates(noise_rate: float, bad_sources: float, source_noise_rate: float | None,
                         other_source_noise_rate: float) -> tuple[float, float]:
    """``(bad_rate, overall_rate)``: the rate inside bad sources and the overall rate.

    ``source_noise_rate`` given: it is the bad rate and the overall rate follows. Not given
    (None): the bad rate is the one that makes the overall rate ``noise_rate``.
    """
    f = float(bad_sources)
    other = _named_rate("other_source_noise_rate", other_source_noise_rate)
    if source_noise_rate is not None:
        bad = _named_rate("source_noise_rate", source_noise_rate)
        return bad, f * bad + (1.0 - f) * other
    overall = _named_rate("noise_rate", noise_rate)
    bad = (overall - (1.0 - f) * other) / f
    if not -1e-12 <= bad <= 1.0 + 1e-12:
        raise ValueError(
            f"noise_rate {overall:g} with bad_sources {f:g} and other_source_noise_rate "
            f"{other:g} needs a rate of {bad:g} inside the bad sources; it must be in [0, 1] "
            f"(the overall rate lies between {(1 - f) * other:g} and {f + (1 - f) * other:g})"
        )
    return min(max(bad, 0.0), 1.0), overall


def _named_rate(name: str, value: object) -> float:
    try:
        return check_rate(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def split_sources(n: int, num_sources: int, generator: torch.Generator) -> Tensor:
    """A random source id in ``0..num_sources-1`` per sample, sizes differing by at most 1."""
    if num_sources > n:
        raise ValueError(f"noise_sources {num_sources} exceeds the {n} training samples")
    source = torch.empty(n, dtype=torch.int64)
    source[torch.randperm(n, generator=generator)] = torch.arange(n) % num_sources
    return source


def source_noise(
    labels: Tensor,
    num_classes: int,
    kind: str,
    num_sources: int,
    bad_sources: float,
    bad_rate: float,
    other_rate: float = 0.0,
    seed: int = 0,
    flip_map: dict[int, int] | None = None,
) -> SourceNoise:
    """Split ``labels`` into sources and draw noise of ``kind`` in each at its rate.

    The same (labels, settings, seed) always give the same sources, bad sources and labels.
    """
    if kind not in SOURCE_NOISE_KINDS:
        raise ValueError(
            f"noise per source needs noise {' or '.join(SOURCE_NOISE_KINDS)}, got {kind!r}"
        )
    if kind == "asymmetric" and flip_map is None:
        raise ValueError("asymmetric noise per source needs the dataset's flip map")
    num_bad = check_source_split(num_sources, bad_sources)
    bad_rate = _named_rate("source_noise_rate", bad_rate)
    other_rate = _named_rate("other_source_noise_rate", other_rate)
    clean = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    g = torch.Generator().manual_seed(int(seed))
    source = split_sources(clean.numel(), num_sources, g)
    bad = torch.zeros(num_sources, dtype=torch.bool)
    bad[torch.randperm(num_sources, generator=g)[:num_bad]] = True
    noisy = clean.clone()
    for s in range(num_sources):
        rate = bad_rate if bad[s] else other_rate
        if rate == 0.0:
            continue
        members = torch.nonzero(source == s).reshape(-1)
        # Each source has its own noise stream, independent of the others' sizes.
        s_seed = (int(seed) * 1_000_003 + 7919 * (s + 1)) % (2**63 - 1)
        if kind == "symmetric":
            part = symmetric_noise(clean[members], rate, num_classes, seed=s_seed)
        else:
            part = asymmetric_noise(clean[members], rate, num_classes, flip_map, seed=s_seed)
        noisy[members] = part.labels
    overall = (num_bad * bad_rate + (num_sources - num_bad) * other_rate) / num_sources
    labels_out = NoisyLabels(noisy, clean.clone(), noisy != clean, kind, overall)
    return SourceNoise(labels_out, source, bad)
