"""Evaluate checkpoints: top-1/top-5, per-class accuracy, confusion matrix, test-time
augmentation (TTA, in tta.py) and ensembles (softmax averaged over models, as the paper did).

"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from googlenet.checkpoint import CheckpointMeta, load_model
from googlenet.devices import make_runner, pick_device, pick_dtype
from googlenet.errors import UserError
from googlenet.metrics import EvalResult, Metrics, write_predictions
from googlenet.transforms import (
    Preprocess,
)
from googlenet.tta import INPUT_MODES, TTA_MODES, ensemble_probs

Batch = tuple[Tensor, Tensor, list[int]]  # uint8 images, labels, their sample indices


def evaluate_batches(
    runners: Sequence[tuple[Callable[[Tensor], Tensor], Preprocess]],
    batches: Iterable[Batch],
    classes: list[str],
    mode: str = "none",
    max_crops: int = 256,
    **result_kw: Any,
) -> EvalResult:
    """Evaluate an ensemble (one runner = one model) on (uint8 images, labels, indices)
    batches; the per-image predictions come back in sample order."""
    acc = Metrics(len(classes))
    rows: list[tuple[int, int, int, float]] = []
    for images, labels, ids in batches:
        probs = ensemble_probs(runners, images, mode, max_crops)
        pred = acc.update(probs, labels)
        prob = probs.gather(1, pred[:, None])[:, 0]
        rows += zip(ids, labels.tolist(), pred.tolist(), prob.tolist(), strict=True)
    result = acc.result(classes, tta=mode, **result_kw)
    result.predictions = sorted(rows)
    return result


# --- data sources ---------------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


def folder_classes(root: Path, classes: list[str], dataset: str | None) -> dict[str, int]:
    """Sub-folder name -> class index, matched by name (case, '_' and '-' ignored). An ImageNet
    folder of 1000 synset ids (n01440764 ...) maps in sorted order, the standard class order."""
    subs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise UserError(f"{root}: no class sub-folders to evaluate on")
    index = {_norm_name(c): i for i, c in enumerate(classes)}
    mapping = {s: index[_norm_name(s)] for s in subs if _norm_name(s) in index}
    synsets = all(len(s) == 9 and s[0] == "n" and s[1:].isdigit() for s in subs)
    if not mapping and synsets and len(subs) == len(classes) == 1000:
        return {s: i for i, s in enumerate(subs)}
    unknown = [s for s in subs if s not in mapping]
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
        )
        raise UserError(f"{root}: sub-folders match no checkpoint class: {shown}")
    return mapping


def folder_samples(root: Path, mapping: dict[str, int]) -> list[tuple[Path, int]]:
    """(file, label) for every file under the mapped sub-folders, in the order training lists
    a folder (sub-folders sorted, files sorted)."""
    from googlenet.data.listing import list_folder

    listing = list_folder(root)  # the order training lists a folder in
    paths = listing.paths()
    samples = [
        (paths[i], mapping[listing.classes[k]])
        for i, k in enumerate(listing.labels)
        if listing.classes[k] in mapping
    ]
    if not samples:
        raise UserError(f"{root}: the class sub-folders hold no files")
    return samples


def folder_batches(
    samples: Sequence[tuple[Path, int]],
    batch_size: int,
    skipped: list[str],
    prepare: Preprocess | None = None,
) -> Iterator[Batch]:
    """Batches read from files; unreadable files go to `skipped`. With `prepare` each image is
    prepared as training prepares validation images (datasets.prepare_image: the same pixels),
    otherwise a photo folder mixes sizes and each group of batch_size files is split by size."""
    from googlenet.data.datasets import prepare_image
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


# --- the whole evaluation -------------------------------------------------------------------


@dataclass
class Member:
    """One model of an ensemble, with its checkpoint's metadata."""

    model: nn.Module  # eval-mode network returning logits
    meta: CheckpointMeta
    name: str = ""  # checkpoint path, for messages

    @property
    def preprocess(self) -> Preprocess:
        return self.meta.preprocess

    @property
    def classes(self) -> list[str]:
        return self.meta.classes


def load_members(checkpoints: Sequence[str | Path], weights: str = "auto") -> list[Member]:
    """Load checkpoints for an ensemble (the weights each run validated, by default); they
    must share their class names."""
    if not checkpoints:
        raise UserError("no checkpoint given")
    members = []
    for ckpt in checkpoints:
        model, meta = load_model(ckpt, weights)
        members.append(Member(model, meta, str(ckpt)))
    first = members[0]
    for m in members[1:]:
        if m.classes != first.classes:
            raise UserError(
                f"{m.name}: its classes differ from {first.name}'s; an ensemble must share classes"
            )
    return members


def _runners(
    members: Sequence[Member], dev: torch.device, precision: str | None
) -> list[tuple[Callable[[Tensor], Tensor], Preprocess]]:
    """Each member run as its run's final validation ran it (precision, memory format,
    BatchNorm folding), unless `precision` overrides."""
    runners = []
    for m in members:
        v = m.meta.validation
        p = precision or (v.precision if v is not None else "fp32")
        dtype = pick_dtype(p, dev, what="--precision")
        channels_last = (
            v.channels_last if v is not None and precision is None else dtype is not None
        )
        model = m.model
        if v is not None and v.fold_bn:  # as the run's final validation evaluated it
            from googlenet.fuse import fold_batchnorm

            model = fold_batchnorm(model)
        runners.append((make_runner(model, dev, dtype, channels_last), m.preprocess))
    return runners


def evaluate(
    checkpoints: Sequence[str | Path],
    data: str | Path | None = None,
    tta: str | None = None,
    batch_size: int | None = None,
    limit: int | None = None,
    precision: str | None = None,
    device: str = "auto",
    max_crops: int = 256,
    members: Sequence[Member] | None = None,
    weights: str = "auto",
) -> EvalResult:
    """Evaluate one checkpoint, or the softmax-averaged ensemble of several.

    By default it reproduces the run's own validation as recorded in the checkpoint: the same
    images (CIFAR test split or the validation folder, the same limit and seed), weights,
    test-time augmentation, BatchNorm folding, precision, batch size and memory format. `data`
    names another data root or a folder of class sub-folders; `tta`, `precision` (fp32 | bf16
    | fp16 | auto), `batch_size`, `limit` and `weights` override the recorded choices."""

    if tta is not None and tta not in TTA_MODES:
        raise UserError(f"unknown TTA mode {tta!r}; expected one of {', '.join(TTA_MODES)}")
    members = list(members) if members is not None else load_members(checkpoints, weights)
    first = members[0]
    val = first.meta.validation
    tta = tta if tta is not None else (val.tta if val is not None else "none")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    recorded = val.data if val is not None and data is None else {}
    batch_size = batch_size or (val.batch_size if val is not None and val.batch_size else 100)
    seed = int(recorded.get("seed", 0))
    limit = limit if limit is not None else (int(recorded.get("limit", 0)) or None)
    runners = _runners(members, pick_device(device, what="--device"), precision)
    kw: dict[str, Any] = {"checkpoints": [m.name for m in members]}
    # One preprocessing for every member and no crops of the whole image: folder files are
    # prepared exactly as training prepared its validation images, then only normalised.
    geometry = {(m.preprocess.resize, m.preprocess.input_size) for m in members}
    prepare = first.preprocess if len(geometry) == 1 and tta in INPUT_MODES else None
    batches, total, prepared = eval_batches(first, data, batch_size, limit, seed, kw, prepare)
    if prepared:
        runners = [(run, dataclasses.replace(pp, resize=None)) for run, pp in runners]
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"evaluate ({tta})", unit="img", disable=None, leave=False)

    def counted(it: Iterable[Batch]) -> Iterator[Batch]:
        for batch in it:
            yield batch
            bar.update(len(batch[1]))

    try:
        return evaluate_batches(runners, counted(batches), first.classes, tta, max_crops, **kw)
    finally:
        bar.close()


def recorded_val_set(meta: CheckpointMeta, cfg: dict[str, Any], data: str | Path | None) -> Any:
    """A CIFAR run's validation set rebuilt as training chose it (the test split or training
    images held out, each with its seeded limit); None for other data sets."""
    from googlenet.data.datasets import hold_out, load_cifar, resolve_data_root, stratified_indices

    rec = meta.validation.data if meta.validation is not None else {}
    kind, name, seed = rec.get("dataset"), meta.dataset, int(rec.get("seed", 0))
    if name not in ("cifar10", "cifar100") or kind not in (name, "holdout"):
        return None
    named = data or rec.get("root") or cfg.get("data_root")
    if kind == "holdout" and not named:  # held out from arrays handed to train()
        return None
    root = resolve_data_root(named or None)
    if kind == name:
        ds = load_cifar(root, name, rec.get("split", "test"))
        limit = int(rec.get("limit") or 0)
        return ds.subset(stratified_indices(ds.labels, limit, seed)) if limit else ds
    # as engine._setup: limit_train (on loading), then the held-out part, then limit_val
    ds = load_cifar(root, name, "train")
    if cfg.get("limit_train"):
        ds = ds.subset(stratified_indices(ds.labels, int(cfg["limit_train"]), seed))
    ds = hold_out(ds, int(rec["holdout"]), seed)[1]
    if cfg.get("limit_val"):
        ds = ds.subset(stratified_indices(ds.labels, int(cfg["limit_val"]), seed))
    return ds


def eval_batches(
    first: Member,
    data: str | Path | None,
    batch_size: int,
    limit: int | None = None,
    seed: int = 0,
    kw: dict[str, Any] | None = None,
    prepare: Preprocess | None = None,
) -> tuple[Iterator[Batch], int, bool]:
    """(uint8 images, labels, sample indices) batches, their number, and whether the images
    come prepared by `prepare` (folders only): the recorded validation images of `first`'s run
    when `data` is None and it recorded them (its held-out training images included), else
    the test split of its data set (CIFAR under the data root `data`) or a folder of class
    sub-folders. `limit`: a seeded class-stratified sample. Skipped files and the files' paths
    go into kw."""
    from googlenet.data.datasets import load_cifar, resolve_data_root, stratified_indices

    kw = kw if kw is not None else {}
    val = first.meta.validation
    recorded = val.data if val is not None and data is None else {}
    kind = recorded.get("dataset")
    if kind == "holdout":  # replay the held-out training images, never the test split
        ds = recorded_val_set(first.meta, first.meta.config, None)
        if ds is None:
            raise UserError(
                f"{first.name}: validated on held-out {first.meta.dataset} training images, "
                "which cannot be rebuilt here; give --data to evaluate on a data set"
            )
        return array_batches(ds.images, ds.labels, batch_size), len(ds), False
    root = resolve_data_root(recorded.get("root") if recorded else data)
    is_folder = kind == "folder" or (
        kind is None
        and data is not None
        and root.is_dir()
        and _has_class_folders(root, first.classes)
    )
    if not is_folder and first.meta.dataset in ("cifar10", "cifar100"):
        ds = load_cifar(root, first.meta.dataset, "test")
        if [_norm_name(c) for c in ds.classes] != [_norm_name(c) for c in first.classes]:
            raise UserError(
                f"{first.name}: classes {first.classes} differ from {first.meta.dataset}'s "
                f"{ds.classes}"
            )
        if limit is not None:
            ds = ds.subset(stratified_indices(ds.labels, limit, seed))
        return array_batches(ds.images, ds.labels, batch_size), len(ds), False
    if not root.is_dir():
        raise UserError(
            f"{root}: no such folder; for a {first.meta.dataset} checkpoint give "
            "--data pointing at a folder of class sub-folders"
        )
    samples = folder_samples(root, folder_classes(root, first.classes, first.meta.dataset))
    if limit is not None and limit < len(samples):
        labels = torch.tensor([lbl for _, lbl in samples])
        samples = [samples[i] for i in stratified_indices(labels, limit, seed).tolist()]
    skipped: list[str] = []
    kw["skipped"] = skipped
    kw["paths"] = [str(p) for p, _ in samples]
    batches = folder_batches(samples, batch_size, skipped, prepare)
    return batches, len(samples), prepare is not None


def _has_class_folders(root: Path, classes: list[str]) -> bool:
    names = {_norm_name(c) for c in classes}
    subs = [p.name for p in root.iterdir() if p.is_dir()]
    return any(_norm_name(s) in names for s in subs) or (
        len(subs) == len(classes) == 1000 and all(s.startswith("n") for s in subs)
    )


# --- reporting ------------------------------------------------------------------------------


def format_result(result: EvalResult, max_rows: int = 20) -> str:
    """A compact text table: overall accuracy, then per-class accuracy (worst and best when
    there are many classes)."""
    head = " + ".join(Path(c).name for c in result.checkpoints) or "model"
    lines = [
        f"{head}  tta={result.tta}  n={result.n}",
        f"top-1 {100 * result.top1:6.2f}%   top-5 {100 * result.top5:6.2f}%",
    ]
    rows = [(c, a) for c, a in zip(result.classes, result.per_class, strict=True) if a is not None]
    if rows:
        width = min(max(len(c) for c, _ in rows), 30)
        if len(rows) > max_rows:
            ordered = sorted(rows, key=lambda r: r[1])
            half = max_rows // 2
            shown = [*ordered[:half], ("...", None), *ordered[-half:]]
            lines.append(f"per-class accuracy (worst {half} and best {half} of {len(rows)}):")
        else:
            shown = rows
            lines.append("per-class accuracy:")
        for c, a in shown:
            lines.append(f"  {c[:width]:<{width}}  " + ("" if a is None else f"{100 * a:6.2f}%"))
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} unreadable files")
    return "\n".join(lines)


def write_report(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """metrics.json, confusion.json and confusion.png (matplotlib Agg) in `out_dir`."""
    from googlenet.files import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.json"
    atomic_write_text(metrics, json.dumps(result.to_dict(), indent=2) + "\n")
    confusion = out / "confusion.json"
    cm = {"classes": result.classes, "rows": "true", "columns": "predicted"}
    cm["matrix"] = result.confusion.tolist()
    atomic_write_text(confusion, json.dumps(cm) + "\n")
    png = out / "confusion.png"
    atomic_write_bytes(png, confusion_png(result))
    files = [metrics, confusion, png]
    if result.predictions:
        ids, true, pred, prob = (list(c) for c in zip(*result.predictions, strict=True))
        paths = [result.paths[i] for i in ids] if result.paths else None
        files.append(
            write_predictions(out / "predictions.csv", ids, paths, true, pred, prob, result.classes)
        )
    return files


def confusion_png(result: EvalResult) -> bytes:
    """The confusion matrix, row-normalised, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = result.confusion.double()
    norm = cm / cm.sum(1, keepdim=True).clamp_min(1)
    c = len(result.classes)
    size = min(4 + 0.45 * c, 14)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {100 * result.top1:.2f}% (tta={result.tta}, n={result.n})")
    if c <= 30:
        ax.set_xticks(range(c), result.classes, rotation=90)
        ax.set_yticks(range(c), result.classes)
        if c <= 12:
            for i in range(c):
                for j in range(c):
                    v = int(cm[i, j])
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
