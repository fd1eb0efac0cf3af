"""The batch loader: indices -> (augmented, resized, normalised float batch, labels).

`BatchLoader` gathers a batch of indices from a dataset (uint8 images), applies augmentation as
batch tensor ops (augment.py), then resizes on the fly to the model's input size, so a resized
copy of a dataset never exists. Order and augmentation come from a torch.Generator seeded from
(seed, epoch, rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from googlenet.data.augment import Augment, crop_flip, cutout, photometric, scale_aspect_boxes
from googlenet.errors import UserError
from googlenet.transforms import Preprocess, full_box, resample


class Dataset(Protocol):
    """What BatchLoader needs: a length, labels, and uint8 images for a batch of indices."""

    labels: torch.Tensor
    classes: list[str]
    prepared: Preprocess | None  # geometry already applied to the stored images, if any

    def __len__(self) -> int: ...

    def get_images(self, idx: torch.Tensor) -> torch.Tensor: ...


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from several integers (stable across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchLoader:
    """Batches of (x float32 N x 3 x input_size x input_size normalised, y int64) from a dataset.

    Order and augmentation are a pure function of (seed, epoch, rank): call set_epoch(e) before
    each epoch (set_epoch(e, i, state) to continue an interrupted one at batch i). With
    world_size > 1 each rank iterates a disjoint slice of the same permutation; with drop_last
    all ranks get the same number of batches, and without it (evaluation) every sample is seen
    exactly once across ranks.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        preprocess: Preprocess,
        augment: Augment | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.preprocess = preprocess  # validation: exactly this; training: its size and stats
        self.input_size = preprocess.input_size
        # (side, end step) pairs in order: the run's batches before each end step are cropped
        # to its smaller side (config train_crop*); empty: every batch at input_size
        self.small: list[tuple[int, int]] = []
        self.augment = augment
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        # Processes decoding batches ahead of the training step, for data sets that decode
        # files (they have load_batch); 0: decode in this process when the batch is needed.
        self.workers = workers
        self.epoch = 0
        self.start = 0  # first batch of the next iteration (set_epoch)
        self._resume_state: torch.Tensor | None = None
        self.generator: torch.Generator | None = None  # the current iteration's augmentation RNG
        self.mean = torch.tensor(preprocess.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std, device=self.device).view(1, 3, 1, 1)

    def set_epoch(
        self, epoch: int, start: int = 0, generator_state: torch.Tensor | None = None
    ) -> None:
        """Selects the epoch whose order and augmentation the next iteration produces. A run
        resumed mid-epoch passes the batch to start at and the augmentation generator's state
        saved there (`generator.get_state()` after the previous batch), and gets exactly the
        batches the uninterrupted run would have seen."""
        self.epoch = int(epoch)
        self.start = int(start)
        self._resume_state = generator_state

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order."""
        n = len(self.dataset)
        if self.shuffle:  # the same permutation on every rank, so the slices are disjoint
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
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
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank, 1))
        if self.start and self._resume_state is not None:
            g.set_state(self._resume_state)
        self.generator = g
        labels = self.dataset.labels
        phase = None
        if self.augment is not None and self.augment.flip and self.augment.alternate_flip:
            # airbench's deterministic flips: a random phase per image, then every other epoch,
            # so over two epochs each image is seen both ways.
            pg = torch.Generator().manual_seed(mix_seed(self.seed, 2))
            phase = torch.rand(len(self.dataset), generator=pg) < 0.5
        size = self.batch_size
        batches = [idx[i * size : (i + 1) * size] for i in range(self.start, len(self))]
        self.yielded: list[torch.Tensor] = []  # sample indices of the batches, as yielded
        fetched = zip(batches, self._fetch(batches), strict=True)
        for i, (b, (images, ok, errors)) in enumerate(fetched, self.start):
            if errors:  # unreadable files: dropped from the batch, counted by the data set
                self.dataset.note_bad(b[~ok], errors)  # type: ignore[attr-defined]
                b = b[ok]
                if not len(b):
                    continue
            flip = None if phase is None else phase[b] ^ bool(self.epoch % 2)
            self.yielded.append(b)
            yield self.transform(images, g, flip, self.side(i)), labels[b].to(self.device)

    def _fetch(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, Any, list]]:
        """(uint8 images, readable mask, errors) per batch, in order; decoded in `workers`
        processes ahead of use when the data set decodes files, else read here."""
        ds = self.dataset
        if not hasattr(ds, "load_batch"):  # in memory: nothing can fail, nothing to overlap
            for b in batches:
                yield ds.get_images(b), None, []
            return
        if self.workers <= 0 or len(batches) <= 1:
            for b in batches:
                yield ds.load_batch(b)
            return
        from torch.utils.data import DataLoader

        yield from DataLoader(
            _BatchDecode(ds, batches),
            batch_size=None,  # each item is already a batch
            num_workers=min(self.workers, len(batches)),
            prefetch_factor=2,
            pin_memory=self.device.type == "cuda",
        )

    def side(self, i: int) -> int:
        """The training side of batch i of the current epoch."""
        step = self.epoch * len(self) + i
        return next((side for side, end in self.small if step < end), self.input_size)

    def transform(
        self,
        images: torch.Tensor,
        g: torch.Generator,
        flip: torch.Tensor | None = None,
        size: int = 0,
    ) -> torch.Tensor:
        """uint8 B x 3 x H x W -> normalised float32 B x 3 x S x S: exactly `preprocess` without
        augmentation; with it, augmented and resized to S (`flip`: given per-sample flips).

        Augmented, pixel-wise work (photometric, normalisation, cutout) runs at the source
        resolution and the resize comes last: resampling weights sum to 1, so normalising
        first is exact and the S x S batch is written once."""
        aug = self.augment
        x = images.to(self.device, non_blocking=True)
        if aug is None:
            x = self.preprocess(x)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        b, _, h, w = x.shape
        size = size or self.input_size
        if flip is None and aug.flip:
            flip = torch.rand(b, generator=g) < 0.5
        box = None
        if aug.scale_aspect:
            box = scale_aspect_boxes(b, h, w, aug.min_area, g)
        else:
            # A source larger than the input is randomly cropped to it (images are stored at
            # the working size: the whole image at the target scale, see datasets.py).
            crop = (min(h, size), min(w, size))
            # train_crop crops come from the unpadded image: they have slack enough, and padding
            # them too cost 3.7 points (docs/results.md, 24 from 32 pixels)
            pad = aug.crop_padding if size >= self.input_size else 0
            if pad or flip is not None or crop != (h, w):
                x = crop_flip(x, pad, flip, aug.padding_mode, g, crop)
                flip = None  # done
            b, _, h, w = x.shape
        x = x.float().mul_(1 / 255)
        if aug.photometric:
            x = photometric(x, aug.jitter, aug.lighting, g)
        x = (x - self.mean) / self.std
        if aug.cutout:
            x = cutout(x, aug.cutout, torch.zeros(3, device=self.device), g)
        if box is not None or (h, w) != (size, size):
            box = box if box is not None else full_box(b, h, w)
            x = resample(x, box, (size, size), flip, self.channels_last)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class _BatchDecode(torch.utils.data.Dataset):
    """Batch i of an epoch decoded by data set's load_batch, in a DataLoader worker process
    (one thread each: the workers are the parallelism)."""

    def __init__(self, dataset: Any, batches: list[torch.Tensor]) -> None:
        self.dataset, self.batches = dataset, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        return self.dataset.load_batch(self.batches[i], threads=False)
