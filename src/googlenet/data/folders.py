"""Folders of class sub-folders: listed (listing.py), never decoded up front, each image
prepared when a batch reads it; the one rule mapping sub-folders onto class indices.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from googlenet.data.arrays import (
    MAX_BAD,
    ArrayDataset,
    check_unreadable,
    split_indices,
    stratified_indices,
    subset_index,
)
from googlenet.data.listing import list_folder
from googlenet.errors import UserError
from googlenet.transforms import Preprocess, read_image


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
        idx = subset_index(indices_or_n, len(self)).tolist()
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
        where = self.root or (self.paths[0].parent.parent if self.paths else "image folder")
        check_unreadable(where, list(self.bad.values()), len(self), self.max_bad)

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


def class_key(name: str) -> str:
    """A class name as sub-folders are matched to it: case, '_' and '-' ignored."""
    return name.strip().lower().replace("_", " ").replace("-", " ")


def _is_synset(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def _check_distinct(root: Path, subs: Sequence[str]) -> None:
    """Two sub-folders whose names match one class name are an error naming both."""
    seen: dict[str, str] = {}
    for s in subs:
        if class_key(s) in seen:
            raise UserError(
                f"{root}: sub-folders {seen[class_key(s)]!r} and {s!r} name the same class "
                "(case, '_' and '-' are ignored)"
            )
        seen[class_key(s)] = s


def _shown(names: Sequence[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def map_classes(root: Path, subs: Sequence[str], classes: Sequence[str]) -> list[int]:
    """The class index of each sub-folder of root (sorted names), matched by name with case, '_'
    and '-' ignored; an ImageNet folder of 1000 synset ids (n01440764 ...) maps in sorted
    order, the standard class order. The one rule for training's val/, shards and evaluate: a
    sub-folder that is no class is an error, a class without a sub-folder a warning."""
    _check_distinct(root, subs)
    index = {class_key(c): i for i, c in enumerate(classes)}
    found = [index.get(class_key(s)) for s in subs]
    synsets = len(subs) == len(classes) == 1000 and all(_is_synset(s) for s in subs)
    if synsets and all(i is None for i in found):
        return list(range(len(subs)))
    extra = [s for s, i in zip(subs, found, strict=True) if i is None]
    if extra:
        raise UserError(
            f"{root}: sub-folder(s) {_shown(extra)} are not training classes "
            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
        )
    used = set(found)
    missing = [c for i, c in enumerate(classes) if i not in used]
    if missing:
        warnings.warn(f"{root}: no images of class(es) {_shown(missing)}", stacklevel=3)
    return [i for i in found if i is not None]


def list_image_folder(
    root: Path, classes: Sequence[str] | None = None, cache_dir: str | Path | None = None
) -> tuple[list[Path], torch.Tensor, list[str]]:
    """(files, labels, classes) of a folder of class sub-folders (listing.list_folder order:
    by sub-folder, then name). With `classes` (the training classes, for val/) the labels are
    those of the sub-folders' names (map_classes)."""
    listing = list_folder(root, cache_dir)
    labels = torch.tensor(listing.labels, dtype=torch.int64)
    if classes is None:
        _check_distinct(root, listing.classes)
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
        keep = split_indices(labels_t, val_fraction, seed, split == "val")
        paths, labels_t = [paths[i] for i in keep.tolist()], labels_t[keep]
    if limit:
        keep = stratified_indices(labels_t, limit, seed)
        paths, labels_t = [paths[i] for i in keep.tolist()], labels_t[keep]
    if not paths:
        raise UserError(f"{root}: no image files in the class sub-folders")
    ds = ImageFolderDataset(paths, labels_t, classes, prepare, workers, max_bad, root, draft)
    return ds.materialize() if in_memory else ds
