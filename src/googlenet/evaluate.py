"""Evaluate checkpoints: top-1/top-5, per-class accuracy, confusion matrix, test-time
augmentation (TTA) and ensembles (softmax averaged over models, as the paper did).

Two kinds of TTA. The input views (none, flip, flip-shift: `input_views`) are made from the
model input exactly as preprocessing gives it, and their logits are averaged (`tta_logits`);
training's final validation uses the same function, so `googlenet evaluate` reproduces it.
The paper's crops (10crop, 144crop) cut the image anew at several scales and average softmax.

TTA geometry is relative to the model's input size S, so the paper's 224-pixel scheme scales
down to 32-pixel CIFAR models: 144crop resizes the shorter side to S * {256, 288, 320, 352} / 224,
takes the left/centre/right (top/centre/bottom) squares, from each the 4 corner and centre S x S
crops plus the whole square resized to S, and mirrors all of them (4 x 3 x 6 x 2 = 144).
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
import torch.nn.functional as F
from torch import Tensor, nn

from googlenet.checkpoint import CheckpointMeta, load_model
from googlenet.devices import make_runner, pick_device, pick_dtype
from googlenet.errors import UserError
from googlenet.metrics import EvalResult, Metrics, write_predictions
from googlenet.transforms import (
    Preprocess,
    center_offset,
    resample,
    resized_crop_box,
    resized_size,
)

TTA_MODES = ("none", "flip", "flip-shift", "10crop", "144crop")
INPUT_MODES = ("none", "flip", "flip-shift")  # views of the model input (training may use these)
SHIFTS = ((-1, -1), (1, 1))  # flip-shift's translations (rows, columns) in pixels, as airbench
PAPER_SCALES = (256, 288, 320, 352)  # shorter sides for a 224 crop (paper, section 7)
TEN_CROP_SCALE = 256  # shorter side for 10crop when the checkpoint has no `resize`


# --- crop geometry --------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """One test-time crop: resize the shorter side to `scale`, cut the `size` x `size` box at
    (top, left) of the resized image, resize it to the input size, mirror it if `flip`."""

    scale: int | None  # shorter side of the resized image (None: not resized)
    top: int  # box position in the resized image
    left: int
    size: int  # box side (== input size, or a whole square that is resized down)
    flip: bool = False
    weight: int = 1  # how many of the scheme's crops this view stands for (after merging)


def _scaled(input_size: int, side_at_224: int) -> int:
    return round(input_size * side_at_224 / 224)


def _five(top: int, left: int, side: int, crop: int) -> list[tuple[int, int]]:
    """The 4 corners and the centre of a side x side square at (top, left), for crop x crop."""
    far, mid = side - crop, center_offset(side, crop)
    corners = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]
    return [(top + t, left + lf) for t, lf in corners]


def input_views(x: Tensor, mode: str) -> list[Tensor]:
    """The views of a normalised N x 3 x S x S model input that an input TTA mode averages:
    none: x; flip: x and its mirror; flip-shift: x, x shifted by one pixel down-right and by
    one pixel up-left (border rows/columns reflected), and the mirrors of those three."""
    if mode not in INPUT_MODES:
        choices = ", ".join(INPUT_MODES)
        raise UserError(f"unknown input TTA mode {mode!r}; expected one of {choices}")
    base = [x]
    if mode == "flip-shift":
        base += [shift(x, dy, dx) for dy, dx in SHIFTS]
    return base if mode == "none" else base + [v.flip(-1) for v in base]


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """x translated by (dy, dx) pixels (|dy|, |dx| <= 1): out[i, j] = x[i - dy, j - dx], the
    uncovered border reflected."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return p[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def tta_logits(
    run: Callable[[Tensor], Tensor], x: Tensor, mode: str = "none", first: Tensor | None = None
) -> Tensor:
    """The mean float logits of `run` (a model forward) over input_views(x, mode): the one
    definition of input TTA, for training's final validation and for evaluate. `first`: the
    logits of views[0] (x itself) when the caller already has them."""
    views = input_views(x, mode)
    total = (run(views[0]) if first is None else first).float()
    for v in views[1:]:
        total = total + run(v).float()
    return total / len(views)


def tta_views(
    height: int, width: int, mode: str, input_size: int, resize: int | None = None
) -> list[View]:
    """Every crop of a TTA scheme for an image of height x width (before merging duplicates).

    none: the plain preprocessing (shorter side to `resize`, centre crop S); flip: that and its
    mirror; 10crop: 4 corners + centre of the image resized to `resize` (S * 256/224 when
    None), and mirrors; 144crop: the paper's scheme (module docstring). Sizes and centres use
    torchvision's rounding (transforms.resized_size, transforms.center_offset)."""
    if mode not in TTA_MODES or mode == "flip-shift":
        raise UserError(f"no crop geometry for TTA mode {mode!r} (flip-shift: see input_views)")
    s = input_size
    if mode in ("none", "flip"):
        _, _, top, left = Preprocess(s, (0.0,) * 3, (1.0,) * 3, resize).crop_box(height, width)
        base = [View(resize, top, left, s)]
    elif mode == "10crop":
        scale = resize or _scaled(s, TEN_CROP_SCALE)
        h, w = resized_size(height, width, scale)
        # Corners of the whole resized image (not of a square), as torchvision's TenCrop.
        mid = (center_offset(h, s), center_offset(w, s))
        corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), mid]
        base = [View(scale, t, lf, s) for t, lf in corners]
    else:
        base = []
        for side_at_224 in PAPER_SCALES:
            scale = _scaled(s, side_at_224)
            h, w = resized_size(height, width, scale)
            side = min(h, w)
            if w >= h:  # landscape (or square): left, centre, right squares
                squares = [(0, 0), (0, center_offset(w, side)), (0, w - side)]
            else:  # portrait: top, centre, bottom squares
                squares = [(0, 0), (center_offset(h, side), 0), (h - side, 0)]
            for sq_top, sq_left in squares:
                base += [View(scale, t, lf, s) for t, lf in _five(sq_top, sq_left, side, s)]
                base.append(View(scale, sq_top, sq_left, side))  # whole square, resized to S
    if mode == "none":
        return base
    return base + [View(v.scale, v.top, v.left, v.size, True) for v in base]


def merge_views(views: Iterable[View]) -> list[View]:
    """Identical crops merged into one view whose weight counts them (a square image has three
    identical squares in 144crop), so the weighted average is unchanged and cheaper."""
    merged: dict[tuple[int, int, int, int, bool], int] = {}
    for v in views:
        key = (v.scale, v.top, v.left, v.size, v.flip)
        merged[key] = merged.get(key, 0) + v.weight
    return [View(*key, weight=w) for key, w in merged.items()]


def _cut(x: Tensor, v: View, input_size: int) -> Tensor:
    """The view's crop of a float N x 3 x H x W batch, resized to S x S (one resample)."""
    n, _, h, w = x.shape
    box = resized_crop_box(h, w, v.scale, v.top, v.left, v.size, n)
    flip = torch.full((n,), v.flip) if v.flip else None
    return resample(x, box, (input_size, input_size), flip)


def iter_view_chunks(
    images: Tensor, views: Sequence[View], input_size: int, max_crops: int = 256
) -> Iterator[tuple[Tensor, list[View]]]:
    """Crops of a float 0..1 N x 3 x H x W batch, view-major ((k*N) x 3 x S x S: rows j*N..
    (j+1)*N are view j), in chunks of about `max_crops` crops."""
    n = images.shape[0]
    per_chunk = max(1, max_crops // max(n, 1))
    for i in range(0, len(views), per_chunk):
        chunk = list(views[i : i + per_chunk])
        yield torch.cat([_cut(images, v, input_size) for v in chunk]), chunk


def tta_crops(
    images: Tensor, mode: str, input_size: int, resize: int | None = None
) -> tuple[list[View], Tensor]:
    """All crops of a TTA scheme (unmerged), as (views, N x V x 3 x S x S float 0..1)."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    x = _to_float(images)
    views = tta_views(x.shape[-2], x.shape[-1], mode, input_size, resize)
    return views, torch.stack([_cut(x, v, input_size) for v in views], 1)


def _to_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


# --- running models -------------------------------------------------------------------------


def tta_probs(
    run: Callable[[Tensor], Tensor],
    images: Tensor,
    pp: Preprocess,
    mode: str = "none",
    max_crops: int = 256,
) -> Tensor:
    """Softmax probabilities N x C of one model under a TTA scheme: of the mean logits over
    input views (none, flip, flip-shift) of the checkpoint's preprocessing, or averaged over
    the crops (10crop, 144crop). `images`: uint8 (or 0..1 float) N x 3 x H x W, one size."""
    if mode in INPUT_MODES:  # exactly the checkpoint's preprocessing, then views of it
        return torch.softmax(tta_logits(run, pp(images), mode), 1)
    x = _to_float(images)
    n = x.shape[0]
    views = merge_views(tta_views(x.shape[-2], x.shape[-1], mode, pp.input_size, pp.resize))
    total = sum(v.weight for v in views)
    acc: Tensor | None = None
    for crops, vs in iter_view_chunks(x, views, pp.input_size, max_crops):
        probs = torch.softmax(run(pp.normalize(crops)), 1)
        w = torch.tensor([v.weight for v in vs], dtype=probs.dtype)
        part = (probs.view(len(vs), n, -1) * w.view(-1, 1, 1)).sum(0)
        acc = part if acc is None else acc + part
    assert acc is not None
    return acc / total


def ensemble_probs(
    runners: Sequence[tuple[Callable[[Tensor], Tensor], Preprocess]],
    images: Tensor,
    mode: str = "none",
    max_crops: int = 256,
) -> Tensor:
    """The mean over models of their (TTA-averaged) softmax probabilities."""
    total = sum(tta_probs(run, images, pp, mode, max_crops) for run, pp in runners)
    return total / len(runners)


# --- counting -------------------------------------------------------------------------------

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
    from googlenet.listing import list_folder

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
    from googlenet.datasets import prepare_image
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
    dev = pick_device(device, what="--device")
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
    from googlenet.datasets import hold_out, load_cifar, resolve_data_root, stratified_indices

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
    from googlenet.datasets import load_cifar, resolve_data_root, stratified_indices

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
    from googlenet.checkpoint import atomic_write_bytes, atomic_write_text

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
