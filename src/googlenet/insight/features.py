"""What the network learned: the first layer's filters, and what a channel responds to
(feature visualisation: an input optimised to excite it, after Olah et al., Distill 2017)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from googlenet.errors import UserError
from googlenet.insight.branches import BRANCHES, branch_module, resolve_layer
from googlenet.insight.plots import as_rgb_array

# --- first-layer filters ----------------------------------------------------------------------


def filters_grid(model: nn.Module, zoom: int | None = None) -> np.ndarray:
    """The first convolution's filters as a uint8 RGB grid (8 per row, 0 = mid grey, each
    filter scaled by its own max |w|), upscaled by `zoom` (default: about 48 px per filter)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.in_channels != 3:
        raise UserError("the network has no first convolution on RGB input")
    w = conv.weight.detach().float().cpu()  # C x 3 x k x k
    w = w / (2 * w.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)) + 0.5
    c, _, k, _ = w.shape
    zoom = zoom or max(1, 48 // k)
    cols = min(8, c)
    rows = math.ceil(c / cols)
    pad = 2
    cell = k * zoom + pad
    grid = torch.ones(3, rows * cell + pad, cols * cell + pad)
    for i in range(c):
        r, q = divmod(i, cols)
        tile = w[i].repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
        top, left = pad + r * cell, pad + q * cell
        grid[:, top : top + k * zoom, left : left + k * zoom] = tile
    return as_rgb_array(grid)


# --- feature visualisation ----------------------------------------------------------------------

# Lucid's colour decorrelation: the square root of ImageNet's RGB covariance (its SVD).
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR_SQRT = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


class FourierImage(nn.Module):
    """A decorrelated image parameterisation (Olah et al., Distill 2017): the parameters are
    the image's Fourier coefficients scaled by 1/frequency (so that plain gradient steps have
    the spectrum of natural images), in decorrelated colour space, squashed by a sigmoid."""

    def __init__(self, size: int, batch: int = 1, sd: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        fy = torch.fft.fftfreq(size).view(-1, 1)
        fx = torch.fft.rfftfreq(size).view(1, -1)
        freq = (fy**2 + fx**2).sqrt()
        self.register_buffer("scale", 1.0 / freq.clamp_min(1.0 / size))
        shape = (batch, 3, size, size // 2 + 1, 2)
        self.spectrum = nn.Parameter(torch.randn(shape, generator=g) * sd)
        self.size = size

    def forward(self) -> Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        img = torch.fft.irfftn(spec, s=(self.size, self.size), norm="ortho", dim=(-2, -1)) / 4.0
        img = torch.einsum("nchw,dc->ndhw", img, _COLOR_SQRT.to(img))
        return torch.sigmoid(img)


def _random_transform(img: Tensor, g: torch.Generator) -> Tensor:
    """Lucid's standard transforms scaled to the image size: pad, jitter, scale, rotate,
    jitter (robustness to these is what makes the optimised image readable)."""
    s = img.shape[-1]
    pad, j1, j2 = max(1, s // 10), max(1, s // 16), max(1, s // 32)
    img = F.pad(img, (pad,) * 4, mode="constant", value=0.5)

    def jitter(t: Tensor, d: int) -> Tensor:
        dy, dx = (int(v) for v in torch.randint(0, d + 1, (2,), generator=g))
        h, w = t.shape[-2:]
        return t[..., dy : h - d + dy, dx : w - d + dx]

    img = jitter(img, j1)
    scale = 1 + (int(torch.randint(0, 11, (1,), generator=g)) - 5) / 50
    angle = math.radians(int(torch.randint(-10, 11, (1,), generator=g)))
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = img.new_tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(img.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, padding_mode="border", align_corners=False)
    return jitter(img, j2)


class _Stop(Exception):
    """Raised by a hook to end the forward pass once the target layer has run."""


def channel_source(model: nn.Module, layer: str, channel: int) -> tuple[nn.Module, int]:
    """Where channel `channel` of `layer` (a block, or block:branch) is computed before its
    ReLU: (the branch's last BatchNorm, or conv without BN, and the channel in it). Lucid
    optimises pre-ReLU values too: a channel that is 0 after the ReLU has no gradient."""
    block_name, _, branch = layer.partition(":")
    block = resolve_layer(model, block_name)
    names = [branch] if branch else list(BRANCHES)
    local = channel
    for name in names:
        last = branch_module(block, name)
        if isinstance(last, nn.Sequential):
            last = last[-1]
        width = last.conv.out_channels
        if local < width:
            return (last.bn if last.bn is not None else last.conv), local
        local -= width
    total = channel - local
    raise UserError(f"channel {channel} out of range: {layer} has {total} channels")


def channel_activation(model: nn.Module, layer: str, channels: Sequence[int], x: Tensor) -> Tensor:
    """The mean over positions of each image's channel before the ReLU (N, with N =
    len(channels): image i is scored on channels[i]); the forward stops after the block."""
    sources = [channel_source(model, layer, c) for c in channels]
    captured: dict[int, Tensor] = {}
    handles = []

    def keep(m: nn.Module, _inp: Any, out: Tensor) -> None:
        captured[id(m)] = out.clone()  # the ReLU that follows works in place

    def stop(*_: Any) -> None:
        raise _Stop

    try:
        for m in {id(m): m for m, _ in sources}.values():
            handles.append(m.register_forward_hook(keep))
        handles.append(resolve_layer(model, layer.partition(":")[0]).register_forward_hook(stop))
        with suppress(_Stop):
            model(x)
    finally:
        for h in handles:
            h.remove()
    rows = [captured[id(m)][i, c].mean() for i, (m, c) in enumerate(sources)]
    return torch.stack(rows)


def visualise_feature(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    size: int = 128,
    steps: int = 256,
    lr: float = 0.05,
    seed: int = 0,
    transforms: bool = True,
) -> Tensor:
    """Images (len(channels) x 3 x size x size, 0..1) that maximise the mean pre-ReLU
    activation of each channel of `layer` ('inception4c' or 'inception4c:3x3'), optimised
    together in one batch with Adam on a FourierImage under random transforms."""
    for c in channels:
        channel_source(model, layer, c)  # fail early on a bad layer or channel
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    param = FourierImage(size, batch=len(channels), seed=seed)
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    try:
        for _ in range(steps):
            img = param()
            if transforms:
                img = _random_transform(img, g)
            objective = channel_activation(model, layer, channels, (img - m) / s).sum()
            opt.zero_grad()
            (-objective).backward()
            opt.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    with torch.no_grad():
        return param().detach()
