"""The 8x8 handwritten digits that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``).

1797 images (the test part of UCI's optdigits), one per CSV row: 64 pixel counts 0..16 (an
8x8 image, row-major), then the label 0..9. Pixels are scaled to uint8 0..255
(``round(v * 255 / 16)``) so they normalise like every other dataset. There is no official
split: every fifth image (rows 4, 9, 14, ...) is the test set, 359 images; the other 1438
train. This format reads only the CSV file, so scikit-learn is never imported; installing it
(``pip install scikit-learn``, the ``digits`` extra) is one way to have the file.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gaflab.data.types import (
    DataFormat,
    DatasetInfo,
    ImageData,
    check_label_range,
    image_data,
)

DIGITS_FILE = "digits.csv.gz"
TEST_EVERY = 5  # rows i with i % 5 == 4 are the test split


def sklearn_data_dir() -> Path | None:
    """``sklearn/datasets/data`` of an installed scikit-learn, found without importing it."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        d = Path(location) / "datasets" / "data"
        if (d / DIGITS_FILE).is_file():
            return d
    return None


def read_digits_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 8, 8], labels int64 [N])`` from a digits CSV (gzip or plain)."""
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rt") as f:
        try:
            rows = np.loadtxt(f, delimiter=",", ndmin=2)
        except ValueError as e:
            raise ValueError(f"{path}: not a digits CSV of numbers ({e})") from None
    if rows.shape[1] != 65:
        raise ValueError(f"{path}: expected 65 columns (64 pixels and a label), "
                         f"got {rows.shape[1]}")
    pixels, labels = rows[:, :64], rows[:, 64]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 16):
        raise ValueError(f"{path}: pixel counts outside 0..16")
    if np.any(labels != np.round(labels)):
        raise ValueError(f"{path}: labels must be whole numbers")
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    return images, labels.astype(np.int64)


class DigitsCsv(DataFormat):
    """scikit-learn's ``digits.csv.gz``: in a search root, or in scikit-learn itself."""

    name = "digits-csv"

    def holds(self, directory: Path) -> bool:
        return (directory / DIGITS_FILE).is_file()

    def locate(self, info: DatasetInfo, roots: Sequence[Path]) -> Path | None:
        return super().locate(info, roots) or sklearn_data_dir()

    def load(self, info: DatasetInfo, directory: Path) -> ImageData:
        images, labels = read_digits_csv(directory / DIGITS_FILE)
        check_label_range(labels, info.num_classes, directory / DIGITS_FILE, "all")
        test = np.arange(labels.size) % TEST_EVERY == TEST_EVERY - 1
        return image_data(info, (images[~test, None], labels[~test]),
                          (images[test, None], labels[test]), directory)

    def download(self, info: DatasetInfo, root: Path) -> Path:
        raise OSError("the digits have no download; install scikit-learn, which ships them")

    def describe(self, info: DatasetInfo) -> str:
        return f"a directory holding {DIGITS_FILE} (scikit-learn's copy is found by itself)"
