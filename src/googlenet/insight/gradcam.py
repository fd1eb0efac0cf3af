"""Where the evidence for a class lies: Grad-CAM at an inception block or branch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from googlenet.insight.branches import resolve_layer

DEFAULT_BLOCK = "inception5b"


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
