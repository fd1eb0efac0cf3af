"""How an image becomes a model input: decoding files to uint8 RGB tensors, and `Preprocess`
(shorter-side resize, centre crop, normalisation) as recorded in a checkpoint.

Also the per-channel statistics of the data sets (on the 0..1 pixel scale) that `Preprocess`
normalises with.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
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


# The one decoding policy, for files, bytes (uploads, shards) and PIL images alike. An image
# over either limit is refused before its pixels are decoded.
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit (about 89 MP, 268 MB as RGB)
MAX_ASPECT = 100  # longer side / shorter side: beyond it the shorter-side resize would explode


class ImageError(UserError):
    """An image the decoder cannot use. kind: "not an image" (no format Pillow knows),
    "broken" (a format, but the data fails to decode) or "refused" (over MAX_PIXELS or
    MAX_ASPECT); the server answers 415 for the first and 400 for the others."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _check_size(w: int, h: int, label: Any) -> None:
    if w * h > MAX_PIXELS:
        raise ImageError(
            f"{label}: refused: {w} x {h} pixels is more than {MAX_PIXELS:,} "
            "(a decompression bomb?)",
            "refused",
        )
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        raise ImageError(
            f"{label}: refused: {w} x {h} pixels, an aspect ratio beyond {MAX_ASPECT}:1",
            "refused",
        )


def decode_image(
    source: str | Path | bytes | Image.Image, name: str | None = None, draft: int | None = None
) -> Image.Image:
    """THE image decoder: a file, its bytes or a PIL image -> an upright RGB PIL image (EXIF
    orientation applied, alpha composited on white, 16-bit scaled, palette and CMYK
    converted). ImageError naming the image (`name`, else the path) when it is not an image,
    fails to decode, or its size breaks MAX_PIXELS or MAX_ASPECT (checked from the header,
    before anything is decoded). draft: a JPEG may be decoded at a reduced scale whose sides
    stay >= draft (much faster; the pixels differ slightly from a full decode)."""
    if isinstance(source, Image.Image):
        label: Any = name or "PIL image"
    else:
        label = name or ("image" if isinstance(source, bytes) else source)
    try:
        if isinstance(source, Image.Image):
            _check_size(*source.size, label)
            return _upright_rgb(source)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            _check_size(*im.size, label)
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))  # DCT-domain downscale: much faster decoding
            im.load()
            return _upright_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own check, should ours ever be laxer
        raise ImageError(f"{label}: refused: {e}", "refused") from e
    except Exception as e:  # Pillow raises many kinds (struct.error, IndexError, ...) on bad data
        kind = "not an image" if isinstance(e, UnidentifiedImageError) else "broken"
        raise ImageError(f"{label}: not a readable image ({type(e).__name__}: {e})", kind) from e


def _upright_rgb(im: Image.Image) -> Image.Image:
    return _to_rgb(ImageOps.exif_transpose(im))


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def image_tensor(source: str | Path | bytes | Image.Image, name: str | None = None) -> Tensor:
    """A file, its bytes or a PIL image as uint8 3 x H x W RGB, through decode_image."""
    return _pil_to_tensor(decode_image(source, name))


def read_image(path: str | Path, draft: int | None = None) -> torch.Tensor:
    """An image file as uint8 3 x H x W RGB (decode_image's policy). UserError naming the file
    when it is missing or unreadable. draft: see decode_image (for training images only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    return _pil_to_tensor(decode_image(path, draft=draft))


def read_image_resized(
    path: str | Path | bytes, size: int, name: str | None = None, draft: bool = False
) -> torch.Tensor:
    """An image file (or its bytes, called `name` in errors) as the size x size centre square
    of the image resized so its shorter side is `size` (Preprocess geometry and resampling;
    JPEG draft decoding if asked: faster, slightly different pixels)."""
    im = decode_image(
        path if isinstance(path, bytes) else Path(path), name, size if draft else None
    )
    return Preprocess.square(size).pixels(_pil_to_tensor(im).unsqueeze(0))[0]


# --- preprocessing ----------------------------------------------------------------------------


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `size`, torchvision's Resize(int) rule: the
    shorter side becomes `size`, the longer one int(size * long / short) (truncated)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_offset(length: int, crop: int) -> int:
    """Offset of a centred crop, torchvision's CenterCrop rule: int(round((length - crop) / 2))
    (Python's round: halves go to the even neighbour)."""
    return round((length - crop) / 2.0)


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


Box = tuple[Tensor, Tensor, Tensor, Tensor]  # per sample: x0, y0, width, height (source pixels)


def resample(
    x: Tensor,
    box: Box,
    out: tuple[int, int],
    flip: Tensor | None = None,
    channels_last: bool = False,
) -> Tensor:
    """THE resize: the `box` window of each float image in `x` (N x C x H x W) resampled to
    out = (height, width), optionally mirrored per sample, as two batched matmuls
    Wy @ (x @ Wx^T). Every resize and crop in the package (preprocessing, augmentation, TTA)
    goes through here."""
    b, _, h, w = x.shape
    x0, y0, cw, ch = box
    wy = resample_matrix(y0, ch, h, out[0]).to(x.device)
    wx = resample_matrix(x0, cw, w, out[1])
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    wx = wx.to(x.device)
    t = torch.matmul(x, wx[:, None].transpose(2, 3))  # b x C x h x out_w
    if channels_last:  # write the big output directly as b x out_h x out_w x C
        c = t.shape[1]
        t = t.permute(0, 2, 3, 1).reshape(b, h, out[1] * c)
        return torch.bmm(wy, t).view(b, out[0], out[1], c).permute(0, 3, 1, 2)
    return torch.matmul(wy[:, None], t)


def full_box(b: int, h: int, w: int) -> Box:
    """The whole image as a resample box, for b samples."""
    z = torch.zeros(b)
    return z, z, torch.full((b,), float(w)), torch.full((b,), float(h))


def resized_crop_box(
    h: int, w: int, scale: int | None, top: int, left: int, size: int, b: int = 1
) -> Box:
    """The source window of the size x size crop at (top, left) of the image resized so its
    shorter side is `scale` (None: not resized)."""
    rh, rw = resized_size(h, w, scale) if scale else (h, w)
    sy, sx = h / rh, w / rw
    return (
        torch.full((b,), left * sx),
        torch.full((b,), top * sy),
        torch.full((b,), size * sx),
        torch.full((b,), size * sy),
    )


def to_uint8(x: Tensor) -> Tensor:
    """0..255 float -> uint8, rounded (as PIL and torchvision round a resized image)."""
    return x.round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Preprocess:
    """How images become the model's input, stored in every checkpoint as validation used it:
    resize the shorter side to `resize` (None: no resize), centre-crop input_size x input_size,
    scale to 0..1, (x - mean) / std. Geometry follows torchvision's Resize(int) + CenterCrop
    rounding (resized_size, center_offset), so imported ImageNet weights see the pixels they
    were evaluated with; the resized image is rounded to uint8 as PIL/torchvision do."""

    input_size: int  # side of the square crop fed to the model
    mean: tuple[float, float, float]  # per-channel mean on the 0..1 scale
    std: tuple[float, float, float]  # per-channel std on the 0..1 scale
    resize: int | None = None  # shorter side before the centre crop; None: no resize

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.input_size < 1:
            raise UserError(f"preprocess: input_size must be >= 1, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(
                f"preprocess: mean and std need 3 values with std > 0, got {self.mean} and "
                f"{self.std}"
            )
        if self.resize is not None and self.resize < self.input_size:
            raise UserError(
                f"preprocess: resize {self.resize} is smaller than the {self.input_size}-pixel crop"
            )

    @classmethod
    def square(cls, side: int) -> Preprocess:
        """Unnormalised: the side x side centre square of the image resized so its shorter side
        is `side` (how images are stored and shown; pixels() gives it as uint8)."""
        return cls(side, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), side)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, pp: Any, source: str = "checkpoint") -> Preprocess:
        if not isinstance(pp, dict):
            raise UserError(f"{source}: 'preprocess' must be a table, got {pp!r}")
        try:
            return cls(
                input_size=int(pp["input_size"]),
                mean=tuple(float(v) for v in pp["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in pp["std"]),  # type: ignore[arg-type]
                resize=None if pp.get("resize") is None else int(pp["resize"]),
            )
        except KeyError as e:
            raise UserError(f"{source}: 'preprocess' has no field {e}") from e
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: bad 'preprocess' {pp!r}: {e}") from e

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> Preprocess:
        """From a model's pretrained_cfg (timm's keys): crop input_size from the image resized
        to floor(side / crop_pct), as timm's eval transform sizes it."""
        try:
            _, h, w = cfg["input_size"]
            crop_pct, interpolation = float(cfg["crop_pct"]), cfg["interpolation"]
            mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"pretrained_cfg: bad or missing key ({e!s})") from e
        if h != w or interpolation != "bilinear" or not 0 < crop_pct <= 1:
            raise UserError(
                f"pretrained_cfg: Preprocess takes square input, bilinear resampling and "
                f"0 < crop_pct <= 1, got input_size {cfg['input_size']}, {interpolation!r}, "
                f"crop_pct {crop_pct}"
            )
        return cls(int(h), mean, std, math.floor(int(h) / crop_pct))  # type: ignore[arg-type]

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, top, left) of the centre crop for an image."""
        rh, rw = resized_size(height, width, self.resize) if self.resize else (height, width)
        if min(rh, rw) < self.input_size:
            raise UserError(
                f"image {height}x{width} is smaller than the {self.input_size}-pixel crop "
                "(and preprocessing does not resize)"
            )
        return rh, rw, center_offset(rh, self.input_size), center_offset(rw, self.input_size)

    def pixels(self, images: Tensor) -> Tensor:
        """N x 3 x H x W images of one size -> their uint8 N x 3 x S x S centre crops, resized
        first and rounded to 8 bits (as PIL and torchvision round a resized image). Float
        images (0..1) are rounded to 8 bits first, so both kinds give the same pixels."""
        if images.dtype != torch.uint8:
            images = to_uint8(images.float() * 255)
        n, _, h, w = images.shape
        rh, rw, top, left = self.crop_box(h, w)
        s = self.input_size
        if (rh, rw) == (h, w):  # no resampling: a plain crop, as torchvision skips the resize
            return images[..., top : top + s, left : left + s]
        box = resized_crop_box(h, w, self.resize, top, left, s, n)
        return to_uint8(resample(images.float(), box, (s, s)))

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 (0..255) or float (0..1) pixels -> (x / 255 - mean) / std, float32 (float
        pixels, e.g. test-time crops, are used as they are)."""
        x = pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels.float()
        m = x.new_tensor(self.mean).view(-1, 1, 1)
        s = x.new_tensor(self.std).view(-1, 1, 1)
        return ((x - m) / s).contiguous()

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 (0..255) or float (0..1) N x 3 x H x W images of one size (or one 3 x H x W)
        -> the normalised float32 model input N x 3 x S x S: pixels(), then normalize()."""
        if images.dim() == 3:
            return self(images.unsqueeze(0))[0]
        return self.normalize(self.pixels(images))

    def working(self) -> Preprocess:
        """The preprocessing that keeps what this one crops from: a square of side `resize`
        (the whole resized image's centre), unnormalised; used to store images once so that
        this preprocessing (or random crops of input_size) can be applied later."""
        return Preprocess.square(self.resize or self.input_size)


def working_size(input_size: int) -> int:
    """The shorter side images are resized to before an input_size crop: the ImageNet ratio
    256/224, rounded so that (side - input_size) / 2 is even. Then cropping input_size from a
    stored side x side centre square gives the same pixels as cropping it from the whole
    resized image (torchvision's half-to-even rounding of the offset composes exactly)."""
    return input_size + 4 * round(input_size / 28)
