"""CIFAR-N human labels (Wei et al. 2022): ``CIFAR-10_human.pt`` and ``CIFAR-100_human.pt``.

Each file is a torch-saved dict of int64 arrays over the 50000 training images:
``clean_label`` and, for CIFAR-10N, ``aggre_label``, ``worse_label``, ``random_label1..3``;
for CIFAR-100N, ``noisy_label``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gaflab.data.files import ENV_VAR, search_roots
from gaflab.data.registry import canonical_name
from gaflab.data.types import DatasetNotFoundError

CIFAR_N_URLS = {
    "cifar10": "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/CIFAR-10_human.pt",
    "cifar100": "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/CIFAR-100_human.pt",
}
CIFAR_N_FILES = {"cifar10": "CIFAR-10_human.pt", "cifar100": "CIFAR-100_human.pt"}
# Label sets by their short names; "aggre" etc. are CIFAR-10N, "noisy" is CIFAR-100N-Fine.
CIFAR_N_KEYS = {
    "cifar10": {
        "aggre": "aggre_label",
        "worse": "worse_label",
        "random1": "random_label1",
        "random2": "random_label2",
        "random3": "random_label3",
    },
    "cifar100": {"noisy": "noisy_label"},
}
_SUBDIRS = ("", "cifar-n", "CIFAR-N", "cifar-10-100n/data", "data")


def _torch_load_labels(path: Path) -> dict:
    """Load a CIFAR-N file without running arbitrary pickles.

    The official files hold numpy int64 arrays; torch's weights-only loader refuses numpy
    objects unless allow-listed, so the few numpy reconstructors are allowed explicitly.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - retry with numpy allow-listed below
        pass
    allowed: list = [np.ndarray, np.dtype]
    try:
        allowed.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        allowed.append(np.core.multiarray._reconstruct)
    allowed.extend(type(np.dtype(t)) for t in ("int64", "int32", "uint8"))
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def find_cifar_n_file(dataset: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The human-label file of ``dataset`` in the first root (or sub-directory) holding it."""
    dataset = canonical_name(dataset)
    if dataset not in CIFAR_N_FILES:
        raise ValueError(f"human label noise (CIFAR-N) exists only for cifar10 and cifar100, "
                         f"not {dataset!r}")
    fname = CIFAR_N_FILES[dataset]
    roots = search_roots(data_dir)
    for root in roots:
        for sub in _SUBDIRS:
            p = (root / sub / fname) if sub else root / fname
            if p.is_file():
                return p
    searched = "\n  ".join(str(r) for r in roots)
    raise DatasetNotFoundError(
        f"CIFAR-N label file {fname} not found. Searched:\n  {searched}\n"
        f"Download it from {CIFAR_N_URLS[dataset]} and put it in one of these directories "
        f"(or pass --data-dir / set ${ENV_VAR})."
    )


def load_cifar_n_labels(
    path: str | os.PathLike, dataset: str, label_set: str
) -> tuple[Tensor, Tensor]:
    """``(noisy_labels, clean_labels)`` int64 [50000] from a CIFAR-N ``*_human.pt`` file.

    ``label_set``: for cifar10 one of aggre, worse, random1, random2, random3 (or the full
    key such as ``aggre_label``); for cifar100 ``noisy`` (CIFAR-100N-Fine).
    """
    dataset = canonical_name(dataset)
    keys = CIFAR_N_KEYS.get(dataset)
    if keys is None:
        raise ValueError(f"no CIFAR-N labels for dataset {dataset!r}")
    key = keys.get(label_set, label_set)
    if key not in keys.values():
        raise ValueError(
            f"unknown CIFAR-N label set {label_set!r} for {dataset}; "
            f"choose from {', '.join(keys)}"
        )
    d = _torch_load_labels(Path(path))
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict of label arrays, got {type(d).__name__}")
    missing = [k for k in ("clean_label", key) if k not in d]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; has {sorted(d)}")
    noisy = torch.as_tensor(np.asarray(d[key]), dtype=torch.int64).reshape(-1)
    clean = torch.as_tensor(np.asarray(d["clean_label"]), dtype=torch.int64).reshape(-1)
    if noisy.shape != clean.shape:
        raise ValueError(f"{path}: {key} has {noisy.numel()} labels, clean_label {clean.numel()}")
    return noisy, clean
