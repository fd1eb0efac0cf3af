"""Fetching the official CIFAR archives: download to a temp file, verify the MD5, extract into a
temp folder, then rename into place, so an interrupted download never leaves a partial data set
that later passes for a whole one."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from googlenet.data.datasets import ARCHIVES
from googlenet.errors import UserError


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_cifar(root: str | Path, name: str = "cifar10", *, timeout: float = 30.0) -> Path:
    """Downloads, verifies and extracts the archive `name` (a key of datasets.ARCHIVES) into root;
    returns the extracted folder. Does nothing when that folder already exists."""
    known = sorted(k for k, a in ARCHIVES.items() if a.md5)
    if name not in known:
        raise UserError(f"no download known for {name!r}; expected one of {known}")
    spec = ARCHIVES[name]
    root = Path(root)
    target = root / spec.folder
    if target.is_dir():
        return target
    archive_name = spec.file
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{root}: cannot create the data folder ({e.strerror or e})") from e

    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive_name}.", suffix=".part", dir=root)
    tmp_file = Path(tmp_name)
    tmp_dir: Path | None = None
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(spec.url, out, timeout, archive_name, root, spec.folder)
        got = md5sum(tmp_file)
        if got != spec.md5:
            raise UserError(
                f"{spec.url}: MD5 {got} does not match the expected {spec.md5} "
                "(corrupt or incomplete download; nothing was kept, try again)"
            )
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", dir=root))
        _extract(tmp_file, tmp_dir, spec.url)
        extracted = tmp_dir / spec.folder
        if not extracted.is_dir():
            raise UserError(f"{spec.url}: archive has no {spec.folder}/ folder")
        os.replace(extracted, target)  # atomic on one file system: the folder is whole or absent
    finally:
        tmp_file.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def _fetch(url: str, out, timeout: float, archive_name: str, root: Path, folder: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=archive_name,
                file=sys.stderr,
                disable=None,
            ) as bar:
                while block := resp.read(1 << 16):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"cannot download {url} ({reason}); without a network, put {archive_name} "
            f"(or its extracted {folder}/ folder) into {root}"
        ) from e


def _extract(archive: Path, dest: Path, url: str) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar.getmembers():  # refuse paths that escape dest, links and devices
                p = Path(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    raise UserError(f"{url}: unsafe archive member {m.name!r}")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{url}: cannot extract the archive ({e})") from e
