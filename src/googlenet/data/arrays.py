"""Data in memory and how it is sampled: ArrayDataset (uint8 NCHW tensors, e.g. CIFAR-10 at
~180 MB), the seeded stratified samples (limits, the hold-out split, the folder val split), the
normalisation statistics and the data folder. Every data set, in memory or streamed, gives
BatchLoader (loader.py) the same interface: len, labels, classes and get_images(indices).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
)

DATA_ENV = "GOOGLENET_DATA"
MAX_BAD = 0.01  # the share of a data set that may be unreadable (config key max_bad_images)


def resolve_data_root(path: str | Path | None) -> Path:
    """The data folder: `path` (the --data option), else $GOOGLENET_DATA, else ./data."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path("data")


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
        idx = subset_index(indices_or_n, len(self))
        return ArrayDataset(
            self.images[idx].contiguous(), self.labels[idx].clone(), self.classes, self.prepared
        )

    def get_images(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images at `idx` (the interface BatchLoader reads through)."""
        return self.images[idx]


def subset_index(indices_or_n: int | Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
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


def split_indices(labels: torch.Tensor, fraction: float, seed: int, val: bool) -> torch.Tensor:
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


def check_unreadable(
    where: Any, bad: Sequence[str], total: int, max_bad: float, what: str = "images"
) -> None:
    """The one "too many unreadable images" rule (image folders, writing shards, streaming
    them): UserError once more than `max_bad` of `total` are unreadable, naming the first."""
    if len(bad) > max_bad * total:
        raise UserError(
            f"{where}: {len(bad)} of {total} {what} are unreadable (more than {max_bad:.0%}), "
            f"e.g. {bad[0]}"
        )
