"""Look inside a GoogLeNet: which inception branch carries the signal (branch usage, ablation),
where the evidence for a class lies (Grad-CAM), what the first layer learned (filters) and what a
channel responds to (feature visualisation).

Branch usage: a branch's energy is the sum of its squared activations over channels and
positions; its share is that energy over the four branches' sum. The per-channel version divides
each energy by the branch's width first (3a: 64 / 128 / 32 / 32 channels), then normalises.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from googlenet.errors import UserError
from googlenet.model import Inception

BRANCHES = ("1x1", "3x3", "5x5", "pool")  # Inception.branch1 .. branch4
DEFAULT_BLOCK = "inception5b"


# --- blocks and branches ----------------------------------------------------------------------


def inception_blocks(model: nn.Module) -> dict[str, Inception]:
    """The inception blocks of a network by attribute name (inception3a ... inception5b)."""
    blocks = {n: m for n, m in model.named_children() if isinstance(m, Inception)}
    if not blocks:
        raise UserError(f"{type(model).__name__} has no inception blocks to explain")
    return blocks


def branch_module(block: Inception, branch: str) -> nn.Module:
    if branch not in BRANCHES:
        raise UserError(f"unknown branch {branch!r}; expected one of {', '.join(BRANCHES)}")
    return getattr(block, f"branch{BRANCHES.index(branch) + 1}")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """'inception4c' or 'inception4c:3x3' (a block, or one of its branches) -> the module.
    The 'inception' prefix may be left out ('4c:5x5')."""
    block_name, _, branch = name.partition(":")
    blocks = inception_blocks(model)
    if not block_name.startswith("inception"):
        block_name = "inception" + block_name
    if block_name not in blocks:
        raise UserError(f"unknown block {name!r}; expected one of {', '.join(blocks)}")
    block = blocks[block_name]
    return branch_module(block, branch) if branch else block


@contextmanager
def _branch_hooks(
    model: nn.Module, fn: Callable[[str, int, Tensor], Tensor | None]
) -> Iterator[None]:
    """Forward hooks on every branch of every block: fn(block, branch index, output)."""
    handles = []
    try:
        for name, block in inception_blocks(model).items():
            for i in range(len(BRANCHES)):
                mod = getattr(block, f"branch{i + 1}")

                def hook(_m, _inp, out, name=name, i=i):
                    return fn(name, i, out)

                handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


# --- branch usage -----------------------------------------------------------------------------


@dataclass
class BranchUsage:
    """Branch energies of a set of images: energy[block] is N x 4 (float64, branch order
    BRANCHES); widths[block] the branches' channel counts; sources one name per image."""

    energy: dict[str, Tensor]
    widths: dict[str, tuple[int, ...]]
    sources: list[str] = field(default_factory=list)
    outputs: Tensor | None = None  # the model's output (logits) for these images

    def __len__(self) -> int:
        return next(iter(self.energy.values())).shape[0] if self.energy else 0

    def shares(self, per_channel: bool = False) -> dict[str, Tensor]:
        """block -> N x 4 shares, each row summing to 1 (per channel: energy / width first)."""
        out = {}
        for block, e in self.energy.items():
            if per_channel:
                e = e / torch.tensor(self.widths[block], dtype=e.dtype)
            out[block] = e / e.sum(1, keepdim=True).clamp_min(1e-300)
        return out

    def mean_shares(self, per_channel: bool = False) -> dict[str, Tensor]:
        """block -> 4 shares: the mean over images of each image's shares (sums to 1)."""
        return {b: s.mean(0) for b, s in self.shares(per_channel).items()}

    def cat(self, other: BranchUsage) -> BranchUsage:
        if not self.energy:
            return other
        energy = {b: torch.cat([e, other.energy[b]]) for b, e in self.energy.items()}
        outputs = None
        if self.outputs is not None and other.outputs is not None:
            outputs = torch.cat([self.outputs, other.outputs])
        return BranchUsage(energy, self.widths, self.sources + other.sources, outputs)

    def to_json(self, images: Sequence[int] | None = None) -> dict[str, Any]:
        """{"images": {source: {block: {"1x1": s, ...}}}, "mean": {block: {...}},
        "per_channel": {"images": ..., "mean": ...}, "widths": ..., "n": N}; `images`
        picks which rows are listed per image (default all)."""
        rows = range(len(self)) if images is None else images

        def section(per_channel: bool) -> dict[str, Any]:
            sh = self.shares(per_channel)
            mean = self.mean_shares(per_channel)
            return {
                "images": {self.sources[i]: {b: _named(s[i]) for b, s in sh.items()} for i in rows},
                "mean": {b: _named(m) for b, m in mean.items()},
            }

        return {
            **section(False),
            "per_channel": section(True),
            "widths": {b: dict(zip(BRANCHES, w, strict=True)) for b, w in self.widths.items()},
            "n": len(self),
        }


def _named(row: Tensor) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in zip(BRANCHES, row, strict=True)}


@torch.no_grad()
def branch_energy(model: nn.Module, x: Tensor, sources: Sequence[str] | None = None) -> BranchUsage:
    """Branch energies of one normalised N x 3 x S x S batch through an eval-mode model."""
    energy: dict[str, Tensor] = {}
    widths: dict[str, list[int]] = {}
    n = x.shape[0]

    def record(block: str, i: int, out: Tensor) -> None:
        e = energy.setdefault(block, torch.zeros(n, len(BRANCHES), dtype=torch.float64))
        e[:, i] = out.double().pow(2).sum((1, 2, 3)).cpu()
        widths.setdefault(block, [0] * len(BRANCHES))[i] = out.shape[1]

    with _branch_hooks(model, record):
        out = model(x)
    names = list(sources) if sources is not None else [str(i) for i in range(n)]
    logits = out.detach().float().cpu() if isinstance(out, Tensor) else None
    return BranchUsage(energy, {b: tuple(w) for b, w in widths.items()}, names, logits)


def branch_usage_png(usage: BranchUsage, title: str = "branch usage") -> bytes:
    """A bar chart per block: mean share of each branch, energy and per channel."""
    plt = _pyplot()
    blocks = list(usage.energy)
    cols = min(len(blocks), 5)
    rows = math.ceil(len(blocks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.2 * rows + 0.4), squeeze=False)
    mean, per_ch = usage.mean_shares(), usage.mean_shares(per_channel=True)
    xs = np.arange(len(BRANCHES))
    for ax, block in zip(axes.flat, blocks, strict=False):
        ax.bar(xs - 0.2, mean[block].numpy(), 0.4, label="energy", color="#3b75af")
        ax.bar(xs + 0.2, per_ch[block].numpy(), 0.4, label="per channel", color="#ef8636")
        ax.set_title(block.replace("inception", ""), fontsize=9)
        ax.set_xticks(xs, BRANCHES, fontsize=7)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(blocks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.suptitle(f"{title} (n={len(usage)})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# --- ablation ---------------------------------------------------------------------------------


@torch.no_grad()
def ablate(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], progress: bool = False
) -> dict[str, Any]:
    """Top-1 accuracy (%) with each branch of each block zeroed in turn, on normalised
    (x, labels) batches: {"baseline": acc, "n": N, "accuracy": {block: {branch: acc}},
    "drop": {block: {branch: baseline - acc}}}."""
    zero: tuple[str, int] | None = None

    def knock_out(block: str, i: int, out: Tensor) -> Tensor | None:
        return torch.zeros_like(out) if (block, i) == zero else None

    def accuracy() -> float:
        correct = total = 0
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
        return 100.0 * correct / max(total, 1)

    n = sum(len(y) for _, y in batches)
    if n == 0:
        raise UserError("ablation needs at least one labelled image (--data)")
    blocks = list(inception_blocks(model))
    from tqdm import tqdm

    bar = tqdm(total=len(blocks) * 4 + 1, desc="ablate", disable=not progress, leave=False)
    with _branch_hooks(model, knock_out):
        base = accuracy()
        bar.update()
        acc: dict[str, dict[str, float]] = {}
        for block in blocks:
            for i, branch in enumerate(BRANCHES):
                zero = (block, i)
                acc.setdefault(block, {})[branch] = accuracy()
                bar.update()
        zero = None
    bar.close()
    drop = {b: {k: round(base - v, 4) for k, v in row.items()} for b, row in acc.items()}
    return {"baseline": base, "n": n, "accuracy": acc, "drop": drop}


def ablation_png(result: dict[str, Any]) -> bytes:
    """Heat map of the accuracy drop (points) per block and zeroed branch."""
    plt = _pyplot()
    blocks = list(result["drop"])
    m = np.array([[result["drop"][b][k] for k in BRANCHES] for b in blocks])
    fig, ax = plt.subplots(figsize=(4.6, 0.42 * len(blocks) + 1.4))
    lim = max(float(np.abs(m).max()), 1e-6)
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(BRANCHES)), BRANCHES)
    ax.set_yticks(range(len(blocks)), [b.replace("inception", "") for b in blocks])
    for i in range(len(blocks)):
        for j in range(len(BRANCHES)):
            ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="top-1 drop (points)")
    ax.set_title(f"zeroing one branch (baseline {result['baseline']:.1f}%, n={result['n']})")
    fig.tight_layout()
    return _png(fig)


# --- Grad-CAM ---------------------------------------------------------------------------------


def gradcam(
    model: nn.Module, x: Tensor, target: int | Sequence[int] | Tensor, layer: str = DEFAULT_BLOCK
) -> Tensor:
    """Grad-CAM maps N x H x W in 0..1 (each image scaled by its max) of class `target` at the
    output of `layer` (a block or block:branch), upsampled to the input size:
    ReLU(sum_k mean_xy(d logit / d A_k) * A_k). The same numbers as Captum's LayerGradCam
    (checked in the tests), without Captum's import time (seconds) in the report and server."""
    module = resolve_layer(model, layer)
    n = x.shape[0]
    if isinstance(target, int):
        targets = torch.full((n,), target, dtype=torch.long)
    else:
        targets = torch.as_tensor(target, dtype=torch.long).reshape(-1).expand(n)
    with torch.enable_grad():
        cam = _gradcam_plain(model, module, x.detach().float(), targets)
    cam = F.interpolate(cam.detach().float(), size=x.shape[-2:], mode="bilinear")[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).clamp_(0, 1)


def _gradcam_plain(model: nn.Module, module: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    acts: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    score = logits.gather(1, targets.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, acts[0])
    weights = grad.mean((2, 3), keepdim=True)
    return F.relu((weights * acts[0]).sum(1, keepdim=True))


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised 3 x H x W (or N x 3 x H x W) -> 0..1 RGB."""
    m = x.new_tensor(mean).view(-1, 1, 1)
    s = x.new_tensor(std).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1)


def overlay(image: Tensor, cam: Tensor, alpha: float = 0.5, min_side: int = 224) -> np.ndarray:
    """0..1 RGB 3 x H x W and an H x W map in 0..1 -> uint8 H' x W' x 3 heat-map overlay,
    upscaled (nearest) so small CIFAR images are visible."""
    from matplotlib import colormaps

    heat = torch.from_numpy(colormaps["jet"](cam.numpy())[..., :3]).permute(2, 0, 1).float()
    mixed = (1 - alpha) * image.float() + alpha * heat
    return _to_uint8(_upscale(mixed, min_side))


def _upscale(image: Tensor, min_side: int) -> Tensor:
    h, w = image.shape[-2:]
    k = max(1, math.ceil(min_side / min(h, w)))
    if k == 1:
        return image
    return image.repeat_interleave(k, -2).repeat_interleave(k, -1)


def _to_uint8(image: Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()


def gradcam_png(image: Tensor, cam: Tensor, title: str = "") -> bytes:
    """The image and its Grad-CAM overlay side by side, with a title line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.9))
    axes[0].imshow(_to_uint8(_upscale(image, 224)))
    axes[1].imshow(overlay(image, cam))
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


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
    return _to_uint8(grid)


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


def features_png(images: Tensor, layer: str, channels: Sequence[int]) -> bytes:
    plt = _pyplot()
    n = len(channels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, c in zip(axes.flat, images, channels, strict=False):
        ax.imshow(_to_uint8(img))
        ax.set_title(f"{layer} ch {c}", fontsize=8)
    fig.tight_layout()
    return _png(fig)


# --- files --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


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
    ablation.json/.png, features_<layer>.png when asked) into `out`; returns the paths."""
    out = Path(out)
    model = predictor.model
    files, x, target = _load_inputs(predictor, images, opts)
    stems = stem_names(files)
    _refuse_overwrite(out, stems, opts)
    w = _Writer(out)
    model.eval()
    usage = _image_usage(model, files, x, opts.batch_size)
    batches: list[tuple[Tensor, Tensor]] = []  # labelled --data images: the mean, ablation
    if opts.data is not None:
        batches = list(data_batches(predictor, opts.data, opts.limit, opts.batch_size))
    _write_branch_usage(w, model, usage, batches, files, opts)
    w.write("filters.png", png_bytes(filters_grid(model)))
    if files:
        _write_gradcams(w, predictor, files, stems, x, target, opts)
    if opts.ablate:
        _write_ablation(w, model, batches)
    if opts.features:
        _write_features(w, model, predictor.preprocess, opts.features, opts)
    return w.written


def _load_inputs(
    predictor: Any, images: Sequence[str | Path], opts: ExplainOptions
) -> tuple[list[Path], Tensor, int | None]:
    """The image files, their normalised N x 3 x S x S batch and the Grad-CAM class (None:
    each image's prediction); a bad request fails here, before any image is read."""
    from googlenet.infer.inference import iter_image_files
    from googlenet.transforms import read_image

    model, pp = predictor.model, predictor.preprocess
    files = [Path(p) for p in iter_image_files(images)]
    if not files and opts.data is None:
        raise UserError("no images to explain: give image files or folders, or --data")
    if opts.ablate and opts.data is None:
        raise UserError("--ablate needs --data (a labelled data set to measure accuracy on)")
    target = class_index(predictor.classes, opts.target) if opts.target else None
    resolve_layer(model, opts.block)  # fail early on a bad name
    x = torch.empty(0, 3, pp.input_size, pp.input_size)
    if files:
        x = torch.stack([pp(read_image(f)) for f in files])
    return files, x, target


def _features_name(layer: str) -> str:
    return f"features_{layer.replace(':', '_')}.png"


def _refuse_overwrite(out: Path, stems: Sequence[str], opts: ExplainOptions) -> None:
    """Unless --force, fail before anything is written if a file this run writes exists."""
    planned = ["branch_usage.json", "branch_usage.png", "filters.png"]
    planned += [f"gradcam_{s}.png" for s in stems]
    if opts.ablate:
        planned += ["ablation.json", "ablation.png"]
    if opts.features:
        planned.append(_features_name(opts.features))
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


def _image_usage(
    model: nn.Module, files: Sequence[Path], x: Tensor, batch_size: int
) -> BranchUsage:
    usage = BranchUsage({}, {})
    for i in range(0, len(files), batch_size):
        names = [str(f) for f in files[i : i + batch_size]]
        usage = usage.cat(branch_energy(model, x[i : i + batch_size], names))
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
    target: int | None,
    opts: ExplainOptions,
) -> None:
    """gradcam_<stem>.png per image, titled with the prediction and the class explained."""
    model, pp, classes = predictor.model, predictor.preprocess, predictor.classes
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), 1)
    for i in range(0, len(files), opts.batch_size):
        xb = x[i : i + opts.batch_size]
        pb = probs[i : i + opts.batch_size]
        tgt = pb.argmax(1) if target is None else torch.full((len(xb),), target)
        cams = gradcam(model, xb, tgt, opts.block)
        for j in range(len(xb)):
            k = int(tgt[j])
            title = (
                f"{files[i + j].name}: predicted {classes[int(pb[j].argmax())]} "
                f"{100 * float(pb[j].max()):.1f}%; Grad-CAM for {classes[k]} "
                f"at {opts.block}"
            )
            image = denormalize(xb[j], pp.mean, pp.std)
            w.write(f"gradcam_{stems[i + j]}.png", gradcam_png(image, cams[j], title))


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
