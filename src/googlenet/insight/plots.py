"""Pictures of what insight measures, as PNG bytes: branch usage, ablation, Grad-CAM overlays,
feature visualisations. matplotlib (Agg) is imported only when a chart is drawn."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from googlenet.insight.branches import BRANCHES, BranchUsage


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


def overlay(image: Tensor, cam: Tensor, alpha: float = 0.5, min_side: int = 224) -> np.ndarray:
    """0..1 RGB 3 x H x W and an H x W map in 0..1 -> uint8 H' x W' x 3 heat-map overlay,
    upscaled (nearest) so small CIFAR images are visible."""
    from matplotlib import colormaps

    heat = torch.from_numpy(colormaps["jet"](cam.numpy())[..., :3]).permute(2, 0, 1).float()
    mixed = (1 - alpha) * image.float() + alpha * heat
    return as_rgb_array(upscale(mixed, min_side))


def upscale(image: Tensor, min_side: int) -> Tensor:
    """3 x H x W enlarged by a whole factor (nearest) until its shorter side is >= min_side."""
    h, w = image.shape[-2:]
    k = max(1, math.ceil(min_side / min(h, w)))
    if k == 1:
        return image
    return image.repeat_interleave(k, -2).repeat_interleave(k, -1)


def as_rgb_array(image: Tensor) -> np.ndarray:
    """0..1 RGB 3 x H x W -> uint8 H x W x 3, rounded."""
    return (image.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()


def gradcam_png(image: Tensor, cam: Tensor, title: str = "") -> bytes:
    """The image and its Grad-CAM overlay side by side, with a title line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.9))
    axes[0].imshow(as_rgb_array(upscale(image, 224)))
    axes[1].imshow(overlay(image, cam))
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


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


def features_png(images: Tensor, layer: str, channels: Sequence[int]) -> bytes:
    plt = _pyplot()
    n = len(channels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, c in zip(axes.flat, images, channels, strict=False):
        ax.imshow(as_rgb_array(img))
        ax.set_title(f"{layer} ch {c}", fontsize=8)
    fig.tight_layout()
    return _png(fig)
