"""Training augmentation, applied per batch as tensor ops: crop with padding, flip, cutout, the
paper's scale/aspect crop and photometric distortion. Everything random comes from the
torch.Generator the loader passes in, so augmentation is a function of (seed, epoch, rank)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from googlenet.errors import UserError


@dataclass
class Augment:
    """Training augmentation, applied per batch as tensor ops."""

    crop_padding: int = 0  # random crop of the source size after padding each side by this much
    flip: bool = False  # random horizontal flip
    alternate_flip: bool = False  # with flip: each image flipped on alternate epochs (random phase)
    cutout: int = 0  # side of a random square set to the mean (0 = off), in source pixels
    scale_aspect: bool = False  # paper's crop: 8%-100% of the area, aspect 3/4-4/3, resized
    photometric: bool = False  # brightness/contrast/saturation jitter + AlexNet PCA lighting
    padding_mode: str = "zero"  # "zero" or "reflect" padding for crop_padding
    jitter: float = 0.4  # strength of brightness/contrast/saturation jitter (factor 1 +- jitter)
    lighting: float = 0.1  # std of the PCA lighting noise (AlexNet)
    min_area: float = 0.08  # smallest crop area fraction for scale_aspect

    def __post_init__(self) -> None:
        if self.padding_mode not in ("zero", "reflect"):
            raise UserError(f"padding_mode must be 'zero' or 'reflect', got {self.padding_mode!r}")
        if self.crop_padding < 0 or self.cutout < 0:
            raise UserError("crop_padding and cutout must be >= 0")
        if not 0 < self.min_area <= 1:
            raise UserError(f"min_area must be in (0, 1], got {self.min_area}")


# ImageNet RGB eigen-decomposition used by AlexNet's lighting noise.
_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_PCA_EIGVEC = torch.tensor(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)


def crop_flip(
    x: torch.Tensor,
    pad: int,
    flip: torch.Tensor | None,
    mode: str,
    g: torch.Generator,
    out: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Random `out`-sized crop (default: the original size) from the padded batch, with an
    optional flip, as one gather with per-sample offsets (uint8 in, uint8 out)."""
    b, c, h0, w0 = x.shape
    h, w = out or (h0, w0)
    if pad:
        if mode == "reflect":
            x = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(torch.uint8)
        else:
            x = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, h0 + 2 * pad - h + 1, (b, 1), generator=g)
    ox = torch.randint(0, w0 + 2 * pad - w + 1, (b, 1), generator=g)
    rows = oy + torch.arange(h)  # b x h
    cols = torch.arange(w).expand(b, w)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = ox + cols  # b x w
    dev = x.device
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return x[bi, ci, rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


def scale_aspect_boxes(
    b: int, h: int, w: int, min_area: float, g: torch.Generator, tries: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop boxes (x0, y0, width, height) for the paper's crop: area min_area..100%, aspect
    3/4..4/3, uniform position; the first of `tries` draws that fits, else the whole image."""
    area = torch.empty(b, tries).uniform_(min_area, 1.0, generator=g) * (h * w)
    log_r = torch.empty(b, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    r = torch.exp(log_r)
    cw, ch = torch.sqrt(area * r).round(), torch.sqrt(area / r).round()
    ok = (cw <= w) & (ch <= h) & (cw >= 1) & (ch >= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    pick = first.clamp(min=0)[:, None]
    cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.tensor(float(w)))
    ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.tensor(float(h)))
    x0 = (torch.rand(b, generator=g) * (w - cw + 1)).floor()
    y0 = (torch.rand(b, generator=g) * (h - ch + 1)).floor()
    return x0, y0, cw, ch


def photometric(
    x: torch.Tensor, jitter: float, lighting: float, g: torch.Generator
) -> torch.Tensor:
    """Brightness, contrast and saturation jitter, then PCA lighting, on 0..1 float images.

    Runs before the resize (see loader.BatchLoader.transform), so with scale_aspect the
    contrast mean is that of the whole source image rather than of the crop: a negligible
    difference."""
    b = x.shape[0]
    dev = x.device

    def factor() -> torch.Tensor:
        return torch.empty(b, 1, 1, 1).uniform_(1 - jitter, 1 + jitter, generator=g).to(dev)

    gray_w = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    x = x * factor()  # brightness
    mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * factor() + mean  # contrast
    gray = (x * gray_w).sum(1, keepdim=True)
    x = (x - gray) * factor() + gray  # saturation
    if lighting > 0:
        alpha = torch.randn(b, 3, generator=g) * lighting
        rgb = (alpha * _PCA_EIGVAL) @ _PCA_EIGVEC.T  # b x 3
        x = x + rgb.to(dev).view(b, 3, 1, 1)
    return x.clamp_(0, 1)


def cutout(x: torch.Tensor, size: int, fill: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Sets one random size x size square per image (clipped at the edges) to `fill`."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), generator=g).to(x.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=g).to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = size // 2
    m = (ys >= cy - half) & (ys < cy - half + size) & (xs >= cx - half) & (xs < cx - half + size)
    return torch.where(m[:, None], fill.view(1, -1, 1, 1), x)
