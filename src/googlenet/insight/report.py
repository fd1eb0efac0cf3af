"""RUN/report.html: one self-contained page (images embedded as data URIs, no network needed)
about a training run: config, curves per head, confusion matrix and per-class accuracy, sample
predictions with the most confident mistakes and their Grad-CAMs, branch usage, timing.

It is built from what the run recorded (config.toml, metrics.jsonl, val_predictions.csv, the
best checkpoint); images are read from the run's data set only for the picture grids.
"""

from __future__ import annotations

import html
import json
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from googlenet.errors import UserError
from googlenet.insight.branches import BRANCHES, branch_energy
from googlenet.insight.features import filters_grid, visualise_feature
from googlenet.insight.gradcam import DEFAULT_BLOCK, denormalize, gradcam
from googlenet.insight.page import (
    BRANCH_COLOURS,
    GENERATOR,
    bar,
    img,
    render_page,
    table,
    tiles_html,
)
from googlenet.insight.plots import features_png, overlay, png_bytes
from googlenet.metrics import VAL_PREDICTIONS, read_predictions

if TYPE_CHECKING:
    from googlenet.checkpoint import CheckpointMeta
    from googlenet.infer.inference import Predictor


@dataclass
class ValPrediction:
    """One validation image's recorded result (a row of val_predictions.csv)."""

    index: int  # sample index in the validation set
    path: str  # its file ("" for in-memory data such as CIFAR)
    label: int  # true class index
    pred: int  # predicted class index
    prob: float  # probability of the predicted class

    @property
    def key(self) -> str:
        """What the image is called in captions: its file, else #index."""
        return self.path or f"#{self.index}"


def recorded_predictions(path: Path, classes: list[str]) -> list[ValPrediction]:
    """val_predictions.csv (metrics.read_predictions) with the class names as indices."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for r in read_predictions(path):
        if r["true"] not in index or r["predicted"] not in index:
            raise UserError(f"{path}: row {r['index']} names a class the checkpoint lacks")
        label, pred = index[r["true"]], index[r["predicted"]]
        out.append(ValPrediction(int(r["index"]), r["path"], label, pred, float(r["probability"])))
    return out


# --- pieces ---------------------------------------------------------------------------------


def curves_pngs(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """loss and accuracy curves per head (the run's own loss.png/accuracy.png, redrawn)."""
    import tempfile

    from googlenet.logs import plot_history

    with tempfile.TemporaryDirectory() as tmp:
        return {p.stem: p.read_bytes() for p in plot_history(rows, tmp)}


def _from_set(picked: list[ValPrediction], val_set: Any) -> Tensor | None:
    """uint8 images of `picked` by index from `val_set`, checked against the recorded labels
    (so other images never pass for the run's); None when they cannot be."""
    if val_set is None or not hasattr(val_set, "get_images"):
        return None
    idx = torch.tensor([p.index for p in picked])
    labels = torch.tensor([p.label for p in picked])
    if len(val_set) <= int(idx.max()):
        return None
    if not torch.equal(torch.as_tensor(val_set.labels)[idx].long(), labels):
        return None
    return val_set.get_images(idx)


def _from_files(picked: list[ValPrediction], side: int) -> Tensor | None:
    """uint8 side x side squares of `picked`'s recorded files (the one decoder); None when one
    is missing or unreadable."""
    from googlenet.transforms import read_image_resized

    try:
        return torch.stack([read_image_resized(p.path, side) for p in picked])
    except (UserError, OSError):
        return None


def _curves(run: Path, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """The run's own loss.png/accuracy.png when drawn from its latest metrics, else redrawn."""
    log = run / "metrics.jsonl"
    files = {k: run / f"{k}.png" for k in ("loss", "accuracy")}
    if log.is_file() and all(
        f.is_file() and f.stat().st_mtime >= log.stat().st_mtime for f in files.values()
    ):
        return {k: f.read_bytes() for k, f in files.items()}
    return curves_pngs(rows)


# --- the report's sections ------------------------------------------------------------------


def _run_config(run: Path, meta: CheckpointMeta) -> dict[str, Any]:
    """The run's config.toml, else the config its checkpoint recorded."""
    cfg_path = run / "config.toml"
    if cfg_path.is_file():
        return tomllib.loads(cfg_path.read_text(encoding="utf-8"))
    return meta.config


def _recorded_tta(meta: CheckpointMeta) -> str:
    """The test-time augmentation of the run's final validation (and val_predictions.csv)."""
    return meta.validation.tta if meta.validation is not None else "none"


def _summary_html(
    run: Path, checkpoint: str | Path | None, meta: CheckpointMeta, rows: list[dict[str, Any]]
) -> str:
    best = meta.training.best if meta.training is not None else {}
    epoch = meta.training.epoch if meta.training is not None else "?"
    summary = [
        ["run", str(run)],
        ["checkpoint", str(checkpoint or "the run's best")],
        ["variant", meta.variant],
        ["data set", meta.dataset],
        ["epochs run", len(rows)],
        ["best epoch", best.get("epoch", epoch)],
        ["best val top-1", f"{best['val_acc']:.2f}%" if "val_acc" in best else "?"],
    ]
    # The final validation's TTA score: its last log row (or the checkpoint's, without a log).
    last = rows[-1] if rows else (meta.training.metrics if meta.training is not None else {})
    if "val_tta_acc" in last:
        tta = _recorded_tta(meta)
        summary.append([f"val top-1 with tta={tta} (final)", f"{last['val_tta_acc']:.2f}%"])
    return "<h2>Summary</h2>" + table(summary)


def _config_html(cfg: dict[str, Any]) -> str:
    return (
        "<h2>Config</h2><details open><summary>config.toml</summary>"
        + table([[k, json.dumps(v)] for k, v in cfg.items()], ["key", "value"])
        + "</details>"
    )


def _curves_html(run: Path, rows: list[dict[str, Any]]) -> str:
    pngs = _curves(run, rows)
    return (
        "<h2>Loss and accuracy per head</h2><div class=row>"
        + "".join(img(pngs[k], f"{k} curves") for k in ("loss", "accuracy") if k in pngs)
        + "</div><p>Solid: train; dashed: validation; one colour per head (output, aux1, "
        "aux2).</p>"
    )


def _timing_html(rows: list[dict[str, Any]]) -> str:
    last = rows[-1]
    timing = [
        ["training time", f"{float(last.get('elapsed_s', 0)) / 60:.1f} min"],
        ["seconds per epoch", ", ".join(f"{float(r.get('epoch_s', 0)):.1f}" for r in rows)],
        [
            "training images/s",
            ", ".join(f"{float(r.get('images_per_s', 0)):.0f}" for r in rows),
        ],
    ]
    return "<h2>Timing</h2>" + table(timing)


def _confusion_html(preds: list[ValPrediction], classes: list[str], meta: CheckpointMeta) -> str:
    """Confusion matrix and per-class accuracy of the recorded predictions (not re-validated)."""
    from googlenet.infer.evaluate import confusion_png
    from googlenet.metrics import EvalResult, count_confusion

    c = len(classes)
    labels, predicted = (torch.tensor([getattr(p, k) for p in preds]) for k in ("label", "pred"))
    cm = count_confusion(torch.zeros(c, c, dtype=torch.int64), labels, predicted)
    val_tta = _recorded_tta(meta)  # the predictions were recorded under it: the title says so
    result = EvalResult(classes, cm, {1: int(cm.diagonal().sum())}, tta=val_tta)
    tta = f"; test-time augmentation: {val_tta}" if val_tta != "none" else ""
    per_class = [
        [name, f"{100 * a:.1f}%" if a is not None else "-", int(cm[i].sum())]
        for i, (name, a) in enumerate(zip(classes, result.per_class, strict=True))
    ]
    return (
        f"<h2>Validation: confusion matrix and per-class accuracy</h2>"
        f"<p>top-1 {100 * result.top1:.2f}% on {result.n} images "
        f"(recorded in {VAL_PREDICTIONS}{tta})</p><div class=row>"
        + img(confusion_png(result), "confusion matrix", 560)
        + table(per_class, ["class", "accuracy", "images"])
        + "</div>"
    )


def _pick_pictures(
    preds: list[ValPrediction], samples: int, mistakes: int
) -> tuple[list[ValPrediction], list[ValPrediction]]:
    """`samples` predictions evenly spread over the set, and the `mistakes` most confident
    mistakes."""
    wrong = sorted((p for p in preds if p.pred != p.label), key=lambda p: -p.prob)[:mistakes]
    step = max(1, len(preds) // max(samples, 1))
    return preds[::step][:samples], wrong


NO_FILES = "the validation images' files are not readable here: no picture grids"
NO_SET = (
    "the validation images are not here or differ from the recorded ones (give --data): "
    "no picture grids"
)


def _picked_images(
    picked: list[ValPrediction],
    meta: CheckpointMeta,
    cfg: dict[str, Any],
    data: str | Path | None,
    val_set: Any,
) -> tuple[Tensor | None, str]:
    """uint8 images of `picked`: from `val_set` (the images training holds), else their
    recorded files (folder runs: at the checkpoint's working side, so its preprocessing crops
    what validation saw), else the run's validation set rebuilt (CIFAR); and the note to show
    when they are not here."""
    images = _from_set(picked, val_set)
    if images is not None:
        return images, ""
    if all(p.path for p in picked):
        images = _from_files(picked, meta.preprocess.resize or meta.preprocess.input_size)
        return images, "" if images is not None else NO_FILES
    from googlenet.data.build import recorded_val_set

    try:
        rebuilt = recorded_val_set(meta, cfg, data)
    except (UserError, KeyError, ValueError):
        rebuilt = None
    images = _from_set(picked, rebuilt)
    return images, "" if images is not None else NO_SET


def _samples_html(images: Tensor, shown: list[ValPrediction], classes: list[str]) -> str:
    raw = images.float() / 255 if images.dtype == torch.uint8 else images
    tiles = [
        (
            raw[i],
            f"{classes[p.pred]} {100 * p.prob:.0f}%\n(true {classes[p.label]})",
            p.pred == p.label,
        )
        for i, p in enumerate(shown)
    ]
    return (
        "<h2>Sample predictions</h2><p>Evenly spread over the validation set; red: "
        "wrong.</p>" + tiles_html(tiles)
    )


def _mistakes_html(
    predictor: Predictor, xw: Tensor, wrong: list[ValPrediction], classes: list[str]
) -> str:
    """Grad-CAMs of the wrong predictions; `xw` their preprocessed images."""
    cams = gradcam(predictor.model, xw, torch.tensor([p.pred for p in wrong]))
    cells = []
    for j, p in enumerate(wrong):
        pic = denormalize(xw[j], predictor.preprocess.mean, predictor.preprocess.std)
        over = overlay(pic, cams[j], min_side=96)
        cap = f"{p.key}: {classes[p.pred]} {100 * p.prob:.0f}% (true {classes[p.label]})"
        cells.append(
            f"<figure>{img(png_bytes(over), cap)}"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        )
    return (
        "<h2>Most confident mistakes, with Grad-CAM</h2><p>Grad-CAM of the "
        f"predicted class at {DEFAULT_BLOCK}: where the evidence for the wrong "
        "answer lies.</p><div class=row>" + "".join(cells) + "</div>"
    )


def _validation_sections(
    predictor: Predictor,
    preds: list[ValPrediction],
    cfg: dict[str, Any],
    data: str | Path | None,
    samples: int,
    mistakes: int,
    val_set: Any,
) -> tuple[list[str], list[str], Tensor | None]:
    """(sections, notes, the pictured images preprocessed or None) for the recorded
    predictions: confusion matrix, sample predictions, most confident mistakes."""
    meta, classes = predictor.meta, predictor.classes
    parts = [_confusion_html(preds, classes, meta)]
    shown, wrong = _pick_pictures(preds, samples, mistakes)
    images, note = _picked_images(shown + wrong, meta, cfg, data, val_set)
    if images is None:
        return parts, [note], None
    x_all = predictor.preprocess(images)
    parts.append(_samples_html(images, shown, classes))
    if wrong:
        parts.append(_mistakes_html(predictor, x_all[len(shown) :], wrong, classes))
    return parts, [], x_all


def _branch_usage_html(model: torch.nn.Module, usage_x: Tensor) -> str:
    usage = branch_energy(model.eval(), usage_x)
    mean = usage.mean_shares()
    per_ch = usage.mean_shares(per_channel=True)
    table = [
        f"<tr><td>{b.replace('inception', '')}</td><td>{bar(mean[b])}</td>"
        f"<td>{bar(per_ch[b])}</td>"
        + "".join(f"<td>{100 * float(v):.1f}%</td>" for v in (*mean[b], *per_ch[b]))
        + "</tr>"
        for b in mean
    ]
    head = ["block", "energy", "per channel"]
    head += [*BRANCHES, *(f"{k} /ch" for k in BRANCHES)]
    legend = " ".join(
        f"<span class=key style='background:{c}'></span>{b}"
        for b, c in zip(BRANCHES, BRANCH_COLOURS, strict=True)
    )
    return (
        "<h2>Branch usage</h2><p>Share of each inception branch's energy (sum of squared "
        f"activations), mean over the {len(usage_x)} validation images shown above; per "
        f"channel (/ch): divided by the branch's width first. {legend}</p><table>"
        + "<tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join(table)
        + "</table>"
    )


def _filters_html(model: torch.nn.Module) -> str:
    return "<h2>First-layer filters</h2>" + img(
        png_bytes(filters_grid(model)), "first-layer filters"
    )


def _features_html(predictor: Predictor, features: str, channels: int) -> str:
    chans = list(range(channels))
    pp = predictor.preprocess
    imgs = visualise_feature(predictor.model, features, chans, pp.mean, pp.std)
    return f"<h2>Feature visualisation: {html.escape(features)}</h2>" + img(
        features_png(imgs, features, chans), "feature visualisation"
    )


# --- the report -----------------------------------------------------------------------------


def build_report(
    run: str | Path,
    data: str | Path | None = None,
    checkpoint: str | Path | None = None,
    samples: int = 16,
    mistakes: int = 8,
    usage_images: int = 64,
    features: str | None = None,
    channels: int = 4,
    val_set: Any = None,
) -> str:
    """The report page for a run folder, as HTML text. `val_set` (a data set with
    get_images) saves re-reading the validation images when training has them loaded."""
    from googlenet.infer.inference import load
    from googlenet.logs import read_jsonl

    t0 = time.perf_counter()
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    predictor = load(checkpoint or run)
    meta = predictor.meta
    cfg = _run_config(run, meta)
    rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    parts = [_summary_html(run, checkpoint, meta, rows), _config_html(cfg)]
    notes: list[str] = []
    if rows:
        parts += [_curves_html(run, rows), _timing_html(rows)]
    else:
        notes.append("no metrics.jsonl: no curves or timing")
    preds_path = run / VAL_PREDICTIONS
    preds = recorded_predictions(preds_path, predictor.classes) if preds_path.is_file() else []
    x_all: Tensor | None = None
    if preds:
        more, more_notes, x_all = _validation_sections(
            predictor, preds, cfg, data, samples, mistakes, val_set
        )
        parts += more
        notes += more_notes
    else:
        notes.append(f"no {VAL_PREDICTIONS} in the run folder: no confusion matrix or samples")
    if x_all is not None and len(x_all):
        parts.append(_branch_usage_html(predictor.model, x_all[:usage_images]))
    parts.append(_filters_html(predictor.model))
    if features:
        parts.append(_features_html(predictor, features, channels))
    return render_page(run, parts, notes, t0)


def write_report(
    run: str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    **kw: Any,
) -> Path:
    """Write the report (default RUN/report.html); an existing file is replaced only when this
    module wrote it (a derived page) or with force=True. Returns its path."""
    from googlenet.files import atomic_write_text

    path = Path(out) if out else Path(run) / "report.html"
    if path.exists() and not (force or _ours(path)):
        raise UserError(f"{path} exists; pass --force to replace it or --out for another file")
    text = build_report(run, data, **kw)
    atomic_write_text(path, text)
    return path


def _ours(path: Path) -> bool:
    """Whether `path` is a report this module wrote (so it may be regenerated)."""
    with path.open("rb") as f:
        return GENERATOR.encode() in f.read(1024)


def report_after_training(
    run: str | Path, val_set: Any = None, progress: bool = True
) -> Path | None:
    """End of training (rank 0): RUN/report.html from what the run recorded (metrics.jsonl,
    val_predictions.csv, last.safetensors, the weights that final validation judged) and the
    validation images `val_set` training holds, without validating again. A report written
    here before is replaced; any other file of that name is kept. Never raises: a failure is
    one warning line and None, so the run is never lost to its report."""
    from googlenet.files import atomic_write_text

    run = Path(run)
    path = run / "report.html"
    try:
        if path.exists() and not _ours(path):
            raise UserError(f"{path} exists and was not written by googlenet; left as it is")
        t0 = time.perf_counter()
        last = run / "last.safetensors"
        text = build_report(run, checkpoint=last if last.is_file() else None, val_set=val_set)
        atomic_write_text(path, text)
    except Exception as e:  # the report is a by-product: the run must survive it
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"warning: no {path}: {msg}", file=sys.stderr, flush=True)
        return None
    if progress:
        took = time.perf_counter() - t0
        print(f"wrote {path} in {took:.1f} s", file=sys.stderr, flush=True)
    return path
