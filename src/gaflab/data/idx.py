"""The IDX format of MNIST and Fashion-MNIST: reader, writer, and the four-file layout.

An IDX file is two zero bytes, a dtype code, the number of dimensions n, n big-endian
uint32 sizes, then the data in C order. A dataset is four of them,
``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each gzip-compressed (``.gz``) or raw.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from gaflab.data.files import download_file
from gaflab.data.types import (
    DataFormat,
    DatasetInfo,
    ImageData,
    Remote,
    check_label_range,
    image_data,
)

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

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
    """Read an IDX file (gzip-compressed or raw, detected from the content)."""
    path = Path(path)
    try:
        with _open_maybe_gz(path) as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a cut-off or damaged .gz
        raise ValueError(f"{path}: truncated or damaged ({type(e).__name__}: {e})") from None
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


def idx_remotes(url: str, md5s: tuple[str, ...]) -> tuple[Remote, ...]:
    """The four gzipped IDX files of an MNIST-style dataset under ``url``, in IDX_FILES order."""
    return tuple(
        Remote(url + name + ".gz", name + ".gz", md5)
        for name, md5 in zip(IDX_FILES, md5s, strict=True)
    )


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        p = directory / name
        if p.is_file():
            return p
    return None


class IdxFormat(DataFormat):
    """Four IDX files: train/t10k images ``[N, H, W]`` uint8 and labels ``[N]``."""

    name = "idx"

    def holds(self, directory: Path) -> bool:
        return all(_find_idx_file(directory, s) is not None for s in IDX_FILES)

    def load(self, info: DatasetInfo, directory: Path) -> ImageData:
        arrays = {s: read_idx(_find_idx_file(directory, s)) for s in IDX_FILES}
        tr_x, tr_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
        te_x, te_y = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
        for x, y, split in ((tr_x, tr_y, "train"), (te_x, te_y, "t10k")):
            if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{directory}: {split} images {x.shape} and labels {y.shape} do not match"
                )
            check_label_range(y, info.num_classes, directory, split)
        # IDX images are [N, H, W]: one channel.
        return image_data(info, (tr_x[:, None], tr_y), (te_x[:, None], te_y), directory)

    def download(self, info: DatasetInfo, root: Path) -> Path:
        target = root / info.name
        try:
            for remote in info.remotes:
                download_file(remote, target)
        except BaseException:
            with contextlib.suppress(OSError):
                target.rmdir()  # only when empty: a failed first fetch leaves nothing behind
            raise
        return target

    def describe(self, info: DatasetInfo) -> str:
        files = ", ".join(f"{s}.gz (or uncompressed)" for s in IDX_FILES)
        return f"a directory holding {files}"
