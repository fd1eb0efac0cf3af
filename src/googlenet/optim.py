"""Optimisation: the learning-rate schedule (set per step), SGD with weight decay on conv/linear
weights only, and EMA / Polyak weight averaging."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from googlenet.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based, counted over the whole run)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":  # the tutorial's Keras LearningRateScheduler, per epoch
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** math.floor((1 + epoch) / cfg.step_epochs)
    warm = round(cfg.warmup * total)
    if step < warm:  # linear warmup from lr/warm to lr
        return cfg.lr * (step + 1) / warm
    t = (step - warm + 1) / max(1, total - warm)  # 0 -> 1 over the decay, ending at 0
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return cfg.lr * max(0.0, 1 - t)  # onecycle: linear decay to 0


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD; weight decay on conv/linear weights only unless decay_norm_bias."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or cfg.decay_norm_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )


class WeightAverage:
    """A shadow copy of the model whose weights (and BN statistics) are an average of the
    training iterates: EMA (decay ramped up as min(decay, (1+n)/(10+n))) or Polyak's plain
    mean of all iterates (decay n/(n+1))."""

    def __init__(self, model: nn.Module, decay: float, polyak: bool) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.polyak = decay, polyak
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = self.updates
        d = n / (n + 1) if self.polyak else min(self.decay, (1 + n) / (10 + n))
        src = model.state_dict()
        floats_avg, floats_src = [], []
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                floats_avg.append(v)
                floats_src.append(src[k])
            else:
                v.copy_(src[k])  # e.g. num_batches_tracked
        torch._foreach_lerp_(floats_avg, floats_src, 1 - d)
        self.updates += 1
