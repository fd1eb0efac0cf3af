"""Data sets: CIFAR-10/100 in every official layout, and folders of class sub-folders.

Datasets live in memory as uint8 NCHW tensors (CIFAR-10 is ~180 MB) or stream from disk (image
folders); both give BatchLoader (loader.py) the same interface: len, labels, classes and
get_images(indices). `ARCHIVES` is the one registry of the official CIFAR archives: what each
holds (read here) and where to download it (download.py).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from googlenet.data.loader import mix_seed
from googlenet.errors import UserError
from googlenet.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    read_image,
)

DATA_ENV = "GOOGLENET_DATA"


def resolve_data_root(path: str | Path | None) -> Path:
    """The data folder: `path` (the --data option), else $GOOGLENET_DATA, else ./data."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path("data")


# --- datasets ----------------------------------------------------------------------------------


@dataclass
class ArrayDataset:
    """A whole data set in memory: uint8 images N x 3 x H x W (RGB) and int64 labels N."""

    images: torch.Tensor  # uint8, N x 3 x H x W, RGB
    labels: torch.Tensor  # int64, N
    classes: list[str] = field(default_factory=list)  # class names, index = label
    prepared: Preprocess | None = None  # the geometry already applied to the images (folders)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise UserError(f"images must be uint8 N x 3 x H x W, got {tuple(self.images.shape)}")
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise UserError(f"{len(self.labels)} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.images.shape[2], self.images.shape[3]

    def subset(self, indices_or_n: int | Sequence[int] | torch.Tensor) -> ArrayDataset:
        """The first n samples (an int), or the samples at the given indices."""
        idx = _subset_index(indices_or_n, len(self))
        return ArrayDataset(
            self.images[idx].contiguous(), self.labels[idx].clone(), self.classes, self.prepared
        )

    def get_images(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images at `idx` (the interface BatchLoader reads through)."""
        return self.images[idx]


def _subset_index(indices_or_n: int | Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    if isinstance(indices_or_n, int):
        if indices_or_n < 0:
            raise UserError(f"subset size must be >= 0, got {indices_or_n}")
        return torch.arange(min(indices_or_n, n))
    idx = torch.as_tensor(indices_or_n, dtype=torch.int64).reshape(-1)
    if idx.numel() and (idx.min() < -n or idx.max() >= n):
        raise UserError(f"subset indices out of range for a data set of {n}")
    return idx


def hold_out(train_set: Any, n: int, seed: int) -> tuple[Any, Any]:
    """(the rest, n held-out images): a seeded, stratified split of the training data, so
    settings can be chosen without looking at the test set."""
    if n >= len(train_set):
        raise UserError(f"config key 'holdout': {n} is not less than {len(train_set)} images")
    held = stratified_indices(train_set.labels, n, seed + 1)  # every class in its share
    keep = torch.ones(len(train_set), dtype=torch.bool)
    keep[held] = False
    return train_set.subset(keep.nonzero().flatten()), train_set.subset(held)


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded, class-stratified sample of n indices (sorted): each class gets its share of n
    in proportion to its size (largest remainders), and at least one sample when n allows, so
    a limit never drops whole classes the way "the first n of a sorted folder" does."""
    total = len(labels)
    if n <= 0 or n >= total:
        return torch.arange(total)
    ks, counts = labels.unique(return_counts=True)
    share = counts.double() * n / total
    take = share.floor().long()
    if n >= len(ks):
        take = take.clamp(min=1)
    left = n - int(take.sum())
    if left > 0:  # largest remainders first (ties: the smaller class index)
        order = torch.argsort(share - share.floor(), descending=True, stable=True)
        for i in order.tolist():
            if left == 0:
                break
            if take[i] < counts[i]:
                take[i] += 1
                left -= 1
    while int(take.sum()) > n:  # more classes than n: trim from the largest takes
        take[int(take.argmax())] -= 1
    g = torch.Generator().manual_seed(mix_seed(seed, 0x57A7))
    chosen = []
    for k, t in zip(ks.tolist(), take.tolist(), strict=True):
        members = (labels == k).nonzero()[:, 0]
        chosen.append(members[torch.randperm(len(members), generator=g)[:t]])
    return torch.cat(chosen).sort().values


def norm_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) used to normalise a data set: its own for CIFAR, ImageNet's for folders."""
    if dataset == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    if dataset == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    return IMAGENET_MEAN, IMAGENET_STD


# --- CIFAR -------------------------------------------------------------------------------------

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
        from googlenet.data.download import download_cifar

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


# --- image folders ----------------------------------------------------------------------------

MAX_BAD = 0.01  # the share of a data set that may be unreadable before training stops


def _default_workers() -> int:
    return min(8, (os.cpu_count() or 1) + 2)  # decoding releases the GIL; a little extra for I/O


def _as_prepare(prepare: Preprocess | int) -> Preprocess:
    if isinstance(prepare, Preprocess):
        return prepare
    if prepare < 1:
        raise UserError(f"size must be >= 1, got {prepare}")
    return Preprocess.square(prepare)


def prepare_image(path: Path, prepare: Preprocess, draft: bool = False) -> torch.Tensor:
    """One image file as stored for training/validation: decoded, then prepare's resize and
    centre crop (uint8 3 x S x S). The same call evaluate makes, so the pixels are identical."""
    side = prepare.resize or prepare.input_size
    return prepare.pixels(read_image(path, side if draft else None).unsqueeze(0))[0]


class ImageFolderDataset:
    """Images streamed from disk, decoded only when a batch asks for them (nothing up front).

    Each image is prepared when read (prepare_image: `prepared`'s resize and centre crop).
    `load_batch` is what BatchLoader reads through: it decodes the files and reports the
    unreadable ones instead of failing; BatchLoader drops those from the batch and calls
    `note_bad`, which warns once per file (naming it), counts it in `bad`, and raises UserError
    once more than `max_bad` of the data set is unreadable. `load_batch` keeps no state, so it
    runs unchanged in DataLoader worker processes."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: torch.Tensor,
        classes: list[str],
        prepared: Preprocess | int,
        workers: int | None = None,
        max_bad: float = MAX_BAD,
        root: Path | None = None,
        draft: bool = False,
    ) -> None:
        self.paths = list(paths)  # one file per sample
        self.labels = torch.as_tensor(labels, dtype=torch.int64)  # class index per sample
        self.classes = classes  # class names, index = label (the training classes)
        self.prepared = _as_prepare(prepared)  # resize + centre crop applied to every image
        self.size = self.prepared.input_size  # side of the stored square images
        self.workers = workers or _default_workers()  # decoding threads (in this process)
        self.max_bad = max_bad  # share of unreadable files tolerated
        self.root = root  # the folder, for messages
        self.draft = draft  # JPEG draft decoding (faster; training images only)
        self.bad: dict[int, str] = {}  # index -> why it could not be read, as found
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:  # to DataLoader workers: without the pool
        return dict(self.__dict__, _pool=None)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    def subset(self, indices_or_n: int | Sequence[int] | torch.Tensor) -> ImageFolderDataset:
        idx = _subset_index(indices_or_n, len(self)).tolist()
        return ImageFolderDataset(
            [self.paths[i] for i in idx],
            self.labels[idx],
            self.classes,
            self.prepared,
            self.workers,
            self.max_bad,
            self.root,
            self.draft,
        )

    def load_batch(
        self, idx: torch.Tensor, threads: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(uint8 images of the readable files among idx, bool mask over idx of those, one
        message per unreadable file). threads: decode on this process's thread pool (False in
        worker processes, which are the parallelism there)."""
        files = [self.paths[i] for i in idx.tolist()]
        out = torch.empty(len(files), 3, self.size, self.size, dtype=torch.uint8)
        errors: list[str | None] = [None] * len(files)

        def decode(j: int) -> None:
            try:
                out[j] = prepare_image(files[j], self.prepared, self.draft)
            except UserError as e:
                errors[j] = str(e)

        if threads and len(files) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="googlenet-decode")
            list(self._pool.map(decode, range(len(files))))
        else:
            for j in range(len(files)):
                decode(j)
        ok = torch.tensor([e is None for e in errors], dtype=torch.bool)
        return out[ok] if not ok.all() else out, ok, [e for e in errors if e is not None]

    def note_bad(self, idx: torch.Tensor, errors: Sequence[str]) -> None:
        """Record unreadable files (warned once each); UserError past max_bad of the set."""
        for i, err in zip(idx.tolist(), errors, strict=True):
            if i not in self.bad:
                self.bad[i] = err
                warnings.warn(f"skipping {err}", stacklevel=2)
        if len(self.bad) > self.max_bad * len(self):
            where = self.root or (self.paths[0].parent.parent if self.paths else "image folder")
            raise UserError(
                f"{where}: {len(self.bad)} of {len(self)} images are unreadable (more than "
                f"{self.max_bad:.0%}), e.g. {next(iter(self.bad.values()))}"
            )

    def get_images(self, idx: torch.Tensor) -> torch.Tensor:
        """Every image at idx; UserError naming the first unreadable one."""
        images, _, errors = self.load_batch(idx)
        if errors:
            raise UserError(errors[0])
        return images

    def materialize(self) -> ArrayDataset:
        """Every readable image decoded into memory (uint8, prepared)."""
        idx = torch.arange(len(self))
        images, ok, errors = self.load_batch(idx)
        self.note_bad(idx[~ok], errors)
        if not ok.any():
            raise UserError(f"{self.root or 'image folder'}: no readable images")
        return ArrayDataset(images, self.labels[ok], self.classes, self.prepared)


def map_classes(root: Path, subs: Sequence[str], classes: Sequence[str]) -> list[int]:
    """The training class index of each sub-folder of root (val/ matched by name): a class
    without a sub-folder is a warning naming it, a sub-folder that is no class an error."""
    index = {c: i for i, c in enumerate(classes)}
    extra = [s for s in subs if s not in index]
    if extra:
        raise UserError(
            f"{root}: sub-folder(s) {', '.join(extra)} are not training classes "
            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
        )
    missing = [c for c in classes if c not in subs]
    if missing:
        warnings.warn(
            f"{root}: no images of class(es) {', '.join(missing)} (validated without them)",
            stacklevel=3,
        )
    return [index[s] for s in subs]


def list_image_folder(
    root: Path, classes: Sequence[str] | None = None, cache_dir: str | Path | None = None
) -> tuple[list[Path], torch.Tensor, list[str]]:
    """(files, labels, classes) of a folder of class sub-folders (listing.list_folder order:
    by sub-folder, then name). With `classes` (the training classes, for val/) the labels are
    those of the sub-folders' names (map_classes)."""
    from googlenet.data.listing import list_folder

    listing = list_folder(root, cache_dir)
    labels = torch.tensor(listing.labels, dtype=torch.int64)
    if classes is None:
        return listing.paths(), labels, list(listing.classes)
    remap = torch.tensor(map_classes(root, listing.classes, classes), dtype=torch.int64)
    return listing.paths(), remap[labels] if len(labels) else labels, list(classes)


def load_image_folder(
    root: str | Path,
    *,
    size: Preprocess | int = 256,
    classes: Sequence[str] | None = None,
    split: str = "all",
    val_fraction: float = 0.1,
    limit: int = 0,
    seed: int = 0,
    max_bad: float = MAX_BAD,
    in_memory: bool = False,
    draft: bool = False,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
) -> ImageFolderDataset | ArrayDataset:
    """A folder with one sub-folder per class (any image format Pillow reads, any size).

    Nothing is decoded here: the folder is only listed (listing.py; with `cache_dir` the listing
    is cached there, so a restart does not walk the tree again). Unreadable files are found when
    read, skipped with a warning naming them and counted; more than `max_bad` of them stops with
    a UserError. `size`: how images are prepared (a Preprocess's resize + centre crop, or an
    int S for "shorter side S, centre S x S"). `classes`: the training classes (sub-folders
    mapped by name, map_classes). `split` "train"/"val" takes a per-class seeded split of
    `val_fraction` ("all" = no split); `limit` a seeded class-stratified sample. in_memory
    decodes them all now into RAM (an ArrayDataset), otherwise batches stream from disk.
    """
    root = Path(root)
    if split not in ("all", "train", "val"):
        raise UserError(f"split must be 'all', 'train' or 'val', got {split!r}")
    if split != "all" and not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if not 0 <= max_bad < 1:
        raise UserError(f"max_bad must be in [0, 1), got {max_bad}")
    prepare = _as_prepare(size)
    paths, labels_t, classes = list_image_folder(root, classes, cache_dir)
    if split != "all":
        keep = _split_indices(labels_t, val_fraction, seed, split == "val")
        paths, labels_t = [paths[i] for i in keep.tolist()], labels_t[keep]
    if limit:
        keep = stratified_indices(labels_t, limit, seed)
        paths, labels_t = [paths[i] for i in keep.tolist()], labels_t[keep]
    if not paths:
        raise UserError(f"{root}: no image files in the class sub-folders")
    ds = ImageFolderDataset(paths, labels_t, classes, prepare, workers, max_bad, root, draft)
    return ds.materialize() if in_memory else ds


def _split_indices(labels: torch.Tensor, fraction: float, seed: int, val: bool) -> torch.Tensor:
    """Seeded per-class split: round(fraction * n_class) samples of each class go to validation
    (at least one when the class has two or more)."""
    g = torch.Generator().manual_seed(mix_seed(seed, 0x5917))
    chosen = []
    for k in labels.unique().tolist():
        members = (labels == k).nonzero()[:, 0]
        perm = members[torch.randperm(len(members), generator=g)]
        n_val = round(fraction * len(members))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        chosen.append(perm[:n_val] if val else perm[n_val:])
    return torch.cat(chosen).sort().values
