"""Turn a :class:`TrainConfig` into training tensors: subset, label noise, normalisation.

Everything here depends only on the data settings and the seed, never on the method, so
runs that compare methods see the same noisy labels and, later, the same micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from gaflab.config import TrainConfig
from gaflab.data import ImageData, find_cifar_n_file, load_cifar_n_labels, load_dataset
from gaflab.noise import (
    NoisyLabels,
    asymmetric_map_for,
    asymmetric_noise,
    clean_labels,
    human_noise,
    symmetric_noise,
)
from gaflab.seeds import stream_seed
from gaflab.source_noise import SourceNoise, source_noise


@dataclass
class PreparedData:
    train_x: Tensor  # float32 [N, C, H, W], normalised, on the run's device
    train_y: Tensor  # int64 [N] observed (possibly noisy) labels
    clean_y: Tensor  # int64 [N]
    is_noisy: Tensor  # bool [N]
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    noise_fraction: float
    source: str  # where the dataset's files were read from
    # int64 [N]: the source of each training sample under noise per source (None
    # otherwise); micro-batches of one source each are drawn from it.
    train_source: Tensor | None = None
    # What the run really trains and tests on, and where it came from (every run prints
    # it and results.json keeps it): sizes asked for beyond a split are capped, with a note.
    described: dict | None = None


@lru_cache(maxsize=4)
def _cached_dataset(name: str, data_dir: str | None, download: bool) -> ImageData:
    return load_dataset(name, data_dir, download=download)


def normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [N, C, H, W] → float32, (x/255 - mean) / std per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.to(torch.float32).div_(255.0) - m).div_(s)


def make_noise(cfg: TrainConfig, data: ImageData, indices: Tensor) -> NoisyLabels:
    """Label noise for the training samples ``indices`` (the run's subset).

    Symmetric and asymmetric noise are drawn on the subset itself, so the requested rate is
    the exact fraction of wrong labels the run trains on; human labels are looked up.
    """
    y = data.train_labels[indices]
    seed = stream_seed(cfg.seed, "noise")
    if cfg.noise == "none" or (cfg.noise in ("symmetric", "asymmetric") and cfg.noise_rate == 0):
        return clean_labels(y)
    if cfg.noise == "symmetric":
        return symmetric_noise(y, cfg.noise_rate, data.num_classes, seed=seed)
    if cfg.noise == "asymmetric":
        coarse = data.extras.get("coarse_labels")
        flip = asymmetric_map_for(data.name, coarse, data.train_labels)
        return asymmetric_noise(y, cfg.noise_rate, data.num_classes, flip, seed=seed)
    if cfg.noise == "human":
        path = find_cifar_n_file(data.name, cfg.data_dir)
        noisy, clean = load_cifar_n_labels(path, data.name, cfg.human_labels or "")
        if noisy.numel() != data.num_train:
            raise ValueError(
                f"{path}: {noisy.numel()} human labels for {data.num_train} training images"
            )
        mismatch = int((clean != data.train_labels).sum())
        if mismatch:
            raise ValueError(
                f"{path}: clean_label disagrees with the {data.name} training labels in "
                f"{mismatch} places: the label file does not match these images"
            )
        return human_noise(noisy[indices], clean[indices])
    raise ValueError(f"unknown noise {cfg.noise!r}")


def make_source_noise(cfg: TrainConfig, data: ImageData, indices: Tensor) -> SourceNoise:
    """Noise per source over the training samples ``indices`` (``cfg.noise_sources`` set)."""
    y = data.train_labels[indices]
    flip = None
    if cfg.noise == "asymmetric":
        flip = asymmetric_map_for(data.name, data.extras.get("coarse_labels"), data.train_labels)
    return source_noise(
        y, data.num_classes, cfg.noise, cfg.noise_sources, cfg.bad_sources,
        cfg.bad_source_noise_rate, cfg.other_source_noise_rate,
        seed=stream_seed(cfg.seed, "sources"), flip_map=flip,
    )


def prepare_data(cfg: TrainConfig) -> PreparedData:
    cfg.validate()
    data = _cached_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    g = torch.Generator().manual_seed(stream_seed(cfg.seed, "subset"))
    n = data.num_train
    if cfg.train_size is not None and cfg.train_size < n:
        idx = torch.randperm(n, generator=g)[: cfg.train_size].sort().values
    else:
        idx = torch.arange(n)
    nt = data.num_test
    tidx = torch.arange(nt)
    if cfg.test_size is not None and cfg.test_size < nt:
        tidx = torch.randperm(nt, generator=g)[: cfg.test_size].sort().values
    notes = [f"{name} {asked} asked for more than the {total} {split} images of "
             f"{data.name}: using all {total}"
             for name, asked, total, split in (("train_size", cfg.train_size, n, "training"),
                                               ("test_size", cfg.test_size, nt, "test"))
             if asked is not None and asked > total]
    train_source = None
    if cfg.noise_sources is not None:
        per_source = make_source_noise(cfg, data, idx)
        noise, train_source = per_source.noisy, per_source.source
    else:
        noise = make_noise(cfg, data, idx)
    dev = torch.device(cfg.device)
    c, h, _ = data.train_images.shape[1:]
    return PreparedData(
        train_x=normalise(data.train_images[idx], data.mean, data.std).to(dev),
        train_y=noise.labels.to(dev),
        clean_y=noise.clean.to(dev),
        is_noisy=noise.is_noisy.to(dev),
        test_x=normalise(data.test_images[tidx], data.mean, data.std).to(dev),
        test_y=data.test_labels[tidx].to(dev),
        num_classes=data.num_classes,
        in_channels=int(c),
        image_size=int(h),
        noise_fraction=noise.noise_fraction,
        source=data.source,
        train_source=None if train_source is None else train_source.to(dev),
        described={"dataset": data.name, "source": data.source,
                   "train_images": int(idx.numel()), "train_split": int(n),
                   "test_images": int(tidx.numel()), "test_split": int(nt), "notes": notes},
    )


def describe_data(d: dict) -> str:
    """One line from :attr:`PreparedData.described`: what a run trains and tests on, and
    where the files came from."""
    held = f" ({d['heldout_images']} more held out)" if d.get("heldout_images") else ""
    line = (f"{d.get('dataset')}: {d.get('train_images')} of {d.get('train_split')} training "
            f"images{held}, {d.get('test_images')} of {d.get('test_split')} test images, "
            f"from {d.get('source')}")
    return "; ".join([line] + [f"warning: {n}" for n in d.get("notes", [])])
