"""WebDataset shards: write them from an image folder, stream them into training.

`write_shards(root, out)` turns `root/train/<class>/...` and `root/val/<class>/...` into
`out/train-000000.tar`, ..., `out/val-000000.tar`, ... and `out/classes.json`. Each sample is
a key, the image bytes (`.jpg` or `.png`) and the class index (`.cls`, decimal text), the
layout the `webdataset` library reads. Images are stored as they are unless `max_side` bounds
them: a photo whose longer side exceeds it is resized and re-encoded (JPEG, quality 90), which
makes decoding several times cheaper (bench/bench_decode.py). Formats other than JPEG and PNG
are stored as PNG (lossless). Training samples are written in a seeded random order, so every
shard holds a mix of classes: a streaming reader only shuffles within a buffer.

`classes.json` is written last and names every shard with its sample count; a folder without it
is an unfinished write. Unreadable images are skipped with a warning naming the file, counted in
classes.json, and the write fails only when more than `max_bad` (1%) of a split is unreadable
(arrays.check_unreadable, the rule every data set follows).
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from googlenet.data.arrays import MAX_BAD, check_unreadable
from googlenet.data.folders import map_classes
from googlenet.data.listing import list_folder
from googlenet.data.loader import BatchLoader, mix_seed
from googlenet.errors import UserError
from googlenet.files import atomic_write_text
from googlenet.transforms import decode_image, read_image_resized

SPLITS = ("train", "val")
CLASSES_FILE = "classes.json"
FORMAT = "googlenet-shards/1"
JPEG_QUALITY = 90


# --- listing -----------------------------------------------------------------------------------


def list_split(folder: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(file, class index) for every file under folder/<class>/, classes mapped by name
    (folders.map_classes, the rule training and evaluate use)."""
    listing = list_folder(folder)
    index = map_classes(folder, listing.classes, classes)
    return [(p, index[k]) for p, k in zip(listing.paths(), listing.labels, strict=True)]


# --- writing -----------------------------------------------------------------------------------


@dataclass
class SplitReport:
    samples: int = 0  # images written
    skipped: list[str] = field(default_factory=list)  # "path: reason" of each unreadable file
    reencoded: int = 0  # images resized to max_side (or converted to PNG)
    shards: dict[str, int] = field(default_factory=dict)  # shard file name -> samples in it
    bytes: int = 0  # image bytes stored


@dataclass
class ShardReport:
    out: Path
    classes: list[str]
    splits: dict[str, SplitReport]


def prepare_image(path: Path, max_side: int | None) -> tuple[str, bytes, bool]:
    """(extension, bytes to store, re-encoded?) for one image file. Decodes the whole image, so
    a truncated or corrupt file fails here (OSError/ValueError/...) rather than in training."""
    data = path.read_bytes()
    rgb = decode_image(data, str(path))  # the one decoder: its policy and limits
    with Image.open(io.BytesIO(data)) as im:  # the header again, for the format
        fmt = im.format
    big = max_side is not None and max(rgb.size) > max_side
    if not big and fmt in ("JPEG", "PNG"):
        return ("jpg" if fmt == "JPEG" else "png"), data, False
    buf = io.BytesIO()
    if big:
        assert max_side is not None
        s = max_side / max(rgb.size)
        size = (max(1, round(rgb.width * s)), max(1, round(rgb.height * s)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        rgb.save(buf, "JPEG", quality=JPEG_QUALITY)
        return "jpg", buf.getvalue(), True
    rgb.save(buf, "PNG")  # another format, kept lossless
    return "png", buf.getvalue(), True


def _prepare_or_error(path: Path, max_side: int | None) -> tuple[str, bytes, bool] | str:
    try:
        return prepare_image(path, max_side)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return str(e) if str(path) in str(e) else f"{path}: not a readable image ({e})"


def _prepare_chunk(paths: list[Path], max_side: int | None) -> list[Any]:
    return [_prepare_or_error(p, max_side) for p in paths]


def _ordered_map(
    fn: Callable[[list[Path], int | None], list[Any]],
    paths: Sequence[Path],
    max_side: int | None,
    workers: int,
    chunk: int = 64,
) -> Iterator[Any]:
    """fn over chunks of paths in `workers` processes, results in order, with a bounded number
    of chunks in flight (a million images never sit in memory at once)."""
    chunks = [list(paths[i : i + chunk]) for i in range(0, len(paths), chunk)]
    if workers <= 1:
        for c in chunks:
            yield from fn(c, max_side)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: list[Future] = []
        it = iter(chunks)
        for c in it:
            pending.append(pool.submit(fn, c, max_side))
            if len(pending) >= 4 * workers:
                break
        while pending:
            yield from pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt, max_side))


def _check_out(out: Path) -> None:
    """Refuse a folder that already holds shards: a user's data is never replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir():
        taken = [p.name for p in out.iterdir() if p.name == CLASSES_FILE or p.suffix == ".tar"]
        if taken:
            raise UserError(
                f"{out}: already holds shards ({sorted(taken)[0]}); choose a new folder"
            )


def write_shards(
    root: str | Path,
    out: str | Path,
    *,
    max_side: int | None = None,
    shard_size_mb: float = 256.0,
    seed: int = 0,
    workers: int | None = None,
    max_bad: float = MAX_BAD,
    progress: Callable[[str, int, int], None] | None = None,
) -> ShardReport:
    """Shards of root/train and root/val (one sub-folder per class) in `out`; see the module
    docstring. Classes are train's sub-folder names, sorted; val is mapped onto them by name."""
    root, out = Path(root), Path(out)
    if max_side is not None and max_side < 16:
        raise UserError(f"--max-side must be >= 16 pixels, got {max_side}")
    if not shard_size_mb > 0:
        raise UserError(f"--shard-size must be > 0 MB, got {shard_size_mb}")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise UserError(f"{root}: expected train/ and val/ sub-folders (no {split}/)")
    classes = list_folder(root / "train").classes
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    reports: dict[str, SplitReport] = {}
    for split in SPLITS:
        items = list_split(root / split, classes)
        if split == "train":  # mixed classes in every shard
            random.Random(seed).shuffle(items)
        pattern = str(out / f"{split}-%06d.tar")
        tick = functools.partial(progress, split) if progress is not None else None
        reports[split] = _write_split(items, pattern, root / split, max_side, shard_size_mb,
                                      workers, max_bad, tick)  # fmt: skip
    manifest = {
        "format": FORMAT,
        "classes": classes,
        "max_side": max_side,
        "splits": {
            s: {"samples": r.samples, "shards": r.shards, "skipped": len(r.skipped)}
            for s, r in reports.items()
        },
    }
    atomic_write_text(out / CLASSES_FILE, json.dumps(manifest, indent=1) + "\n")
    return ShardReport(out, classes, reports)


def _write_split(
    items: list[tuple[Path, int]], pattern: str, where: Path, max_side: int | None,
    shard_size_mb: float, workers: int, max_bad: float, progress: Callable[[int, int], Any] | None,
) -> SplitReport:  # fmt: skip
    """One split's (file, label) items into shards named by `pattern`, in order; unreadable
    files skipped (warned, counted) up to max_bad of them."""
    import webdataset as wds

    rep = SplitReport()
    writer = wds.ShardWriter(pattern, maxcount=10**9, maxsize=shard_size_mb * 1e6, verbose=0)
    try:
        results = _ordered_map(_prepare_chunk, [p for p, _ in items], max_side, workers)
        for i, ((_, label), res) in enumerate(zip(items, results, strict=True)):
            if isinstance(res, str):
                rep.skipped.append(res)
                warnings.warn(f"skipping {res}", stacklevel=3)
                check_unreadable(where, rep.skipped, len(items), max_bad)
                continue
            ext, data, reencoded = res
            writer.write({"__key__": f"{rep.samples:09d}", ext: data, "cls": str(label)})
            name = Path(writer.fname).name
            rep.shards[name] = rep.shards.get(name, 0) + 1
            rep.samples += 1
            rep.bytes += len(data)
            rep.reencoded += reencoded
            if progress is not None and (i + 1) % 1000 == 0:
                progress(i + 1, len(items))
    finally:
        writer.close()
    if rep.samples == 0 and items:
        raise UserError(f"{where}: no readable images")
    return rep


# --- reading -----------------------------------------------------------------------------------


@dataclass
class ShardIndex:
    """What classes.json says about a shard folder (or URL prefix)."""

    base: str  # folder or URL the shard names are relative to
    classes: list[str]
    splits: dict[str, dict[str, Any]]  # split -> {"samples": N, "shards": {name: count}}

    def urls(self, split: str) -> list[str]:
        return [_join(self.base, name) for name in self.splits[split]["shards"]]

    def samples(self, split: str) -> int:
        return int(self.splits[split]["samples"])


def _join(base: str, name: str) -> str:
    return (
        str(Path(base) / name)
        if "://" not in base and not base.startswith("pipe:")
        else (base.rstrip("/") + "/" + name)
    )


def read_index(base: str | Path) -> ShardIndex:
    """classes.json of a shard folder, a URL (http(s)://, gs://, ... read through webdataset's
    gopen) or a `pipe:` command prefix."""
    base = str(base)
    where = _join(base, CLASSES_FILE)
    try:
        if "://" in base or base.startswith("pipe:"):
            import webdataset as wds

            with wds.gopen(where, "rb") as f:
                text = f.read().decode("utf-8")
        else:
            text = Path(where).read_text(encoding="utf-8")
        meta = json.loads(text)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{where}: cannot read the shard index ({e}); write shards with `googlenet shards`"
        ) from e
    try:
        if meta.get("format") != FORMAT:
            raise KeyError("format")
        classes = [str(c) for c in meta["classes"]]
        splits = {s: dict(meta["splits"][s]) for s in SPLITS}
        for s in SPLITS:
            splits[s]["shards"] = {str(k): int(v) for k, v in splits[s]["shards"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{where}: not a {FORMAT} index (bad or missing {e})") from e
    return ShardIndex(base, classes, splits)


class ShardSet:
    """One split of a shard folder, standing in for a data set: len, classes, the shard URLs
    and their sample counts. It is read as a stream, whole: classes.json knows no sample's
    label, so there is no seeded stratified subset of it (check_options)."""

    def __init__(self, index: ShardIndex, split: str, max_bad: float = MAX_BAD) -> None:
        self.index, self.split, self.max_bad = index, split, max_bad
        self.classes = index.classes
        self.urls = index.urls(split)
        self.counts = list(index.splits[split]["shards"].values())  # samples per shard
        self.bad: list[str] = []  # unreadable samples met so far (messages)

    def __len__(self) -> int:
        return self.index.samples(self.split)

    def note_bad(self, errors: Sequence[str]) -> None:
        """Warn about unreadable samples; UserError once more than max_bad of the split is."""
        for e in errors:
            warnings.warn(f"skipping {e}", stacklevel=2)
        self.bad += errors
        check_unreadable(
            self.index.base, self.bad, len(self), self.max_bad, f"{self.split} samples"
        )


def load_shards(base: str | Path, max_bad: float = MAX_BAD) -> tuple[ShardSet, ShardSet]:
    """(train, val) of a shard folder or URL written by `googlenet shards`; more than max_bad
    (config max_bad_images) of a split unreadable stops the run."""
    index = read_index(base)
    return ShardSet(index, "train", max_bad), ShardSet(index, "val", max_bad)


def check_options(dataset: str, holdout: int, limit_train: int, limit_val: int) -> None:
    """Shards are streamed and their index counts samples per shard, not per class: holdout and
    the limits (seeded, stratified samples) cannot be drawn from them, so they are refused, not
    ignored (config validation and training both call this)."""
    if dataset != "shards":
        return
    for key, value in (
        ("holdout", holdout),
        ("limit_train", limit_train),
        ("limit_val", limit_val),
    ):
        if value:
            raise UserError(
                f"config key {key!r}: not available with dataset 'shards' (a stream has no "
                "seeded stratified sample); train from the image folder, or shard a smaller one"
            )


class ShardLoader(BatchLoader):
    """BatchLoader's batches from streamed shards: `workers` DataLoader processes each read
    their share of this rank's shards with webdataset and decode whole batches; the batch step
    (augmentation, resize, normalisation) runs here, on the training device, as for any data set.

    Training (shuffle=True): shards are dealt to ranks and workers from an endless stream of
    passes, each pass in a seeded order, and samples are shuffled in a buffer; an epoch is
    exactly len(self) = samples // (batch x ranks) batches on every rank, so DDP ranks stay in
    step. With one rank and one stream an epoch is each sample once (plus nothing, when the
    batch divides the samples). Evaluation: one pass, each sample exactly once over all ranks.
    Everything is a function of (seed, epoch, rank, worker): the same run repeats exactly with
    the same number of ranks and workers. An unreadable image is skipped and counted (an error
    past the set's max_bad); an unreadable shard stops the run naming it.
    """

    def __init__(
        self, dataset: ShardSet, batch_size: int, *, size: int, buffer: int = 2000, **kw: Any
    ) -> None:
        super().__init__(dataset, batch_size, **kw)  # type: ignore[arg-type]
        if len(dataset.urls) < self.world_size:
            raise UserError(
                f"{dataset.index.base}: {len(dataset.urls)} {dataset.split} shards cannot feed "
                f"{self.world_size} ranks; write smaller shards (googlenet shards --shard-size)"
            )
        self.size, self.buffer = size, buffer

    def indices(self) -> torch.Tensor:
        raise UserError("streamed shards have no random access")

    def _streams(self) -> int:
        """Reading processes for this rank: at most one per shard it gets."""
        mine = len(self.dataset.urls[self.rank :: self.world_size])  # type: ignore[attr-defined]
        return max(0, min(self.workers, mine))

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.shuffle:
            return n // (self.batch_size * self.world_size)
        ds: ShardSet = self.dataset  # type: ignore[assignment]
        counts = ds.counts[self.rank :: self.world_size]
        k = max(1, self._streams())
        return sum(-(-sum(counts[w::k]) // self.batch_size) for w in range(k))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds: ShardSet = self.dataset  # type: ignore[assignment]
        stream = _ShardStream(ds.urls, self.batch_size, self.size, self.shuffle, self.seed,
                              self.epoch, self.rank, self.world_size, self.buffer)  # fmt: skip
        k = self._streams()
        if k:
            from torch.utils.data import DataLoader

            batches: Iterable[Any] = DataLoader(
                stream,
                batch_size=None,
                num_workers=k,
                # spawn, not fork: a child forked after torch's OpenMP threads started can
                # spin forever in their barrier (seen: a CI run hung in the val workers)
                multiprocessing_context="spawn",
                prefetch_factor=4,
                pin_memory=self.device.type == "cuda",
            )
        else:
            batches = stream
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank, 1))
        steps = len(self) if self.shuffle else None
        n = 0
        for images, labels, bad in batches:
            if bad:
                ds.note_bad(bad)
            if len(labels):
                yield self.transform(images, g, size=self.side(n)), labels.to(self.device)
                n += 1
            if steps is not None and n >= steps:
                break
        if steps is not None and n < steps:
            raise UserError(f"{ds.index.base}: the {ds.split} shards ran dry after {n} batches")


class _ShardStream(torch.utils.data.IterableDataset):
    """One rank's stream of (uint8 images B x 3 x S x S, labels B, unreadable: list[str]),
    read with webdataset: shards split by rank and then by DataLoader worker, samples shuffled
    in a buffer (training), decoded and resized to S x S by the project's image decoder."""

    def __init__(self, urls: list[str], batch: int, size: int, train: bool, seed: int,
                 epoch: int, rank: int, world: int, buffer: int) -> None:  # fmt: skip
        super().__init__()
        self.urls, self.batch, self.size, self.train = urls, batch, size, train
        self.seed, self.epoch, self.rank, self.world, self.buffer = seed, epoch, rank, world, buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        yield from self._batches(self._samples())

    def _samples(self) -> Iterator[dict[str, Any]]:
        """Evaluation: one pass over the shards in order. Training: endless passes, each in a
        new seeded shard order with its own shuffle buffer (a buffer never mixes two passes,
        so one stream's first pass is exactly each sample once)."""
        import webdataset as wds
        from webdataset.filters import _shuffle
        from webdataset.utils import pytorch_worker_info

        worker = pytorch_worker_info()[2]
        rank, world = self.rank, self.world
        p = 0
        while True:
            urls = list(self.urls)
            if self.train:
                random.Random(mix_seed(self.seed, self.epoch, p)).shuffle(urls)
            stages: list[Any] = [
                wds.SimpleShardList(urls[rank::world]),  # this rank's shards ...
                wds.split_by_worker,  # ... and this DataLoader worker's share of them
                wds.tarfile_to_samples(),  # an unreadable shard stops the run, naming its URL
            ]
            if self.train:
                rng = random.Random(mix_seed(self.seed, self.epoch, rank, worker, p, 2))
                stages.append(lambda src, r=rng: _shuffle(src, self.buffer, self.buffer, r))
            yield from wds.DataPipeline(*stages)
            if not self.train:
                return
            p += 1

    def _batches(self, samples: Iterable[dict[str, Any]]) -> Iterator[Any]:
        out = torch.empty(self.batch, 3, self.size, self.size, dtype=torch.uint8)
        labels: list[int] = []
        bad: list[str] = []
        for s in samples:
            where = f"{s.get('__url__', '?')}:{s.get('__key__', '?')}"
            data = s.get("jpg", s.get("png"))
            try:
                if data is None or "cls" not in s:
                    raise UserError(f"{where}: sample without .jpg/.png and .cls")
                label = int(s["cls"])
                out[len(labels)] = read_image_resized(data, self.size, name=where)
            except (UserError, ValueError) as e:
                bad.append(str(e))
                continue
            labels.append(label)
            if len(labels) == self.batch:
                yield out.clone(), torch.tensor(labels, dtype=torch.int64), bad
                labels, bad = [], []
        if labels or bad:
            yield out[: len(labels)].clone(), torch.tensor(labels, dtype=torch.int64), bad
