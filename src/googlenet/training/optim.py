"""Optimisation: the learning-rate schedule (set per step), SGD with weight decay on conv/linear
weights only, EMA / Polyak weight averaging, and the speed-run tricks (BatchNorm options,
lookahead, patch-whitening initialisation of the first convolution)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from googlenet.errors import UserError
from googlenet.training.config import TrainConfig


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: `epochs` may end within the last pass (1.5: one and a
    half passes), and the schedules span exactly these steps."""
    return max(1, round(cfg.epochs * steps_per_epoch))


def epoch_count(cfg: TrainConfig) -> int:
    """Passes the run starts, the last one possibly cut short."""
    return math.ceil(cfg.epochs)


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


def _norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def apply_norm_options(cfg: TrainConfig, model: nn.Module) -> None:
    """BatchNorm momentum, and scales frozen at 1 (before the optimizer is made)."""
    for m in _norm_layers(model):
        m.momentum = cfg.bn_momentum
        if cfg.freeze_bn_scale and m.weight is not None:
            with torch.no_grad():
                m.weight.fill_(1.0)
            m.weight.requires_grad_(False)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD over the trainable parameters (frozen ones are left out): weight decay on
    conv/linear weights only unless decay_norm_bias; BatchNorm biases in a group of their own
    when norm_bias_lr_scale != 1; with backbone_lr_scale != 1 the heads (aux1, aux2, fc) apart
    from the rest. A group's "lr_scale" multiplies the schedule's lr (set_lr)."""
    from googlenet.training.finetune import is_head

    norm_bias = {id(m.bias) for m in _norm_layers(model) if m.bias is not None}
    if cfg.norm_bias_lr_scale == 1:
        norm_bias = set()
    split = cfg.backbone_lr_scale != 1
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = split and is_head(name)
        scale = 1.0 if head or not split else cfg.backbone_lr_scale
        if id(p) in norm_bias:
            # airbench's trick: a much larger step for the BN shifts, with the decay scaled
            # down by the same factor so the decay per step stays as it was.
            kind, scale = "bias", scale * cfg.norm_bias_lr_scale
            wd = cfg.weight_decay / cfg.norm_bias_lr_scale if cfg.decay_norm_bias else 0.0
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
