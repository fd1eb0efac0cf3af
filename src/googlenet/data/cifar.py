"""CIFAR-10/100: reading every official layout, and downloading the official archives.

`ARCHIVES` is the one registry of the official archives: what each holds (read by load_cifar)
and where to download it (download_cifar). load_cifar reads whichever layout is under the data
root: the binary or python folder, or either .tar.gz read in place; python batches are
unpickled by a restricted unpickler that refuses anything but arrays and plain values.

download_cifar: download to a temp file, verify the MD5, extract into a temp folder, then
rename into place, so an interrupted download never leaves a partial data set that later
passes for a whole one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from googlenet.data.arrays import DATA_ENV, ArrayDataset
from googlenet.errors import UserError

CIFAR_RECORD = 3 * 32 * 32
BASE_URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class Archive:
    """One official CIFAR archive: where it is downloaded from, and what it holds."""

    url: str  # where it is downloaded from
    md5: str  # expected MD5 of the whole .tar.gz ("" when we know none: not downloadable)
    folder: str  # the top-level folder it extracts to (also looked for under the data root)
    dataset: str = "cifar10"  # cifar10 | cifar100
    kind: str = "py"  # "py" (pickled batches) or "bin" (binary records)
    train: tuple[str, ...] = ()  # batch files of the training split
    test: tuple[str, ...] = ()  # batch files of the test split
    meta: str = ""  # class-name file

    @property
    def file(self) -> str:
        """The archive's file name."""
        return self.url.rsplit("/", 1)[-1]


# Keys are the names `googlenet download` takes. Module-level so tests (and mirrors) can point
# the URLs elsewhere.
ARCHIVES: dict[str, Archive] = {
    "cifar10-binary": Archive(
        BASE_URL + "cifar-10-binary.tar.gz",
        "c32a1d4ab5d03f1284b67883e8d87530",
        "cifar-10-batches-bin",
        "cifar10",
        "bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        ("test_batch.bin",),
        "batches.meta.txt",
    ),
    "cifar10": Archive(
        BASE_URL + "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        "cifar10",
        "py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
    ),
    "cifar100-binary": Archive(
        BASE_URL + "cifar-100-binary.tar.gz",
        "",
        "cifar-100-binary",
        "cifar100",
        "bin",
        ("train.bin",),
        ("test.bin",),
        "fine_label_names.txt",
    ),
    "cifar100": Archive(
        BASE_URL + "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        "cifar100",
        "py",
        ("train",),
        ("test",),
        "meta",
    ),
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def _layouts(name: str) -> list[Archive]:
    """The archives of data set `name`, binary layout first (the faster one to read)."""
    found = [a for a in ARCHIVES.values() if a.dataset == name]
    return sorted(found, key=lambda a: a.kind != "bin")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR python batches hold: numpy arrays, dicts, lists, str, bytes,
    ints. Anything else (os.system, eval, ...) is refused before it can run."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
        | {
            (mod, name)
            for mod in ("builtins", "__builtin__")
            for name in ("dict", "list", "str", "bytes", "int")
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def restricted_loads(data: bytes, source: str) -> Any:
    """Unpickle `data` (named `source` in errors) with RestrictedUnpickler."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # truncated, corrupt or hostile: all one message for the user
        raise UserError(f"{source}: not a valid CIFAR python batch ({e})") from e


def _key(d: dict, name: str) -> Any:
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    raise KeyError(name)


def _parse_py_batch(data: bytes, source: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    obj = restricted_loads(data, source)
    try:
        images = np.asarray(_key(obj, "data"), dtype=np.uint8)
        labels = np.asarray(_key(obj, "labels" if name == "cifar10" else "fine_labels"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: not a CIFAR python batch (missing {e})") from e
    if images.ndim != 2 or images.shape[1] != CIFAR_RECORD or len(labels) != len(images):
        raise UserError(
            f"{source}: expected N x {CIFAR_RECORD} images and N labels, "
            f"got {images.shape} and {labels.shape}"
        )
    return images, labels.astype(np.int64)


def _parse_bin_batch(data: bytes, source: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    label_bytes = 1 if name == "cifar10" else 2  # CIFAR-100: coarse label, then fine label
    record = label_bytes + CIFAR_RECORD
    if len(data) == 0 or len(data) % record:
        raise UserError(
            f"{source}: {len(data)} bytes is not a whole number of {record}-byte "
            f"records (truncated or not a {name} binary batch)"
        )
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return raw[:, label_bytes:], raw[:, label_bytes - 1].astype(np.int64)


def _parse_meta(data: bytes, source: str, name: str, layout: str) -> list[str]:
    if layout == "bin":
        return [
            line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()
        ]
    obj = restricted_loads(data, source)
    try:
        raw = _key(obj, "label_names" if name == "cifar10" else "fine_label_names")
    except KeyError as e:
        raise UserError(f"{source}: no class names ({e})") from e
    return [n.decode() if isinstance(n, bytes) else str(n) for n in raw]


class _Reader(Protocol):
    def read(self, member: str) -> bytes: ...
    def where(self, member: str) -> str: ...


class _FolderReader:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, member: str) -> bytes:
        path = self.folder / member
        try:
            return path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from e

    def where(self, member: str) -> str:
        return str(self.folder / member)


MAX_MEMBER = 256 << 20  # bytes; the largest CIFAR file (CIFAR-100 train.bin) is 154 MB


class _TarReader:
    """Reads the batch files straight out of an official .tar.gz (one pass, nothing extracted)."""

    def __init__(self, archive: Path, folder: str) -> None:
        self.archive, self.folder = archive, folder
        self.files: dict[str, bytes] = {}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for m in tar:
                    if m.isfile() and m.name.startswith(folder + "/"):
                        if m.size > MAX_MEMBER:  # read into memory: refuse a bomb unread
                            raise UserError(
                                f"{archive}: member {m.name} claims {m.size} bytes, more than "
                                f"any CIFAR file ({MAX_MEMBER}); not an official archive"
                            )
                        f = tar.extractfile(m)
                        if f is not None:
                            self.files[m.name[len(folder) + 1 :]] = f.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            reason = " ".join(str(e).split())  # tarfile lists one line per method it tried
            raise UserError(f"{archive}: not a readable .tar.gz archive ({reason})") from e

    def read(self, member: str) -> bytes:
        if member not in self.files:
            raise UserError(f"{self.archive}: has no {self.folder}/{member}")
        return self.files[member]

    def where(self, member: str) -> str:
        return f"{self.archive}:{self.folder}/{member}"


def _find_cifar(root: Path, name: str) -> tuple[_Reader, Archive] | None:
    """The first layout present under root: extracted folders first, then archives."""
    layouts = _layouts(name)
    for a in layouts:
        folder = root / a.folder
        if folder.is_dir():
            return _FolderReader(folder), a
    for a in layouts:
        archive = root / a.file
        if archive.is_file():
            return _TarReader(archive, a.folder), a
    return None


def load_cifar(
    root: str | Path, name: str = "cifar10", split: str = "train", download: bool = False
) -> ArrayDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from `root`, in whichever official layout is there:
    the binary folder, the python folder, or either .tar.gz archive (read in place)."""
    if name not in _NUM_CLASSES:
        raise UserError(f"unknown CIFAR data set {name!r}; expected one of {sorted(_NUM_CLASSES)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; expected 'train' or 'test'")
    root = Path(root)
    found = _find_cifar(root, name)
    if found is None and download:
        download_cifar(root, name)
        found = _find_cifar(root, name)
    if found is None:
        raise UserError(_missing_message(root, name))
    reader, layout = found
    parse = _parse_bin_batch if layout.kind == "bin" else _parse_py_batch
    parts = [
        parse(reader.read(f), reader.where(f), name)
        for f in (layout.train if split == "train" else layout.test)
    ]
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    n_classes = _NUM_CLASSES[name]
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"{reader.where(layout.train[0])}: labels outside 0..{n_classes - 1}")
    classes = _parse_meta(reader.read(layout.meta), reader.where(layout.meta), name, layout.kind)
    if len(classes) != n_classes:
        raise UserError(
            f"{reader.where(layout.meta)}: {len(classes)} class names, expected {n_classes}"
        )
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)


def _missing_message(root: Path, name: str) -> str:
    b, py = _layouts(name)
    return (
        f"{name} not found in {root}: put {py.file} or {b.file} (or their extracted "
        f"{py.folder}/ or {b.folder}/ folder) there, or run `googlenet download {name}` "
        f"(--data or ${DATA_ENV} choose the folder)"
    )


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_cifar(root: str | Path, name: str = "cifar10", *, timeout: float = 30.0) -> Path:
    """Downloads, verifies and extracts the archive `name` (a key of ARCHIVES) into root;
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
