"""The python-pickle layout of CIFAR-10 and CIFAR-100.

Each batch file is a pickled dict (python-2 era, so bytes keys) with ``data``, uint8
``[N, 3072]`` rows of channel-major 32x32 images (R plane, G plane, B plane), and a label
list. CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5,test_batch}``, labels under
``labels``. CIFAR-100: ``cifar-100-python/{train,test}``, labels under ``fine_labels``, the
20 superclasses under ``coarse_labels`` (kept as ``ImageData.extras``), class names in
``meta``.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gaflab.data.files import download_file, extract_tar_gz
from gaflab.data.types import (
    DataFormat,
    DatasetInfo,
    ImageData,
    check_label_range,
    image_data,
)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (EOFError, pickle.UnpicklingError, OSError) as e:  # a cut-off or damaged file
        raise ValueError(f"{path}: truncated or damaged ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str):
    """Look up ``key`` whether the pickle was written with bytes or str keys."""
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(key)


def _cifar_arrays(path: Path, label_key: str, d: dict | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path) if d is None else d
    try:
        data = np.asarray(_get(d, "data"), dtype=np.uint8)
        labels = np.asarray(_get(d, label_key), dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"{path}: CIFAR batch without key {e.args[0]!r}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


class CifarPickle(DataFormat):
    """One CIFAR pickle layout: its batch files, label key, and optional annotations.

    ``extra_keys`` are per-sample label lists of the training file kept in
    ``ImageData.extras`` when present; ``names_key`` is read from ``meta_file`` (when it
    exists) for the class names.
    """

    def __init__(self, name: str, directory: str, train_files: tuple[str, ...],
                 test_file: str, label_key: str, extra_keys: tuple[str, ...] = (),
                 meta_file: str | None = None, names_key: str | None = None) -> None:
        self.name = name
        self.directory = directory  # the archive's top-level directory
        self.train_files = train_files
        self.test_file = test_file
        self.label_key = label_key
        self.extra_keys = extra_keys
        self.meta_file = meta_file
        self.names_key = names_key

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file)

    def holds(self, directory: Path) -> bool:
        return all((directory / f).is_file() for f in self.files)

    def load(self, info: DatasetInfo, directory: Path) -> ImageData:
        dicts = [_unpickle(directory / f) for f in self.train_files]
        parts = [_cifar_arrays(directory / f, self.label_key, d)
                 for f, d in zip(self.train_files, dicts, strict=True)]
        tr_x = np.concatenate([p[0] for p in parts])
        tr_y = np.concatenate([p[1] for p in parts])
        te_x, te_y = _cifar_arrays(directory / self.test_file, self.label_key)
        extras: dict[str, Tensor] = {}
        for key in self.extra_keys:
            with contextlib.suppress(KeyError):
                extras[key] = torch.as_tensor(np.concatenate(
                    [np.asarray(_get(d, key), dtype=np.int64) for d in dicts]
                ))
        class_names = info.class_names
        meta = directory / self.meta_file if self.meta_file else None
        if meta is not None and meta.is_file():
            with contextlib.suppress(KeyError):
                names = _get(_unpickle(meta), self.names_key or "")
                class_names = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
        check_label_range(tr_y, info.num_classes, directory, "train")
        check_label_range(te_y, info.num_classes, directory, "test")
        return image_data(info, (tr_x, tr_y), (te_x, te_y), directory, class_names, extras)

    def download(self, info: DatasetInfo, root: Path) -> Path:
        archive = download_file(info.remotes[0], root)
        extract_tar_gz(archive, root)
        return root / self.directory

    def describe(self, info: DatasetInfo) -> str:
        return f"a directory {self.directory}/ holding {', '.join(self.files)}"


CIFAR10_PICKLE = CifarPickle(
    "cifar10-pickle", "cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_file="test_batch",
    label_key="labels",
)
CIFAR100_PICKLE = CifarPickle(
    "cifar100-pickle", "cifar-100-python", train_files=("train",), test_file="test",
    label_key="fine_labels", extra_keys=("coarse_labels",), meta_file="meta",
    names_key="fine_label_names",
)
