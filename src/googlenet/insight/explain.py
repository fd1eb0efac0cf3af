"""`googlenet explain`: what the insight functions find, written as files for a checkpoint and
some images: branch usage (JSON and chart), a Grad-CAM per image, the first layer's filters,
and on request an ablation over a labelled data set and a feature visualisation.

Images are read, measured and explained one batch at a time (`batch_size`), so a folder of
photos never sits in memory at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from googlenet.errors import UserError
from googlenet.insight.branches import BranchUsage, ablate, branch_energy, resolve_layer
from googlenet.insight.features import filters_grid, visualise_feature
from googlenet.insight.gradcam import DEFAULT_BLOCK, denormalize, gradcam
from googlenet.insight.plots import (
    ablation_png,
    branch_usage_png,
    features_png,
    gradcam_png,
    png_bytes,
)


@dataclass
class ExplainOptions:
    """What `explain_files` writes; the defaults are the CLI's."""

    target: str | None = None  # Grad-CAM class name (default: each image's predicted class)
    block: str = DEFAULT_BLOCK  # Grad-CAM layer
    data: str | Path | None = None  # average branch usage over this data set (and ablate)
    limit: int = 500  # images from `data`
    ablate: bool = False
    features: str | None = None  # BLOCK[:BRANCH]
    channels: int = 4
    feature_size: int = 128
    feature_steps: int = 256
    force: bool = False  # replace existing files in the output folder
    batch_size: int = 50


def class_index(classes: Sequence[str], name: str) -> int:
    """A class name (case-insensitive) or index -> index; UserError listing the classes."""
    low = [c.lower() for c in classes]
    if name.lower() in low:
        return low.index(name.lower())
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
    raise UserError(f"unknown class {name!r}; the checkpoint's classes: {shown}")


def stem_names(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique with a counter where two images share one."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        k = seen.get(p.stem, 0)
        seen[p.stem] = k + 1
        out.append(p.stem if k == 0 else f"{p.stem}-{k}")
    return out


def explain_files(
    predictor: Any, images: Sequence[str | Path], out: str | Path, opts: ExplainOptions
) -> list[Path]:
    """Write branch_usage.json/.png, gradcam_<stem>.png per image, filters.png (and
    ablation.json/.png, features_<layer>.png when asked) into `out`; returns the paths in
    that order. The images are read and explained `batch_size` at a time."""
    out = Path(out)
    model = predictor.model
    files, target = _check_request(predictor, images, opts)
    stems = stem_names(files)
    planned = _planned(stems, opts)
    _refuse_overwrite(out, planned, opts)
    w = _Writer(out)
    model.eval()
    usage = _explain_images(w, predictor, files, stems, target, opts)
    batches: list[tuple[Tensor, Tensor]] = []  # labelled --data images: the mean, ablation
    if opts.data is not None:
        batches = list(data_batches(predictor, opts.data, opts.limit, opts.batch_size))
    _write_branch_usage(w, model, usage, batches, files, opts)
    w.write("filters.png", png_bytes(filters_grid(model)))
    if opts.ablate:
        _write_ablation(w, model, batches)
    if opts.features:
        _write_features(w, model, predictor.preprocess, opts.features, opts)
    written = set(w.written)
    return [out / name for name in planned if out / name in written]


def _check_request(
    predictor: Any, images: Sequence[str | Path], opts: ExplainOptions
) -> tuple[list[Path], int | None]:
    """The image files and the Grad-CAM class (None: each image's prediction); a bad request
    fails here, before any image is read."""
    from googlenet.infer.inference import iter_image_files

    files = [Path(p) for p in iter_image_files(images)]
    if not files and opts.data is None:
        raise UserError("no images to explain: give image files or folders, or --data")
    if opts.ablate and opts.data is None:
        raise UserError("--ablate needs --data (a labelled data set to measure accuracy on)")
    if opts.batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {opts.batch_size}")
    target = class_index(predictor.classes, opts.target) if opts.target else None
    resolve_layer(predictor.model, opts.block)  # fail early on a bad name
    return files, target


def _features_name(layer: str) -> str:
    return f"features_{layer.replace(':', '_')}.png"


def _planned(stems: Sequence[str], opts: ExplainOptions) -> list[str]:
    """The files this run writes, in the order they are listed."""
    planned = ["branch_usage.json", "branch_usage.png", "filters.png"]
    planned += [f"gradcam_{s}.png" for s in stems]
    if opts.ablate:
        planned += ["ablation.json", "ablation.png"]
    if opts.features:
        planned.append(_features_name(opts.features))
    return planned


def _refuse_overwrite(out: Path, planned: Sequence[str], opts: ExplainOptions) -> None:
    """Unless --force, fail before anything is written if a file this run writes exists."""
    if not opts.force:
        clash = [p for p in planned if (out / p).exists()]
        if clash:
            raise UserError(
                f"{out / clash[0]} exists ({len(clash)} file(s) would be replaced); "
                "pass --force or choose another --out"
            )


class _Writer:
    """Writes each output atomically into `out` and lists the paths in the order written."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.written: list[Path] = []

    def write(self, name: str, data: bytes | str) -> None:
        from googlenet.files import atomic_write_bytes, atomic_write_text

        path = self.out / name
        (atomic_write_text if isinstance(data, str) else atomic_write_bytes)(path, data)
        self.written.append(path)


def _explain_images(
    w: _Writer,
    predictor: Any,
    files: Sequence[Path],
    stems: Sequence[str],
    target: int | None,
    opts: ExplainOptions,
) -> BranchUsage:
    """Read the images batch by batch: branch usage and the probabilities from one forward
    pass, then each image's Grad-CAM; returns the usage of them all."""
    from googlenet import transforms

    usage = BranchUsage({}, {})
    for i in range(0, len(files), opts.batch_size):
        chunk = files[i : i + opts.batch_size]
        x = torch.stack([predictor.preprocess(transforms.read_image(f)) for f in chunk])
        part = branch_energy(predictor.model, x, [str(f) for f in chunk])
        assert part.outputs is not None  # an eval-mode network returns its logits
        probs = torch.softmax(part.outputs, 1)
        _write_gradcams(w, predictor, chunk, stems[i : i + len(chunk)], x, probs, target, opts)
        usage = usage.cat(part)
    return usage


def _write_branch_usage(
    w: _Writer,
    model: nn.Module,
    usage: BranchUsage,
    batches: Sequence[tuple[Tensor, Tensor]],
    files: Sequence[Path],
    opts: ExplainOptions,
) -> None:
    """branch_usage.json/.png: the given images listed one by one; the mean and the chart over
    --data when given (a larger sample), else over the images."""
    if opts.data is not None:
        data_usage = BranchUsage({}, {})
        for xb, _ in batches:
            start = len(data_usage)
            names = [f"{opts.data}#{start + j}" for j in range(len(xb))]
            data_usage = data_usage.cat(branch_energy(model, xb, names))
        doc = data_usage.to_json(images=[])
        doc["images"] = usage.to_json()["images"] if files else {}
        doc["per_channel"]["images"] = usage.to_json()["per_channel"]["images"] if files else {}
        doc["mean_over"] = f"{opts.data} ({len(data_usage)} images)"
        chart = data_usage
    else:
        doc = usage.to_json(list(range(len(files))))
        doc["mean_over"] = f"the {len(files)} image(s) given"
        chart = usage
    w.write("branch_usage.json", json.dumps(doc, indent=2) + "\n")
    w.write("branch_usage.png", branch_usage_png(chart))


def _write_gradcams(
    w: _Writer,
    predictor: Any,
    files: Sequence[Path],
    stems: Sequence[str],
    x: Tensor,
    probs: Tensor,
    target: int | None,
    opts: ExplainOptions,
) -> None:
    """gradcam_<stem>.png per image of one batch, titled with the prediction and the class
    explained."""
    model, pp, classes = predictor.model, predictor.preprocess, predictor.classes
    tgt = probs.argmax(1) if target is None else torch.full((len(x),), target)
    cams = gradcam(model, x, tgt, opts.block)
    for j in range(len(x)):
        k = int(tgt[j])
        title = (
            f"{files[j].name}: predicted {classes[int(probs[j].argmax())]} "
            f"{100 * float(probs[j].max()):.1f}%; Grad-CAM for {classes[k]} at {opts.block}"
        )
        image = denormalize(x[j], pp.mean, pp.std)
        w.write(f"gradcam_{stems[j]}.png", gradcam_png(image, cams[j], title))


def _write_ablation(w: _Writer, model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> None:
    result = ablate(model, batches, progress=True)
    w.write("ablation.json", json.dumps(result, indent=2) + "\n")
    w.write("ablation.png", ablation_png(result))


def _write_features(
    w: _Writer, model: nn.Module, pp: Any, layer: str, opts: ExplainOptions
) -> None:
    chans = list(range(opts.channels))
    imgs = visualise_feature(
        model, layer, chans, pp.mean, pp.std, opts.feature_size, opts.feature_steps
    )
    w.write(_features_name(layer), features_png(imgs, layer, chans))


def data_batches(
    predictor: Any, data: str | Path, limit: int, batch_size: int = 50
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised (x, labels) batches of the first `limit` test images of the checkpoint's data
    set (CIFAR under a data root) or of a folder of class sub-folders, evenly spread."""
    from googlenet.infer.evaluate import Member, eval_batches

    member = Member(predictor.model, predictor.meta, "checkpoint")
    batches, _, _ = eval_batches(member, data, batch_size, limit)
    for images, labels, _ in batches:
        yield predictor.preprocess(images), labels
