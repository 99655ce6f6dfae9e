"""Small datasets written in the real file formats (IDX, CIFAR pickles, CIFAR-N .pt)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gaflab.data import write_idx


def learnable_images(n: int, num_classes: int, shape: tuple[int, ...], seed: int):
    """uint8 images whose class is visible: a bright block at a class-dependent place."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    imgs = rng.integers(0, 60, size=(n, *shape), dtype=np.uint8)
    h, w = shape[-2], shape[-1]
    cells = int(np.ceil(np.sqrt(num_classes)))
    ch, cw = h // cells, w // cells
    for i, c in enumerate(labels):
        r, q = divmod(int(c), cells)
        imgs[i, ..., r * ch : (r + 1) * ch, q * cw : (q + 1) * cw] = 230
    return imgs, labels.astype(np.uint8 if num_classes <= 255 else np.int64)


def write_idx_dataset(root: Path, n_train: int = 600, n_test: int = 200, gz: bool = True,
                      seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = learnable_images(n, 10, (28, 28), s)
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", x)
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", y)
    return root


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are python-2 era pickles


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        x, y = learnable_images(per_batch, 10, (3, 32, 32), i)
        _dump(d / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                       b"labels": [int(v) for v in y],
                                       b"data": x.reshape(per_batch, -1),
                                       b"filenames": [b"x.png"] * per_batch})
    x, y = learnable_images(n_test, 10, (3, 32, 32), 99)
    _dump(d / "test_batch", {b"batch_label": b"testing batch 1 of 1",
                             b"labels": [int(v) for v in y], b"data": x.reshape(n_test, -1),
                             b"filenames": [b"x.png"] * n_test})
    _dump(d / "batches.meta", {b"label_names": [b"airplane"] * 10, b"num_vis": 3072})
    return d


def write_cifar100(root: Path, n_train: int = 400, n_test: int = 100) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x, y = learnable_images(n, 100, (3, 32, 32), seed)
        fine = [int(v) for v in y]
        _dump(d / name, {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(),
                         b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
                         b"data": x.reshape(n, -1)})
    _dump(d / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    return d


def write_cifar_n(path: Path, clean: np.ndarray, num_classes: int, rate: float = 0.4,
                  as_numpy: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """A CIFAR-N style ``*_human.pt``: a torch-saved dict of int64 label arrays."""
    rng = np.random.default_rng(seed)
    clean = np.asarray(clean, dtype=np.int64)

    def noisy(r):
        y = clean.copy()
        flip = rng.random(y.size) < r
        y[flip] = (y[flip] + rng.integers(1, num_classes, flip.sum())) % num_classes
        return y

    if num_classes == 10:
        d = {"clean_label": clean, "aggre_label": noisy(rate / 4), "worse_label": noisy(rate),
             "random_label1": noisy(rate / 2), "random_label2": noisy(rate / 2),
             "random_label3": noisy(rate / 2)}
    else:
        d = {"clean_label": clean, "noisy_label": noisy(rate)}
    torch.save(d if as_numpy else {k: torch.from_numpy(v) for k, v in d.items()}, path)
    return d


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    return write_idx_dataset(tmp_path / "fashion-mnist", n_train=320, n_test=100)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    """Tests choose their data directory explicitly."""
    monkeypatch.delenv("GAF_DATA_DIR", raising=False)
