"""Evaluate checkpoints: top-1/top-5, per-class accuracy, confusion matrix, test-time
augmentation (TTA, in tta.py) and ensembles (softmax averaged over models, as the paper did).

"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from googlenet.checkpoint import CheckpointMeta, load_model
from googlenet.data.build import Batch, eval_batches
from googlenet.devices import bound_kept_memory, make_runner, pick_device, pick_dtype
from googlenet.errors import UserError
from googlenet.metrics import EvalResult, Metrics, write_predictions
from googlenet.transforms import (
    Preprocess,
)
from googlenet.tta import INPUT_MODES, TTA_MODES, ensemble_probs


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
        bound_kept_memory()
    result = acc.result(classes, tta=mode, **result_kw)
    result.predictions = sorted(rows)
    return result


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
