"""Label noise, recorded per sample so that memorisation can be measured.

Every function returns :class:`NoisyLabels`: the labels the model is trained on, the clean
labels, and the boolean mask ``is_noisy`` (observed label differs from the clean one).
Noise is drawn from a ``torch.Generator`` seeded by ``seed``: the same seed, labels and
settings always give the same noisy labels.

Kinds:

``symmetric``   exactly ``round(rate * N)`` samples, chosen uniformly at random, get a label
                drawn uniformly from the *other* ``K - 1`` classes. So ``rate`` is the exact
                fraction of wrong labels (some papers draw from all K classes, which makes
                the true fraction ``rate * (K - 1) / K``).
``asymmetric``  class-dependent flips to a similar class: in each source class c of the
                dataset's map, exactly ``round(rate * n_c)`` samples are relabelled
                ``map[c]``; other classes stay clean. Maps (:data:`ASYMMETRIC_MAPS`):

                * mnist: 2→7, 3→8, 5↔6, 7→1 (Patrini et al. 2017)
                * cifar10: truck→automobile, bird→airplane, deer→horse, cat↔dog (same source)
                * fashion-mnist: T-shirt/top↔Shirt, Pullover↔Coat, Sandal↔Sneaker
                * cifar100: each class to the next class (in label order, circularly) within
                  its superclass, from the coarse labels of the CIFAR-100 files

``human``       CIFAR-10N / CIFAR-100N labels from the ``*_human.pt`` files; ``is_noisy``
                is where they differ from the clean labels.
``none``        clean labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NOISE_KINDS: tuple[str, ...] = ("none", "symmetric", "asymmetric", "human")

ASYMMETRIC_MAPS: dict[str, dict[int, int]] = {
    "mnist": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    "fashion-mnist": {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5},
}


@dataclass(frozen=True)
class NoisyLabels:
    labels: Tensor  # int64 [N], what training sees
    clean: Tensor  # int64 [N]
    is_noisy: Tensor  # bool [N], labels != clean
    kind: str = "none"
    rate: float = 0.0  # the requested rate (0 for human noise)

    @property
    def noise_fraction(self) -> float:
        """The realised fraction of wrong labels."""
        n = self.is_noisy.numel()
        return float(self.is_noisy.sum()) / n if n else 0.0

    @property
    def num_noisy(self) -> int:
        return int(self.is_noisy.sum())


def check_rate(rate: object) -> float:
    """A noise rate must be a finite number in [0, 1]."""
    try:
        r = float(rate)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"noise rate must be a number in [0, 1], got {rate!r}") from None
    if not math.isfinite(r) or r < 0.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate!r} (negative or not finite)")
    if r > 1.0:
        raise ValueError(
            f"noise rate must be in [0, 1], got {rate!r} (a fraction: 0.4 means 40%)"
        )
    return r


def _check_labels(labels: Tensor, num_classes: int) -> Tensor:
    labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return labels


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def clean_labels(labels: Tensor) -> NoisyLabels:
    labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    return NoisyLabels(labels.clone(), labels.clone(), torch.zeros_like(labels, dtype=torch.bool))


def symmetric_noise(labels: Tensor, rate: float, num_classes: int, seed: int = 0) -> NoisyLabels:
    """Flip exactly ``round(rate * N)`` random labels to a uniformly chosen other class."""
    rate = check_rate(rate)
    clean = _check_labels(labels, num_classes)
    n = clean.numel()
    g = _generator(seed)
    k = int(round(rate * n))
    idx = torch.randperm(n, generator=g)[:k]
    offset = torch.randint(1, num_classes, (k,), generator=g)  # never 0: always a new class
    noisy = clean.clone()
    noisy[idx] = (clean[idx] + offset) % num_classes
    return NoisyLabels(noisy, clean.clone(), noisy != clean, "symmetric", rate)


def cifar100_superclass_map(fine: Tensor, coarse: Tensor) -> dict[int, int]:
    """Each fine class → the next fine class (circularly) within its superclass."""
    fine = torch.as_tensor(fine).reshape(-1)
    coarse = torch.as_tensor(coarse).reshape(-1)
    groups: dict[int, set[int]] = {}
    for f, c in zip(fine.tolist(), coarse.tolist(), strict=True):
        groups.setdefault(int(c), set()).add(int(f))
    mapping: dict[int, int] = {}
    for members in groups.values():
        ordered = sorted(members)
        if len(ordered) < 2:
            continue
        for i, f in enumerate(ordered):
            mapping[f] = ordered[(i + 1) % len(ordered)]
    return mapping


def asymmetric_noise(
    labels: Tensor,
    rate: float,
    num_classes: int,
    flip_map: dict[int, int],
    seed: int = 0,
) -> NoisyLabels:
    """In each source class c of ``flip_map`` relabel exactly ``round(rate * n_c)`` samples."""
    rate = check_rate(rate)
    clean = _check_labels(labels, num_classes)
    for src, dst in flip_map.items():
        if not (0 <= src < num_classes and 0 <= dst < num_classes) or src == dst:
            raise ValueError(f"bad asymmetric flip {src}->{dst} for {num_classes} classes")
    g = _generator(seed)
    noisy = clean.clone()
    for src in sorted(flip_map):  # fixed order: reproducible draws
        members = torch.nonzero(clean == src).reshape(-1)
        k = int(round(rate * members.numel()))
        chosen = members[torch.randperm(members.numel(), generator=g)[:k]]
        noisy[chosen] = flip_map[src]
    return NoisyLabels(noisy, clean.clone(), noisy != clean, "asymmetric", rate)


def human_noise(noisy: Tensor, clean: Tensor) -> NoisyLabels:
    noisy = torch.as_tensor(noisy).to(torch.int64).reshape(-1)
    clean = torch.as_tensor(clean).to(torch.int64).reshape(-1)
    if noisy.shape != clean.shape:
        raise ValueError(f"{noisy.numel()} human labels for {clean.numel()} samples")
    return NoisyLabels(noisy.clone(), clean.clone(), noisy != clean, "human", 0.0)


def asymmetric_map_for(dataset: str, coarse_labels: Tensor | None = None,
                       fine_labels: Tensor | None = None) -> dict[int, int]:
    if dataset in ASYMMETRIC_MAPS:
        return ASYMMETRIC_MAPS[dataset]
    if dataset == "cifar100":
        if coarse_labels is None or fine_labels is None:
            raise ValueError(
                "asymmetric noise on cifar100 needs the coarse (superclass) labels of the "
                "CIFAR-100 'train' file"
            )
        return cifar100_superclass_map(fine_labels, coarse_labels)
    raise ValueError(f"no asymmetric noise map for dataset {dataset!r}")
