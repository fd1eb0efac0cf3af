"""Optimisation: the step count and learning-rate schedule (set per step), SGD with weight decay
on conv/linear weights only, EMA / Polyak weight averaging and which weights a run serves. The
speed-run tricks (BatchNorm options, the BatchNorm biases' larger step, lookahead, whitening
initialisation) are in speedrun.py."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from googlenet.errors import UserError
from googlenet.training.config import TrainConfig
from googlenet.training.finetune import is_head
from googlenet.training.speedrun import norm_bias_ids, norm_bias_lr


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: `epochs` may end within the last pass (1.5: one and a
    half passes), and the schedules span exactly these steps."""
    return max(1, round(cfg.epochs * steps_per_epoch))


def epoch_count(cfg: TrainConfig) -> int:
    """Passes the run starts, the last one possibly cut short."""
    return math.ceil(cfg.epochs)


def pass_steps(cfg: TrainConfig, epoch: int, steps_per_epoch: int) -> int:
    """Steps of pass `epoch`: all of them, except in a last pass that `epochs` cuts short."""
    return min(steps_per_epoch, total_steps(cfg, steps_per_epoch) - epoch * steps_per_epoch)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based, counted over the whole run)."""
    total = total_steps(cfg, steps_per_epoch)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":  # the tutorial's Keras LearningRateScheduler, per epoch
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** math.floor((1 + epoch) / cfg.step_epochs)
    warm = round(cfg.warmup * total)
    if step < warm:  # linear warmup from lr/warm to lr
        lr = cfg.lr * (step + 1) / warm
    else:
        t = (step - warm + 1) / max(1, total - warm)  # 0 -> 1 over the decay, ending at 0
        if cfg.schedule == "cosine":
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        else:
            lr = cfg.lr * max(0.0, 1 - t)  # onecycle: linear decay to 0
    # A run of a few dozen steps would otherwise reach the peak within a step or two and
    # diverge (measured: 8 steps at lr 0.4 -> logits ~1e6, chance accuracy, raw and EMA alike).
    if cfg.warmup_min_steps:
        lr = min(lr, cfg.lr * (step + 1) / cfg.warmup_min_steps)
    return lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the schedule's lr on every group, times the group's own `lr_scale`."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD over the trainable parameters (frozen ones are left out): weight decay on
    conv/linear weights only unless decay_norm_bias; BatchNorm biases in a group of their own
    when norm_bias_lr_scale != 1; with backbone_lr_scale != 1 the heads (aux1, aux2, fc) apart
    from the rest. A group's "lr_scale" multiplies the schedule's lr (set_lr)."""
    norm_bias = norm_bias_ids(cfg, model)  # speedrun.py
    split = cfg.backbone_lr_scale != 1
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = split and is_head(name)
        scale = 1.0 if head or not split else cfg.backbone_lr_scale
        if id(p) in norm_bias:
            kind, (scale, wd) = "bias", norm_bias_lr(cfg, scale)
        elif p.ndim > 1 or cfg.decay_norm_bias:
            kind, wd = "decay", cfg.weight_decay
        else:
            kind, wd = "no_decay", 0.0
        g = groups.setdefault((kind, head), {"params": [], "weight_decay": wd})
        if scale != 1:
            g["lr_scale"] = scale
        g["params"].append(p)
    if not groups:
        raise UserError("every parameter is frozen: nothing to train")
    order = [(k, h) for h in (False, True) for k in ("decay", "no_decay", "bias")]
    params = [p for g in groups.values() for p in g["params"]]
    return torch.optim.SGD(
        [groups[key] for key in order if key in groups],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        # one vectorised pass per tensor; on a CPU torch's default is a Python loop of ~4 ops
        # per tensor (the cifar variant's step: 14.5 -> 8 ms, bench in docs/results.md)
        fused=all(p.device.type in ("cpu", "cuda") for p in params) or None,
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


def serve_rule(cfg: TrainConfig, total_steps: int) -> tuple[str | None, str]:
    """Which weights a run serves, "ema" (averaged) or "model" (raw), and why, by a rule that
    never looks at the test set: config key serve_weights, else (auto) the run length. None
    when the final validation decides on the held-out training images (auto with holdout)."""
    if not (cfg.ema or cfg.polyak):
        return "model", "no weight averaging"
    if cfg.serve_weights != "auto":
        return cfg.serve_weights, f"serve_weights = {cfg.serve_weights}"
    if cfg.holdout:
        return None, "auto: the better on the held-out images at the final validation"
    if total_steps < cfg.serve_min_steps:
        return (
            "model",
            f"auto: {total_steps} optimizer steps < serve_min_steps {cfg.serve_min_steps}",
        )
    return "ema", f"auto: {total_steps} optimizer steps >= serve_min_steps {cfg.serve_min_steps}"
