"""Test-time augmentation (TTA): the views of an input and their averaged predictions.

Two kinds. The input views (none, flip, flip-shift: `input_views`) are made from the model
input exactly as preprocessing gives it, and their logits are averaged (`tta_logits`);
training's final validation and `googlenet evaluate` both call it, so evaluate reproduces
training. The paper's crops (10crop, 144crop) cut the image anew at several scales and average
softmax (`tta_probs`, `ensemble_probs`).

TTA geometry is relative to the model's input size S, so the paper's 224-pixel scheme scales
down to 32-pixel CIFAR models: 144crop resizes the shorter side to S * {256, 288, 320, 352} / 224,
takes the left/centre/right (top/centre/bottom) squares, from each the 4 corner and centre S x S
crops plus the whole square resized to S, and mirrors all of them (4 x 3 x 6 x 2 = 144).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from googlenet.errors import UserError
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
