"""The speed-run: airbench's tricks for CIFAR-10 in a few epochs, in one place.

The default recipe (cifar10-fast) turns each of them on; other recipes turn them off, and
docs/results.md ranks them on a held-out slice. Read top to bottom, a run does this:

1. `whiten_init`: before training, conv1's filters become the whitening of (at most 5,000)
   training images' patches, in a + and a - copy (`whiten`, `whiten_conv1`). Skipped when
   `init` loads conv1 from a checkpoint.
2. `bn_momentum`, `freeze_bn_scale`: BatchNorm's running-statistics momentum, and its scales
   fixed at 1 (`apply_norm_options`, before the optimizer is made).
3. `norm_bias_lr_scale`: BatchNorm biases step this many times further, their weight decay
   scaled down by the same factor (`norm_bias_ids`, `norm_bias_lr`; optim.make_optimizer puts
   them in a group of their own).
4. `train_crop`, `train_crop_until`, `train_crop_stages`: the first steps train on smaller,
   unpadded crops whose sides grow in stages toward input_size (`crop_stages`; the loader's
   `small`).
5. `alternate_flip`: each image is flipped on alternate epochs instead of at random (the
   loader's augmentation, data/augment.py).
6. `lookahead_every`, `lookahead_decay`: every few steps the weights are pulled to a slow copy
   whose decay ramps up as (t/T)^3, smoothing the end of the run (`Lookahead`).

Also in the recipe, but general: the onecycle schedule with `warmup_min_steps` (optim.lr_at),
label smoothing, and the final validation's flip TTA with BatchNorm folded (validation.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from googlenet.data.arrays import stratified_indices
from googlenet.data.loader import BatchLoader
from googlenet.errors import note
from googlenet.training.config import TrainConfig
from googlenet.transforms import Preprocess

# --- 1. patch-whitening initialisation --------------------------------------------------------


@torch.no_grad()
def whiten_conv1(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> int:
    """Patch-whitening initialisation (airbench): the first convolution's filters become the
    eigenvectors of the covariance of its input patches, scaled by 1/sqrt(eigenvalue), each in
    a + and a - copy, largest eigenvalues first; filters beyond 2 x patch size keep their init.
    `images`: normalised N x 3 x H x W training images. Returns the filters set."""
    conv = model.conv1.conv if hasattr(model.conv1, "conv") else model.conv1
    w = conv.weight  # out x 3 x k x k
    k = w.shape[-1]
    patches = F.unfold(images.float(), k, stride=conv.stride).transpose(1, 2).reshape(-1, 3 * k * k)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / patches.shape[0]
    eigval, eigvec = torch.linalg.eigh(cov.double())  # ascending
    n = min(w.shape[0] // 2, eigvec.shape[1])
    filt = (eigvec[:, -n:].flip(1) / (eigval[-n:].flip(0) + eps).sqrt()).T.float()
    filt = filt.reshape(n, 3, k, k).to(w.dtype)
    w[:n] = filt.to(w.device)
    w[n : 2 * n] = -filt.to(w.device)
    if conv.bias is not None:
        conv.bias[: 2 * n] = 0
    return 2 * n


def whiten(raw: nn.Module, train_set: Any, cfg: TrainConfig, size: int, mean, std) -> None:
    """conv1 from the whitening of (at most 5,000) training images' patches, unaugmented.
    Streamed data (shards) has no random access to sample from: skipped with a note."""
    if getattr(train_set, "labels", None) is None or not hasattr(train_set, "subset"):
        note("whiten_init: skipped, streamed training data cannot be sampled up front")
        return
    idx = stratified_indices(train_set.labels, 5000, cfg.seed + 2)
    pp = Preprocess(size, mean, std, size)
    loader = BatchLoader(train_set.subset(idx), len(idx), preprocess=pp)
    x, _ = next(iter(loader))
    whiten_conv1(raw, x)


# --- 2. BatchNorm options -----------------------------------------------------------------------


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def apply_norm_options(cfg: TrainConfig, model: nn.Module) -> None:
    """BatchNorm momentum, and scales frozen at 1 (before the optimizer is made)."""
    for m in norm_layers(model):
        m.momentum = cfg.bn_momentum
        if cfg.freeze_bn_scale and m.weight is not None:
            with torch.no_grad():
                m.weight.fill_(1.0)
            m.weight.requires_grad_(False)


# --- 3. a larger step for the BatchNorm biases ------------------------------------------------


def norm_bias_ids(cfg: TrainConfig, model: nn.Module) -> set[int]:
    """id() of the parameters norm_bias_lr_scale applies to: BatchNorm biases, none at 1."""
    if cfg.norm_bias_lr_scale == 1:
        return set()
    return {id(m.bias) for m in norm_layers(model) if m.bias is not None}


def norm_bias_lr(cfg: TrainConfig, scale: float) -> tuple[float, float]:
    """(lr scale, weight decay) of a BatchNorm bias whose lr scale is otherwise `scale`.
    airbench's trick: a much larger step for the BN shifts, with the decay scaled down by the
    same factor so the decay per step stays as it was."""
    wd = cfg.weight_decay / cfg.norm_bias_lr_scale if cfg.decay_norm_bias else 0.0
    return scale * cfg.norm_bias_lr_scale, wd


# --- 4. smaller crops first ---------------------------------------------------------------------


def crop_stages(cfg: TrainConfig, size: int, raw: nn.Module, total: int) -> list[tuple[int, int]]:
    """(side, end step) of each train_crop stage (smaller crops first: the same pixels per
    object, fewer per image), never below what the variant takes; [] when that is not below
    `size`. The train_crop_until steps split evenly into train_crop_stages growing sides."""
    small = max(round(cfg.train_crop * size), raw.spec.min_input_size)
    if small >= size:
        return []
    n, steps = cfg.train_crop_stages, round(cfg.train_crop_until * total)
    stages = []
    for k in range(n):
        side = small + round((size - small) * k / n)
        raw.check_input(torch.empty(0, 3, side, side))
        stages.append((side, round(steps * (k + 1) / n)))
    return stages


# --- 6. lookahead -------------------------------------------------------------------------------


def _float_states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.dtype.is_floating_point}


class Lookahead:
    """Every `every` steps the slow copy moves toward the model (slow += (1-decay)(fast-slow)) and
    the model is reset to it. The decay ramps from 0 to `decay` as (step/total)^3, so early
    training is unaffected and the end of the run is smoothed (airbench's schedule). BatchNorm
    statistics are averaged with the weights. At the end the model holds the slow weights."""

    def __init__(self, model: nn.Module, every: int, decay: float, total_steps: int) -> None:
        self.slow = {k: t.detach().clone() for k, t in _float_states(model).items()}
        self.every, self.decay, self.total = every, decay, max(1, total_steps)

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step `step` (0-based over the run)."""
        done = step + 1
        if done % self.every and done != self.total:
            return
        d = self.decay * (done / self.total) ** 3
        slow, fast = list(self.slow.values()), list(_float_states(model).values())
        torch._foreach_lerp_(slow, fast, 1 - d)
        torch._foreach_copy_(fast, slow)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.slow)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, t in self.slow.items():
            t.copy_(tensors[k])
