"""Data: CIFAR-10/100 in every official layout, image folders, and one batched tensor pipeline.

Datasets live in memory as uint8 NCHW tensors (CIFAR-10 is ~180 MB) or stream from disk (image
folders). `BatchLoader` gathers a batch of indices and does all augmentation as batch tensor ops
(crop with padding, flip, cutout, the paper's scale/aspect crop, photometric distortion), then
resizes on the fly to the model's input size, so a resized copy of a dataset never exists.
Everything random comes from a torch.Generator seeded from (seed, epoch, rank).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import tarfile
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from googlenet.errors import UserError

# Per-channel statistics of the training sets, on the 0..1 pixel scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
        return ArrayDataset(self.images[idx].contiguous(), self.labels[idx].clone(), self.classes)

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


class Dataset(Protocol):
    """What BatchLoader needs: a length, labels, and uint8 images for a batch of indices."""

    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int: ...

    def get_images(self, idx: torch.Tensor) -> torch.Tensor: ...


# --- CIFAR -------------------------------------------------------------------------------------

CIFAR_RECORD = 3 * 32 * 32


@dataclass(frozen=True)
class _CifarLayout:
    folder: str  # folder inside the archive / data root
    archive: str  # official archive file name
    train: tuple[str, ...]  # batch files of the training split
    test: tuple[str, ...]  # batch files of the test split
    meta: str  # class-name file


_LAYOUTS: dict[str, dict[str, _CifarLayout]] = {
    "cifar10": {
        "bin": _CifarLayout(
            "cifar-10-batches-bin",
            "cifar-10-binary.tar.gz",
            tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            ("test_batch.bin",),
            "batches.meta.txt",
        ),
        "py": _CifarLayout(
            "cifar-10-batches-py",
            "cifar-10-python.tar.gz",
            tuple(f"data_batch_{i}" for i in range(1, 6)),
            ("test_batch",),
            "batches.meta",
        ),
    },
    "cifar100": {
        "bin": _CifarLayout(
            "cifar-100-binary",
            "cifar-100-binary.tar.gz",
            ("train.bin",),
            ("test.bin",),
            "fine_label_names.txt",
        ),
        "py": _CifarLayout(
            "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "meta"
        ),
    },
}
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


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


class _TarReader:
    """Reads the batch files straight out of an official .tar.gz (one pass, nothing extracted)."""

    def __init__(self, archive: Path, folder: str) -> None:
        self.archive, self.folder = archive, folder
        self.files: dict[str, bytes] = {}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for m in tar:
                    if m.isfile() and m.name.startswith(folder + "/"):
                        f = tar.extractfile(m)
                        if f is not None:
                            self.files[m.name[len(folder) + 1 :]] = f.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise UserError(f"{archive}: not a readable .tar.gz archive ({e})") from e

    def read(self, member: str) -> bytes:
        if member not in self.files:
            raise UserError(f"{self.archive}: has no {self.folder}/{member}")
        return self.files[member]

    def where(self, member: str) -> str:
        return f"{self.archive}:{self.folder}/{member}"


def _find_cifar(root: Path, name: str) -> tuple[_Reader, str] | None:
    """The first layout present under root: extracted folders first, then archives."""
    layouts = _LAYOUTS[name]
    for kind in ("bin", "py"):
        folder = root / layouts[kind].folder
        if folder.is_dir():
            return _FolderReader(folder), kind
    for kind in ("bin", "py"):
        archive = root / layouts[kind].archive
        if archive.is_file():
            return _TarReader(archive, layouts[kind].folder), kind
    return None


def load_cifar(
    root: str | Path, name: str = "cifar10", split: str = "train", download: bool = False
) -> ArrayDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from `root`, in whichever official layout is there:
    the binary folder, the python folder, or either .tar.gz archive (read in place)."""
    if name not in _LAYOUTS:
        raise UserError(f"unknown CIFAR data set {name!r}; expected one of {sorted(_LAYOUTS)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; expected 'train' or 'test'")
    root = Path(root)
    found = _find_cifar(root, name)
    if found is None and download:
        from googlenet.download import download_cifar

        download_cifar(root, name)
        found = _find_cifar(root, name)
    if found is None:
        raise UserError(_missing_message(root, name))
    reader, kind = found
    layout = _LAYOUTS[name][kind]
    parse = _parse_bin_batch if kind == "bin" else _parse_py_batch
    parts = [
        parse(reader.read(f), reader.where(f), name)
        for f in (layout.train if split == "train" else layout.test)
    ]
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    n_classes = _NUM_CLASSES[name]
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"{reader.where(layout.train[0])}: labels outside 0..{n_classes - 1}")
    classes = _parse_meta(reader.read(layout.meta), reader.where(layout.meta), name, kind)
    if len(classes) != n_classes:
        raise UserError(
            f"{reader.where(layout.meta)}: {len(classes)} class names, expected {n_classes}"
        )
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)


def _missing_message(root: Path, name: str) -> str:
    py, b = _LAYOUTS[name]["py"], _LAYOUTS[name]["bin"]
    return (
        f"{name} not found in {root}: put {py.archive} or {b.archive} (or their extracted "
        f"{py.folder}/ or {b.folder}/ folder) there, or run `googlenet download {name}` "
        f"(--data or ${DATA_ENV} choose the folder)"
    )


# --- augmentation ------------------------------------------------------------------------------


@dataclass
class Augment:
    """Training augmentation, applied per batch as tensor ops."""

    crop_padding: int = 0  # random crop of the source size after padding each side by this much
    flip: bool = False  # random horizontal flip
    cutout: int = 0  # side of a random square set to the mean (0 = off), in source pixels
    scale_aspect: bool = False  # paper's crop: 8%-100% of the area, aspect 3/4-4/3, resized
    photometric: bool = False  # brightness/contrast/saturation jitter + AlexNet PCA lighting
    padding_mode: str = "zero"  # "zero" or "reflect" padding for crop_padding
    jitter: float = 0.4  # strength of brightness/contrast/saturation jitter (factor 1 +- jitter)
    lighting: float = 0.1  # std of the PCA lighting noise (AlexNet)
    min_area: float = 0.08  # smallest crop area fraction for scale_aspect

    def __post_init__(self) -> None:
        if self.padding_mode not in ("zero", "reflect"):
            raise UserError(f"padding_mode must be 'zero' or 'reflect', got {self.padding_mode!r}")
        if self.crop_padding < 0 or self.cutout < 0:
            raise UserError("crop_padding and cutout must be >= 0")
        if not 0 < self.min_area <= 1:
            raise UserError(f"min_area must be in (0, 1], got {self.min_area}")


# ImageNet RGB eigen-decomposition used by AlexNet's lighting noise.
_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = torch.tensor(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)


def _crop_flip(
    x: torch.Tensor,
    pad: int,
    flip: torch.Tensor | None,
    mode: str,
    g: torch.Generator,
    out: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Random `out`-sized crop (default: the original size) from the padded batch, with an
    optional flip, as one gather with per-sample offsets (uint8 in, uint8 out)."""
    b, c, h0, w0 = x.shape
    h, w = out or (h0, w0)
    if pad:
        if mode == "reflect":
            x = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(torch.uint8)
        else:
            x = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, h0 + 2 * pad - h + 1, (b, 1), generator=g)
    ox = torch.randint(0, w0 + 2 * pad - w + 1, (b, 1), generator=g)
    rows = oy + torch.arange(h)  # b x h
    cols = torch.arange(w).expand(b, w)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = ox + cols  # b x w
    dev = x.device
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return x[bi, ci, rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


def _resample_matrix(
    start: torch.Tensor, length: torch.Tensor, n_in: int, n_out: int
) -> torch.Tensor:
    """Per-sample 1-D resampling weights (b x n_out x n_in) taking the window
    [start, start + length) of an n_in-pixel axis to n_out pixels: bilinear when enlarging, a
    wider triangle (antialiased, like PIL) when shrinking; rows are normalised so edges replicate.
    Matches F.interpolate(bilinear, align_corners=False, antialias=True) for a full window."""
    scale = length / n_out  # source pixels per output pixel, b
    centre = start[:, None] + (torch.arange(n_out) + 0.5) * scale[:, None]  # b x n_out
    support = scale.clamp(min=1)[:, None, None]
    dist = (torch.arange(n_in) + 0.5)[None, None, :] - centre[:, :, None]
    w = (1 - dist.abs() / support).clamp_(min=0)
    return w / w.sum(2, keepdim=True)


def _scale_aspect_boxes(
    b: int, h: int, w: int, min_area: float, g: torch.Generator, tries: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop boxes (x0, y0, width, height) for the paper's crop: area min_area..100%, aspect
    3/4..4/3, uniform position; the first of `tries` draws that fits, else the whole image."""
    area = torch.empty(b, tries).uniform_(min_area, 1.0, generator=g) * (h * w)
    log_r = torch.empty(b, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    r = torch.exp(log_r)
    cw, ch = torch.sqrt(area * r).round(), torch.sqrt(area / r).round()
    ok = (cw <= w) & (ch <= h) & (cw >= 1) & (ch >= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    pick = first.clamp(min=0)[:, None]
    cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.tensor(float(w)))
    ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.tensor(float(h)))
    x0 = (torch.rand(b, generator=g) * (w - cw + 1)).floor()
    y0 = (torch.rand(b, generator=g) * (h - ch + 1)).floor()
    return x0, y0, cw, ch


def _photometric(
    x: torch.Tensor, jitter: float, lighting: float, g: torch.Generator
) -> torch.Tensor:
    """Brightness, contrast and saturation jitter, then PCA lighting, on 0..1 float images.

    Runs before the resize (see BatchLoader.transform), so with scale_aspect the contrast mean
    is that of the whole source image rather than of the crop: a negligible difference."""
    b = x.shape[0]
    dev = x.device

    def factor() -> torch.Tensor:
        return torch.empty(b, 1, 1, 1).uniform_(1 - jitter, 1 + jitter, generator=g).to(dev)

    gray_w = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    x = x * factor()  # brightness
    mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * factor() + mean  # contrast
    gray = (x * gray_w).sum(1, keepdim=True)
    x = (x - gray) * factor() + gray  # saturation
    if lighting > 0:
        alpha = torch.randn(b, 3, generator=g) * lighting
        rgb = (alpha * _PCA_EIGVAL) @ _PCA_EIGVEC.T  # b x 3
        x = x + rgb.to(dev).view(b, 3, 1, 1)
    return x.clamp_(0, 1)


def _cutout(x: torch.Tensor, size: int, fill: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Sets one random size x size square per image (clipped at the edges) to `fill`."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), generator=g).to(x.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=g).to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = size // 2
    m = (ys >= cy - half) & (ys < cy - half + size) & (xs >= cx - half) & (xs < cx - half + size)
    return torch.where(m[:, None], fill.view(1, -1, 1, 1), x)


# --- the loader --------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from several integers (stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchLoader:
    """Batches of (x float32 N x 3 x input_size x input_size normalised, y int64) from a dataset.

    Order and augmentation are a pure function of (seed, epoch, rank): call set_epoch(e) before
    each epoch. With world_size > 1 each rank iterates a disjoint slice of the same permutation;
    with drop_last all ranks get the same number of batches, and without it (evaluation) every
    sample is seen exactly once across ranks.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if input_size < 1:
            raise UserError(f"input size must be >= 1, got {input_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError(f"mean and std need 3 values with std > 0, got {mean} and {std}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.input_size = input_size
        self.augment = augment
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.epoch = 0
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order and augmentation the next iteration produces."""
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order."""
        n = len(self.dataset)
        if self.shuffle:  # the same permutation on every rank, so the slices are disjoint
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.drop_last:  # equal share per rank
            order = order[: n // self.world_size * self.world_size]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.dataset)
        per_rank = (
            n // self.world_size if self.drop_last else len(range(self.rank, n, self.world_size))
        )
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank, 1))
        labels = self.dataset.labels
        for i in range(len(self)):
            b = idx[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.dataset.get_images(b)
            yield self.transform(images, g), labels[b].to(self.device)

    def transform(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 B x 3 x H x W -> augmented, resized, normalised float32 B x 3 x S x S.

        Pixel-wise work (photometric, normalisation, cutout) runs at the source resolution and
        the resize comes last: resampling weights sum to 1, so normalising first is exact and the
        224 x 224 batch is written once."""
        aug = self.augment
        x = images.to(self.device, non_blocking=True)
        b, _, h, w = x.shape
        size = self.input_size
        flip = torch.rand(b, generator=g) < 0.5 if aug is not None and aug.flip else None
        box = None
        if aug is not None and aug.scale_aspect:
            box = _scale_aspect_boxes(b, h, w, aug.min_area, g)
        else:
            # A source larger than the input is cropped to it (random when augmenting, else
            # the centre), as the checkpoint's "resize, then centre-crop" preprocess says.
            crop = (min(h, size), min(w, size))
            if aug is not None and (aug.crop_padding or flip is not None or crop != (h, w)):
                x = _crop_flip(x, aug.crop_padding, flip, aug.padding_mode, g, crop)
                flip = None  # done
            elif crop != (h, w):
                top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
                x = x[:, :, top : top + crop[0], left : left + crop[1]]
            b, _, h, w = x.shape
        x = x.float().mul_(1 / 255)
        if aug is not None and aug.photometric:
            x = _photometric(x, aug.jitter, aug.lighting, g)
        x = (x - self.mean) / self.std
        if aug is not None and aug.cutout:
            x = _cutout(x, aug.cutout, torch.zeros(3, device=self.device), g)
        if box is not None or (h, w) != (size, size):
            if box is None:
                box = (
                    torch.zeros(b),
                    torch.zeros(b),
                    torch.full((b,), float(w)),
                    torch.full((b,), float(h)),
                )
            x0, y0, cw, ch = box
            wy = _resample_matrix(y0, ch, h, size).to(self.device)
            wx = _resample_matrix(x0, cw, w, size)
            if flip is not None:
                wx = torch.where(flip[:, None, None], wx.flip(1), wx)
            wx = wx.to(self.device)
            # Crop + flip + resize as two batched matmuls: Wy @ (x @ Wx^T).
            t = torch.matmul(x, wx[:, None].transpose(2, 3))  # b x 3 x h x size
            if self.channels_last:  # write the big output directly as b x size x size x 3
                t = t.permute(0, 2, 3, 1).reshape(b, h, size * 3)
                x = torch.bmm(wy, t).view(b, size, size, 3).permute(0, 3, 1, 2)
            else:
                x = torch.matmul(wy[:, None], t)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


# --- image files and folders -------------------------------------------------------------------


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16/32-bit grey scaled down, alpha composited onto white, palette,
    CMYK and the rest through Pillow's own conversion."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode != "F" and a.max(initial=0) > 255:  # 16-bit range
            a = a / 257.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def _open_rgb(path: Path, draft: int | None = None) -> Image.Image:
    """Decoded, EXIF-upright RGB image; UserError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))  # DCT-domain downscale: much faster decoding
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except _DECODE_ERRORS as e:
        raise UserError(f"{path}: not a readable image ({e})") from e


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 3 x H x W RGB (EXIF orientation applied; grey, RGBA, palette,
    CMYK and 16-bit converted). UserError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    return _pil_to_tensor(_open_rgb(path))


def read_image_resized(path: str | Path, size: int) -> torch.Tensor:
    """An image file resized so its shorter side is `size`, centre-cropped to size x size."""
    path = Path(path)
    im = _open_rgb(path, draft=size)
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return _pil_to_tensor(im.crop((left, top, left + size, top + size)))


def _default_workers() -> int:
    return min(8, (os.cpu_count() or 1) + 2)  # decoding releases the GIL; a little extra for I/O


class ImageFolderDataset:
    """Images streamed from disk: each batch is decoded and resized to size x size by a thread
    pool. Same interface as ArrayDataset for BatchLoader (len, labels, classes, get_images)."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: torch.Tensor,
        classes: list[str],
        size: int,
        workers: int | None = None,
    ) -> None:
        self.paths = list(paths)  # one file per sample
        self.labels = torch.as_tensor(labels, dtype=torch.int64)  # class index per sample
        self.classes = classes  # class names (sub-folder names), index = label
        self.size = size  # working side length every image is resized + centre-cropped to
        self.workers = workers or _default_workers()  # decoding threads
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    def subset(self, indices_or_n: int | Sequence[int] | torch.Tensor) -> ImageFolderDataset:
        idx = _subset_index(indices_or_n, len(self)).tolist()
        return ImageFolderDataset(
            [self.paths[i] for i in idx], self.labels[idx], self.classes, self.size, self.workers
        )

    def get_images(self, idx: torch.Tensor) -> torch.Tensor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="googlenet-decode")
        files = [self.paths[i] for i in idx.tolist()]
        out = torch.empty(len(files), 3, self.size, self.size, dtype=torch.uint8)

        def decode(j: int) -> None:
            out[j] = read_image_resized(files[j], self.size)

        list(self._pool.map(decode, range(len(files))))
        return out

    def materialize(self) -> ArrayDataset:
        """Everything decoded into memory (uint8 at the working size)."""
        return ArrayDataset(self.get_images(torch.arange(len(self))), self.labels, self.classes)


def load_image_folder(
    root: str | Path,
    *,
    size: int = 256,
    split: str = "all",
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad: bool = False,
    in_memory: bool = False,
    workers: int | None = None,
) -> ImageFolderDataset | ArrayDataset:
    """A folder with one sub-folder per class (any image format Pillow reads, any size).

    Every file is decoded once up front (thread pool) so that a corrupt or non-image file is
    reported by its path: UserError by default, skipped with a warning when skip_bad. `split`
    "train"/"val" takes a per-class seeded split of `val_fraction` for validation ("all" = no
    split). Images are resized (shorter side) and centre-cropped to size x size; in_memory keeps
    them decoded in RAM (an ArrayDataset), otherwise batches stream from disk.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: image folder not found")
    if split not in ("all", "train", "val"):
        raise UserError(f"split must be 'all', 'train' or 'val', got {split!r}")
    if split != "all" and not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if size < 1:
        raise UserError(f"size must be >= 1, got {size}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class sub-folders (expected one folder per class)")
    paths: list[Path] = []
    labels: list[int] = []
    for k, c in enumerate(classes):
        files = sorted(
            p
            for p in (root / c).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        paths += files
        labels += [k] * len(files)
    labels_t = torch.tensor(labels, dtype=torch.int64)
    if split != "all":
        keep = _split_indices(labels_t, val_fraction, seed, split == "val")
        paths, labels_t = [paths[i] for i in keep.tolist()], labels_t[keep]

    workers = workers or _default_workers()
    ok = torch.ones(len(paths), dtype=torch.bool)
    decoded: list[torch.Tensor | None] = [None] * len(paths)

    def check(i: int) -> str | None:
        try:
            img = read_image_resized(paths[i], size)
        except UserError as e:
            return str(e)
        if in_memory:
            decoded[i] = img
        return None

    with ThreadPoolExecutor(workers) as pool:
        errors = list(pool.map(check, range(len(paths))))
    for i, err in enumerate(errors):
        if err is None:
            continue
        if not skip_bad:
            raise UserError(f"{err} (pass skip_bad / --skip-bad to skip such files)")
        warnings.warn(f"skipping {err}", stacklevel=2)
        ok[i] = False
    paths = [p for p, good in zip(paths, ok.tolist(), strict=True) if good]
    labels_t = labels_t[ok]
    if not paths:
        raise UserError(f"{root}: no readable images")
    if in_memory:
        images = torch.stack([d for d in decoded if d is not None])
        return ArrayDataset(images, labels_t, classes)
    return ImageFolderDataset(paths, labels_t, classes, size, workers)


def _split_indices(labels: torch.Tensor, fraction: float, seed: int, val: bool) -> torch.Tensor:
    """Seeded per-class split: round(fraction * n_class) samples of each class go to validation
    (at least one when the class has two or more)."""
    g = torch.Generator().manual_seed(_seed(seed, 0x5917))
    chosen = []
    for k in labels.unique().tolist():
        members = (labels == k).nonzero()[:, 0]
        perm = members[torch.randperm(len(members), generator=g)]
        n_val = round(fraction * len(members))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) >= 2 else 0
        chosen.append(perm[:n_val] if val else perm[n_val:])
    return torch.cat(chosen).sort().values
