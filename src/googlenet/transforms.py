"""How an image becomes a model input: decoding files to uint8 RGB tensors, and `Preprocess`
(shorter-side resize, centre crop, normalisation) as recorded in a checkpoint.

Also the per-channel statistics of the data sets (on the 0..1 pixel scale) that `Preprocess`
normalises with.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from googlenet.errors import UserError

# Per-channel statistics of the training sets, on the 0..1 pixel scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- image files ------------------------------------------------------------------------------


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16/32-bit grey scaled down, alpha composited onto white, palette,
    CMYK and the rest through Pillow's own conversion."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode != "F" and a.max(initial=0) > 255:  # 16-bit range
            a = a / 257.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


def _open_rgb(path: Path | bytes, draft: int | None = None, name: str | None = None) -> Image.Image:
    """Decoded, EXIF-upright RGB image from a file or its bytes; UserError naming the file
    (or `name`) when it cannot be read."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))  # DCT-domain downscale: much faster decoding
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except _DECODE_ERRORS as e:
        raise UserError(f"{name or path}: not a readable image ({e})") from e


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 3 x H x W RGB (EXIF orientation applied; grey, RGBA, palette,
    CMYK and 16-bit converted). UserError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    return _pil_to_tensor(_open_rgb(path))


def read_image_resized(
    path: str | Path | bytes, size: int, name: str | None = None
) -> torch.Tensor:
    """An image file (or its bytes, called `name` in errors) resized so its shorter side is
    `size`, centre-cropped to size x size."""
    im = _open_rgb(path if isinstance(path, bytes) else Path(path), draft=size, name=name)
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return _pil_to_tensor(im.crop((left, top, left + size, top + size)))


# --- preprocessing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """How a checkpoint's model expects its input (meta["preprocess"])."""

    input_size: int  # side of the square crop fed to the model
    mean: tuple[float, float, float]  # per-channel mean on the 0..1 scale
    std: tuple[float, float, float]  # per-channel std on the 0..1 scale
    resize: int | None = None  # shorter side before the centre crop; None: input_size

    @classmethod
    def from_meta(cls, meta: dict[str, Any], source: str = "checkpoint") -> Preprocess:
        pp = meta.get("preprocess")
        if not isinstance(pp, dict):
            raise UserError(f"{source}: checkpoint metadata has no 'preprocess' section")
        try:
            return cls(
                input_size=int(pp["input_size"]),
                mean=tuple(float(v) for v in pp["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in pp["std"]),  # type: ignore[arg-type]
                resize=None if pp.get("resize") is None else int(pp["resize"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: bad 'preprocess' metadata {pp!r}: {e}") from e

    @property
    def shorter_side(self) -> int:
        return self.resize or self.input_size


def to_float(images: Tensor) -> Tensor:
    """uint8 0..255 -> float32 0..1; float input is taken as already on the 0..1 scale."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def resize_shorter(images: Tensor, size: int) -> Tensor:
    """Resize a float N x 3 x H x W batch so its shorter side is `size`, keeping the aspect."""
    h, w = images.shape[-2:]
    new = resized_shape(h, w, size)
    if new == (h, w):
        return images
    return F.interpolate(images, size=new, mode="bilinear", align_corners=False, antialias=True)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `size`, keeping the aspect ratio."""
    if min(height, width) == size:
        return height, width
    if height <= width:
        return size, max(1, round(width * size / height))
    return max(1, round(height * size / width)), size


def resize_square(images: Tensor, size: int) -> Tensor:
    """Resize a float N x 3 x H x W batch to size x size (no-op when already that size)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def center_crop(images: Tensor, size: int) -> Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = images.new_tensor(mean).view(-1, 1, 1)
    s = images.new_tensor(std).view(-1, 1, 1)
    return (images - m) / s


def preprocess_batch(images: Tensor, pp: Preprocess) -> Tensor:
    """uint8 (or 0..1 float) N x 3 x H x W -> the normalised N x 3 x S x S model input."""
    x = resize_shorter(to_float(images), pp.shorter_side)
    return normalize(center_crop(x, pp.input_size), pp.mean, pp.std).contiguous()


def resample_matrix(
    start: torch.Tensor, length: torch.Tensor, n_in: int, n_out: int
) -> torch.Tensor:
    """Per-sample 1-D resampling weights (b x n_out x n_in) taking the window
    [start, start + length) of an n_in-pixel axis to n_out pixels: bilinear when enlarging, a
    wider triangle (antialiased, like PIL) when shrinking; rows are normalised so edges replicate.
    Matches F.interpolate(bilinear, align_corners=False, antialias=True) for a full window."""
    scale = length / n_out  # source pixels per output pixel, b
    centre = start[:, None] + (torch.arange(n_out) + 0.5) * scale[:, None]  # b x n_out
    support = scale.clamp(min=1)[:, None, None]
    dist = (torch.arange(n_in) + 0.5)[None, None, :] - centre[:, :, None]
    w = (1 - dist.abs() / support).clamp_(min=0)
    return w / w.sum(2, keepdim=True)
