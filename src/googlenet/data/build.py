"""Building a run's data sets: training and validation from the config's data keys, and the
validation set a checkpoint recorded, rebuilt for evaluate and the report by the same functions.

Training calls `setup_data` (load_data, then hold_out_split and the limits, then check_labels).
Replaying a run's validation (`recorded_val_set`, `eval_batches`) calls load_split and
hold_out_split with the run's recorded config, so the images, their order and their seeded
samples are the ones training validated on by construction, not by a second copy of the rules.
The config arrives as a DataConfig: the data keys of a TrainConfig or of a checkpoint's recorded
config dict (data/ does not import training/).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from googlenet.checkpoint import CheckpointMeta
from googlenet.data.arrays import hold_out, norm_stats, resolve_data_root, stratified_indices
from googlenet.errors import UserError
from googlenet.transforms import Preprocess, working_size

Batch = tuple[Tensor, Tensor, list[int]]  # uint8 images, labels, their sample indices


@dataclass(frozen=True)
class DataConfig:
    """The config keys that choose a run's data (TrainConfig's names and defaults)."""

    dataset: str = "cifar10"
    data_root: str = ""
    variant: str = "cifar"
    input_size: int = 32
    resize: int = 0
    limit_train: int = 0
    limit_val: int = 0
    holdout: int = 0
    seed: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    max_bad_images: float = 0.01
    batch_size: int = 128
    num_classes: int = 0

    @classmethod
    def of(cls, cfg: Any) -> DataConfig:
        """From a TrainConfig (or any object with these attributes) or a recorded config dict;
        keys an older checkpoint lacks take the defaults."""
        if isinstance(cfg, DataConfig):
            return cfg
        get = cfg.get if isinstance(cfg, Mapping) else lambda k, d: getattr(cfg, k, d)
        values = {f.name: get(f.name, f.default) for f in fields(cls)}
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(**values)


# --- training ---------------------------------------------------------------------------------


@dataclass
class Data:
    """The datasets as training and validation see them, and how images become tensors."""

    train_set: Any
    val_set: Any
    val_pp: Preprocess  # recorded in every checkpoint, as validation uses it
    loader_pp: Preprocess  # what the loaders apply (less where images are stored prepared)
    record: dict[str, Any]  # where the validation images come from (checkpoint metadata)
    classes: list[str]
    num_classes: int

    @property
    def size(self) -> int:
        """The side validation feeds the model."""
        return self.val_pp.input_size


def working_side(resize: int, size: int) -> int:
    """Folder/shard images are stored as this square before the input_size crop: `resize`,
    else transforms.working_size (8/7 of the input, offsets composing exactly)."""
    return resize or working_size(size)


def limited(ds: Any, n: int, seed: int) -> Any:
    """A seeded class-stratified sample of n of ds (limit_train / limit_val; 0: all of it)."""
    return ds.subset(stratified_indices(ds.labels, n, seed)) if n else ds


def _folder_dirs(root: Path) -> tuple[Path, Path]:
    """(train/, val/ or else test/) of a folder data root."""
    if not (root / "train").is_dir():
        raise UserError(f"{root}: dataset 'folder' expects train/ and val/ sub-folders")
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not val_dir.is_dir():
        raise UserError(f"{root}: dataset 'folder' expects a val/ (or test/) sub-folder")
    return root / "train", val_dir


def load_split(
    cfg: DataConfig,
    root: Path,
    split: str,
    prepare: Preprocess,
    *,
    classes: Sequence[str] | None = None,
    out: Path | None = None,
    download: bool = False,
) -> Any:
    """The training ("train") or validation ("val": CIFAR's test split, a folder's val/) data
    of a CIFAR or folder run under `root`, with its seeded limit. Folder images are listed (the
    listing cached in `out`) and prepared when read: training ones as the working square
    (prepare.working()), validation ones exactly as `prepare` says, so validation and
    `googlenet evaluate` see the same pixels; `classes` maps val/ (the training classes)."""
    from googlenet.data import cifar, folders

    train = split == "train"
    limit = cfg.limit_train if train else cfg.limit_val
    if cfg.dataset in ("cifar10", "cifar100"):
        ds = cifar.load_cifar(root, cfg.dataset, "train" if train else "test", download=download)
        return limited(ds, limit, cfg.seed)
    train_dir, val_dir = _folder_dirs(root)
    return folders.load_image_folder(
        train_dir if train else val_dir, size=prepare.working() if train else prepare,
        classes=None if train else classes, limit=limit, seed=cfg.seed, draft=train,
        cache_dir=out, max_bad=cfg.max_bad_images,
    )  # fmt: skip


def load_data(
    cfg: DataConfig, data_root: str | Path | None, prepare: Preprocess, out: Path
) -> tuple[Any, Any, dict[str, Any]]:
    """(train set, validation set, what the validation set is) per cfg (load_split's)."""
    if cfg.dataset == "shards":  # a folder or a URL prefix holding classes.json
        from googlenet.data.shards import check_options, load_shards

        check_options(cfg.dataset, cfg.holdout, cfg.limit_train, cfg.limit_val)
        base = data_root or cfg.data_root or resolve_data_root(None)
        shards = load_shards(base, cfg.max_bad_images)
        return shards[0], shards[1], {"dataset": "shards"}
    root = resolve_data_root(data_root or cfg.data_root or None)
    # download=True: a fresh machine fetches the official archive (MD5-checked).
    train_set = load_split(cfg, root, "train", prepare, out=out, download=True)
    val_set = load_split(cfg, root, "val", prepare, classes=train_set.classes, out=out)
    if cfg.dataset in ("cifar10", "cifar100"):
        record = {"dataset": cfg.dataset, "split": "test", "root": str(root.resolve())}
    else:
        record = {"dataset": "folder", "root": str(_folder_dirs(root)[1].resolve())}
    return train_set, val_set, record | {"limit": cfg.limit_val, "seed": cfg.seed}


def hold_out_split(cfg: DataConfig, train_set: Any) -> tuple[Any, Any]:
    """(training images, validation images) of a holdout run: cfg.holdout images held out of
    train_set (seeded, stratified), each part then limited as configured."""
    rest, held = hold_out(train_set, cfg.holdout, cfg.seed)
    return limited(rest, cfg.limit_train, cfg.seed), limited(held, cfg.limit_val, cfg.seed)


def setup_data(
    cfg: Any, out: Path, train_set: Any, val_set: Any, data_root: str | Path | None
) -> Data:
    """Load (or take) the datasets, hold out / limit them as configured, check the labels.
    `cfg`: a TrainConfig or DataConfig."""
    from googlenet.model import get_spec

    cfg = DataConfig.of(cfg)
    # What validation feeds the model; recorded in every checkpoint as it is used.
    size = cfg.input_size or get_spec(cfg.variant).input_size
    mean, std = norm_stats(cfg.dataset)
    mean, std = tuple(cfg.mean) or mean, tuple(cfg.std) or std  # e.g. from an init checkpoint
    stored = cfg.dataset in ("folder", "shards")  # kept as working squares, not whole files
    if stored and working_side(cfg.resize, size) < size:
        raise UserError(f"config key 'resize': {cfg.resize} is below the input size {size}")
    val_pp = Preprocess(size, mean, std, working_side(cfg.resize, size) if stored else size)
    record: dict[str, Any] = {"dataset": "given"}
    if train_set is None or val_set is None:
        loaded = load_data(cfg, data_root, val_pp, out)
        train_set = train_set if train_set is not None else loaded[0]
        val_set = val_set if val_set is not None else loaded[1]
        record = loaded[2]
    if cfg.holdout:  # validate on held-out training images, not the test set
        train_set, val_set = hold_out_split(cfg, train_set)
        root = record.get("root")  # evaluate/report rebuild the split from it
        record = {"dataset": "holdout", "holdout": cfg.holdout, "seed": cfg.seed}
        record |= {"root": root} if root else {}
    elif record["dataset"] == "given":
        train_set = limited(train_set, cfg.limit_train, cfg.seed)
        val_set = limited(val_set, cfg.limit_val, cfg.seed)
    # Images stored already prepared (folders, shards) only need the crop and normalisation.
    prepared = getattr(val_set, "prepared", None)
    loader_pp = val_pp
    if prepared is not None:
        val_pp = Preprocess(size, mean, std, prepared.resize)
        loader_pp = Preprocess(size, mean, std, None)
    elif cfg.dataset == "shards":
        loader_pp = Preprocess(size, mean, std, None)
    if len(train_set) < cfg.batch_size:
        raise UserError(
            f"config key 'batch_size': {cfg.batch_size} is larger than the "
            f"{len(train_set)} training images"
        )
    classes, num_classes = check_labels(cfg, train_set, val_set)
    return Data(train_set, val_set, val_pp, loader_pp, record, classes, num_classes)


def check_labels(cfg: DataConfig, train_set: Any, val_set: Any) -> tuple[list[str], int]:
    """(class names, num_classes), with num_classes checked against the data before any step."""
    labels = getattr(train_set, "labels", None)  # streamed shards know only their classes
    n_seen = int(labels.max()) + 1 if labels is not None and len(labels) else 0
    classes = list(train_set.classes) or [str(i) for i in range(n_seen)]
    num_classes = cfg.num_classes or len(classes)
    if num_classes != len(classes) or n_seen > num_classes:
        shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
        raise UserError(
            f"config key 'num_classes': {num_classes}, but the training data has "
            f"{len(classes)} classes ({shown})"
        )
    val_labels = getattr(val_set, "labels", None)
    if val_labels is not None and len(val_labels) and int(val_labels.max()) >= num_classes:
        raise UserError(f"validation labels go up to {int(val_labels.max())}, "
                        f"but there are {num_classes} classes")  # fmt: skip
    return classes, num_classes


# --- replaying a run's validation (evaluate, the report) ---------------------------------------


class Recorded(Protocol):
    """A loaded checkpoint as replay needs it (infer's Member): its metadata and its name."""

    meta: CheckpointMeta
    name: str


def _replay_config(meta: CheckpointMeta, cfg: Mapping[str, Any], limit: int | None) -> DataConfig:
    """The run's data keys: its recorded config, with what its validation record says."""
    rec = meta.validation.data if meta.validation is not None else {}
    dc = DataConfig.of(cfg)
    dc = dataclasses.replace(dc, dataset=meta.dataset, seed=int(rec.get("seed", 0)))
    if rec.get("dataset") == "holdout":
        return dataclasses.replace(dc, holdout=int(rec["holdout"]))
    recorded = int(rec.get("limit") or 0)
    return dataclasses.replace(dc, limit_val=recorded if limit is None else limit, holdout=0)


def recorded_val_set(
    meta: CheckpointMeta,
    cfg: Mapping[str, Any],
    data: str | Path | None,
    limit: int | None = None,
) -> Any:
    """The validation set a run validated on, rebuilt with training's own functions (load_split,
    hold_out_split) from its recorded config: CIFAR's test split or a folder's val/ (each with
    its seeded limit; `limit` overrides it), or the training images it held out. None when it
    cannot be rebuilt here (arrays handed to train(), shards). `data`: the data root."""
    rec = meta.validation.data if meta.validation is not None else {}
    kind, name = rec.get("dataset"), meta.dataset
    if name not in ("cifar10", "cifar100", "folder") or kind not in (name, "holdout"):
        return None
    named = data or rec.get("root") or cfg.get("data_root")
    if kind == "holdout" and not named:  # held out from arrays handed to train()
        return None
    dc = _replay_config(meta, cfg, limit)
    root = resolve_data_root(named or None)
    if name == "folder" and not data and rec.get("root"):  # a folder run records its val/
        root = root.parent
    pp = meta.preprocess
    if kind == "holdout":
        return hold_out_split(dc, load_split(dc, root, "train", pp))[1]
    return load_split(dc, root, "val", pp, classes=meta.classes)


def eval_batches(
    first: Recorded,
    data: str | Path | None,
    batch_size: int,
    limit: int | None = None,
    seed: int = 0,
    kw: dict[str, Any] | None = None,
    prepare: Preprocess | None = None,
) -> tuple[Iterator[Batch], int, bool]:
    """(uint8 images, labels, sample indices) batches, their number, and whether the images
    come prepared by `prepare` (folders only): the recorded validation images of `first`'s run
    when `data` is None and it recorded them (recorded_val_set), else the test split of its
    data set (CIFAR under the data root `data`) or a folder of class sub-folders. `limit`: a
    seeded class-stratified sample. Skipped files and the files' paths go into kw."""
    from googlenet.data.cifar import load_cifar
    from googlenet.data.folders import class_key, list_image_folder

    kw = kw if kw is not None else {}
    val = first.meta.validation
    kind = val.data.get("dataset") if val is not None and data is None else None
    if kind is not None:
        ds = recorded_val_set(first.meta, first.meta.config, None, limit)
        if ds is not None:
            return _set_batches(ds, batch_size, kw, prepare)
        if kind == "holdout":  # never the test split in its place
            raise UserError(
                f"{first.name}: validated on held-out {first.meta.dataset} training images, "
                "which cannot be rebuilt here; give --data to evaluate on a data set"
            )
    root = resolve_data_root(data)
    is_folder = data is not None and _has_class_folders(root, first)
    if first.meta.dataset in ("cifar10", "cifar100") and not is_folder:
        ds = load_cifar(root, first.meta.dataset, "test")
        if [class_key(c) for c in ds.classes] != [class_key(c) for c in first.meta.classes]:
            raise UserError(
                f"{first.name}: classes {first.meta.classes} differ from "
                f"{first.meta.dataset}'s {ds.classes}"
            )
        return _set_batches(limited(ds, limit or 0, seed), batch_size, kw, prepare)
    if not root.is_dir():
        raise UserError(
            f"{root}: no such folder; for a {first.meta.dataset} checkpoint give "
            "--data pointing at a folder of class sub-folders"
        )
    paths, labels, _ = list_image_folder(root, first.meta.classes)
    if not paths:
        raise UserError(f"{root}: the class sub-folders hold no files")
    if limit is not None and limit < len(paths):
        keep = stratified_indices(labels, limit, seed)
        paths, labels = [paths[i] for i in keep.tolist()], labels[keep]
    return _folder_set_batches(paths, labels, batch_size, kw, prepare)


def _has_class_folders(root: Path, first: Recorded) -> bool:
    """Whether `data` names a folder of class sub-folders rather than a CIFAR data root."""
    from googlenet.data.folders import class_key

    if not root.is_dir():
        return False
    classes = first.meta.classes
    names = {class_key(c) for c in classes}
    subs = [p.name for p in root.iterdir() if p.is_dir()]
    return any(class_key(s) in names for s in subs) or (
        len(subs) == len(classes) == 1000 and all(s.startswith("n") for s in subs)
    )


def _set_batches(
    ds: Any, batch_size: int, kw: dict[str, Any], prepare: Preprocess | None
) -> tuple[Iterator[Batch], int, bool]:
    """eval_batches' answer for a built data set: arrays as they are, folders from their files
    (prepared as training prepared them when `prepare` is given)."""
    if hasattr(ds, "images"):
        return array_batches(ds.images, ds.labels, batch_size), len(ds), False
    if prepare is not None and ds.prepared != prepare:  # held out of the working squares
        kw["skipped"], kw["paths"] = [], [str(p) for p in ds.paths]
        return _loaded_batches(ds, batch_size, kw["skipped"]), len(ds), True
    return _folder_set_batches(ds.paths, ds.labels, batch_size, kw, prepare)


def _folder_set_batches(
    paths: Sequence[Path], labels: Tensor, batch_size: int, kw: dict[str, Any],
    prepare: Preprocess | None,
) -> tuple[Iterator[Batch], int, bool]:  # fmt: skip
    samples = list(zip(paths, labels.tolist(), strict=True))
    kw["skipped"], kw["paths"] = [], [str(p) for p in paths]
    batches = folder_batches(samples, batch_size, kw["skipped"], prepare)
    return batches, len(samples), prepare is not None


def _loaded_batches(ds: Any, batch_size: int, skipped: list[str]) -> Iterator[Batch]:
    """Batches of a folder data set read as training reads it (its own preparation)."""
    for i in range(0, len(ds), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(ds)))
        images, ok, errors = ds.load_batch(idx)
        for e in errors:
            skipped.append(e)
            print(f"googlenet evaluate: skipped {e}", file=sys.stderr)
        yield images, ds.labels[idx[ok]], idx[ok].tolist()


def folder_batches(
    samples: Sequence[tuple[Path, int]],
    batch_size: int,
    skipped: list[str],
    prepare: Preprocess | None = None,
) -> Iterator[Batch]:
    """Batches read from files; unreadable files go to `skipped`. With `prepare` each image is
    prepared as training prepares validation images (folders.prepare_image: the same pixels),
    otherwise a photo folder mixes sizes and each group of batch_size files is split by size."""
    from googlenet.data.folders import prepare_image
    from googlenet.transforms import read_image

    for i in range(0, len(samples), batch_size):
        groups: dict[tuple[int, int], tuple[list[Tensor], list[int], list[int]]] = {}
        for j, (path, label) in enumerate(samples[i : i + batch_size], start=i):
            try:
                img = prepare_image(path, prepare) if prepare else read_image(path)
            except (UserError, OSError, ValueError) as e:
                skipped.append(str(e) if str(path) in str(e) else f"{path}: {e}")
                print(f"googlenet evaluate: skipped {skipped[-1]}", file=sys.stderr)
                continue
            imgs, labels, ids = groups.setdefault(tuple(img.shape[-2:]), ([], [], []))
            imgs.append(img)
            labels.append(label)
            ids.append(j)
        for imgs, labels, ids in groups.values():
            yield torch.stack(imgs), torch.tensor(labels), ids


def array_batches(images: Tensor, labels: Tensor, batch_size: int) -> Iterator[Batch]:
    for i in range(0, images.shape[0], batch_size):
        n = min(batch_size, images.shape[0] - i)
        yield images[i : i + n], labels[i : i + n], list(range(i, i + n))
