"""The training engine: `train(config) -> RunResult`.

One loop for every recipe: SGD with the configured schedule (set per step), the loss with the
auxiliary heads weighted as configured (it lives here, not in the model), per-head loss and
accuracy for training and validation, mixed precision (bf16 autocast on CPU, bf16/fp16 on
CUDA), channels_last, optional torch.compile, EMA / Polyak weight averaging, DDP through
torchrun, and a checkpoint every epoch (`last`) plus the best validation top-1 (`best`).

Determinism: the data order and augmentation are a function of (seed, epoch, rank) (see
BatchLoader), and the torch RNG (dropout) is reseeded from (seed, epoch, rank) at the start of
each epoch, so `--resume` from `last` reproduces an uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from googlenet.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    load_state_dict_strict,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_checkpoint,
)
from googlenet.config import TrainConfig, to_toml
from googlenet.errors import UserError

HEAD_NAMES = ("", "aux1_", "aux2_")  # metric prefixes: main output, aux1, aux2


class TrainingDiverged(UserError):
    """The loss (or the weights) became NaN/infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    out: Path  # the run folder
    epochs: int  # epochs completed (including those before a resume)
    metrics: dict[str, Any]  # the last epoch's log row
    best_acc: float  # best validation top-1 (%), -1 when never validated
    best_epoch: int  # the epoch of best_acc (0 when never validated)
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's log row
    model: nn.Module | None = None  # the trained network (averaged weights when EMA/Polyak)
    main: bool = True  # False on DDP ranks other than 0 (which write nothing)


# --- distributed -----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> tuple[Dist, bool]:
    """Join the process group torchrun describes in env vars; (dist, whether we created it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    import torch.distributed as dist

    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return d, False
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return d, True


def _all_reduce(t: Tensor, d: Dist, op: str = "sum") -> Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def _broadcast_buffers(module: nn.Module, d: Dist) -> None:
    """BN running stats drift apart per rank; validate everywhere with rank 0's."""
    if d.enabled:
        import torch.distributed as dist

        for b in module.buffers():
            dist.broadcast(b, 0)


# --- devices and precision -------------------------------------------------------------------


def _pick_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("config key 'device': cuda requested but no CUDA GPU is available")
        return torch.device("cuda", d.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _pick_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    p = cfg.precision
    if p == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_bf16() else None
    if p == "fp16" and device.type == "cpu":
        raise UserError("config key 'precision': fp16 is for CUDA; use bf16 or fp32 on a CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- schedule, optimizer, averaging ----------------------------------------------------------


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
    return cfg.lr * max(0.0, 1 - t)  # onecycle / linear


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


# --- loss and metrics -------------------------------------------------------------------------


class Meter:
    """Sums of loss * n and correct predictions per head, reduced over ranks on demand."""

    def __init__(self, heads: int, device: torch.device) -> None:
        # rows: loss sum, correct (top-1), correct (top-5); columns: heads; plus a count
        self.sums = torch.zeros(3, heads, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, losses: list[Tensor], logits: list[Tensor], y: Tensor) -> None:
        n = y.shape[0]
        for i, (loss, out) in enumerate(zip(losses, logits, strict=True)):
            self.sums[0, i] += loss.detach().double() * n
            self.sums[1, i] += (out.argmax(1) == y).sum()
            k = min(5, out.shape[1])
            self.sums[2, i] += (out.topk(k, 1).indices == y[:, None]).any(1).sum()
        self.count += n

    def result(self, d: Dist, prefix: str) -> dict[str, float]:
        packed = _all_reduce(torch.cat([self.sums.flatten(), self.count[None]]), d)
        sums, count = packed[:-1].view_as(self.sums), max(packed[-1].item(), 1.0)
        out: dict[str, float] = {}
        for i in range(sums.shape[1]):
            head = HEAD_NAMES[i]
            out[f"{prefix}_{head}loss"] = sums[0, i].item() / count
            out[f"{prefix}_{head}acc"] = 100.0 * sums[1, i].item() / count
            if i == 0:
                out[f"{prefix}_acc5"] = 100.0 * sums[2, i].item() / count
        return out


def _outputs(out: Any) -> list[Tensor]:
    """[logits, aux1, aux2] (the ones present) from a train()-mode forward."""
    if isinstance(out, Tensor):
        return [out]
    return [t for t in out if t is not None]


def _losses(outs: list[Tensor], y: Tensor, smoothing: float) -> list[Tensor]:
    return [F.cross_entropy(o.float(), y, label_smoothing=smoothing) for o in outs]


@contextlib.contextmanager
def _aux_taps(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Capture inception4a/4d outputs in eval() so the aux heads can be scored on them."""
    feats: dict[str, Tensor] = {}
    hooks = []
    if getattr(model, "aux1", None) is not None:
        for name in ("inception4a", "inception4d"):
            mod = getattr(model, name)
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: feats.__setitem__(n, o)))
    try:
        yield feats
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    smoothing: float = 0.0,
    dist: Dist | None = None,
) -> dict[str, float]:
    """Validation: the main output in eval() mode, the aux heads scored on the features
    captured by hooks (also eval(): no dropout). Sums are reduced over every rank."""
    d = dist or Dist()
    was_training = model.training
    model.eval()
    heads = 3 if getattr(model, "aux1", None) is not None else 1
    meter = Meter(heads, device)
    with _aux_taps(model) as feats:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, dtype):
                outs = [model(x)]
                if heads == 3:
                    outs += [model.aux1(feats["inception4a"]), model.aux2(feats["inception4d"])]
            meter.add(_losses(outs, y, smoothing), outs, y)
    model.train(was_training)
    return meter.result(d, "val")


# --- the run ----------------------------------------------------------------------------------


def _reseed(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Dropout randomness as a function of (seed, epoch, rank), so a resume replays it."""
    torch.manual_seed((cfg.seed * 1_000_003 + epoch * 1009 + rank) % (2**63))


def _load_data(cfg: TrainConfig, data_root: str | Path | None) -> tuple[Any, Any]:
    from googlenet import data

    root = data.resolve_data_root(data_root or cfg.data_root or None)
    if cfg.dataset in ("cifar10", "cifar100"):
        return (
            # download=True: a fresh machine fetches the official archive (MD5-checked).
            data.load_cifar(root, cfg.dataset, "train", download=True),
            data.load_cifar(root, cfg.dataset, "test"),
        )
    load_folder = getattr(data, "load_image_folder", None)
    if load_folder is None:
        raise UserError("dataset 'folder' is not available in this build")
    if not (root / "train").is_dir():
        raise UserError(f"{root}: dataset 'folder' expects train/ and val/ sub-folders")
    val_dir = root / "val" if (root / "val").is_dir() else root / "test"
    if not val_dir.is_dir():
        raise UserError(f"{root}: dataset 'folder' expects a val/ (or test/) sub-folder")
    return load_folder(root / "train"), load_folder(val_dir)


def _norm_stats(cfg: TrainConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from googlenet import data

    if cfg.dataset == "cifar10":
        return data.CIFAR10_MEAN, data.CIFAR10_STD
    if cfg.dataset == "cifar100":
        return data.CIFAR100_MEAN, data.CIFAR100_STD
    return data.IMAGENET_MEAN, data.IMAGENET_STD


def model_args(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """build() arguments, as stored in the checkpoint's meta["model"]."""
    args: dict[str, Any] = {
        "variant": cfg.variant,
        "num_classes": num_classes,
        "aux_logits": cfg.aux_logits,
    }
    if cfg.dropout >= 0:
        args["dropout"] = cfg.dropout
    if cfg.aux_dropout >= 0:
        args["aux_dropout"] = cfg.aux_dropout
    return args


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values())


def train(
    cfg: TrainConfig,
    *,
    train_set: Any = None,
    val_set: Any = None,
    data_root: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train per `cfg`; data from cfg.dataset unless train_set/val_set (ArrayDataset) are given.

    Writes into cfg.out (default runs/<recipe>): config.toml, metrics.jsonl/.csv, loss.png,
    accuracy.png, last.safetensors and best.safetensors. Under torchrun (WORLD_SIZE > 1) it
    runs data-parallel; only rank 0 writes. Raises TrainingDiverged on a NaN/inf loss.
    """
    cfg.validate()
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    d, own_group = _init_distributed("cuda" if use_cuda else "cpu")
    try:
        return _train(cfg, d, train_set, val_set, data_root, resume, progress)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    d: Dist,
    train_set: Any,
    val_set: Any,
    data_root: str | Path | None,
    resume: bool,
    progress: bool,
) -> RunResult:
    from googlenet.data import Augment, BatchLoader
    from googlenet.logs import RunLog
    from googlenet.model import build

    out = Path(cfg.out or f"runs/{cfg.recipe}")
    device = _pick_device(cfg, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: autotune once
    if cfg.workers:
        torch.set_num_threads(cfg.workers)
    if cfg.batch_size % d.world_size:
        raise UserError(
            f"config key 'batch_size': {cfg.batch_size} does not split over {d.world_size} ranks"
        )
    if train_set is None or val_set is None:
        loaded = _load_data(cfg, data_root)
        train_set = train_set if train_set is not None else loaded[0]
        val_set = val_set if val_set is not None else loaded[1]
    if cfg.limit_train:
        train_set = train_set.subset(cfg.limit_train)
    if cfg.limit_val:
        val_set = val_set.subset(cfg.limit_val)
    per_rank = cfg.batch_size // d.world_size
    if len(train_set) < cfg.batch_size:
        raise UserError(
            f"config key 'batch_size': {cfg.batch_size} is larger than the "
            f"{len(train_set)} training images"
        )
    classes = list(train_set.classes) or [str(i) for i in range(int(train_set.labels.max()) + 1)]
    num_classes = cfg.num_classes or len(classes)
    mean, std = _norm_stats(cfg)

    # Model: same seed on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    args = model_args(cfg, num_classes)
    raw = build(args["variant"], **{k: v for k, v in args.items() if k != "variant"})
    size = cfg.input_size or raw.spec.input_size
    raw.train()
    raw.check_input(torch.empty(0, 3, size, size))
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    raw = raw.to(device, memory_format=fmt)
    dtype = _pick_dtype(cfg, device)
    opt = make_optimizer(cfg, raw)
    avg = WeightAverage(raw, cfg.ema_decay, cfg.polyak) if cfg.ema or cfg.polyak else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    augment = Augment(
        crop_padding=cfg.crop_padding,
        flip=cfg.flip,
        cutout=cfg.cutout,
        scale_aspect=cfg.scale_aspect,
        photometric=cfg.photometric,
    )
    loader_kw = dict(input_size=size, mean=mean, std=std, device=device)
    loader_kw.update(rank=d.rank, world_size=d.world_size, channels_last=cfg.channels_last)
    train_loader = BatchLoader(
        train_set, per_rank, augment=augment, shuffle=True, drop_last=True, seed=cfg.seed,
        **loader_kw,
    )  # fmt: skip
    val_loader = BatchLoader(val_set, per_rank, **loader_kw)
    steps_per_epoch = len(train_loader)

    meta_base = {
        "model": args,
        "classes": classes,
        "preprocess": {"input_size": size, "mean": list(mean), "std": list(std), "resize": None},
        "dataset": cfg.dataset,
        "config": cfg.to_dict(),
    }
    start_epoch, best_acc, best_epoch = 0, -1.0, 0
    log = RunLog(out)
    if resume:
        start_epoch, best_acc, best_epoch = _restore(out, raw, opt, avg, scaler, meta_base)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        log.resume(start_epoch)  # a fresh run in an old folder starts an empty log
        if not resume:  # nor may an older run's best checkpoint pass for this one's
            for name in ("best.safetensors", "best.json"):
                (out / name).unlink(missing_ok=True)
        atomic_write_text(out / "config.toml", to_toml(cfg))

    net: nn.Module = raw
    if cfg.compile:
        net = torch.compile(net)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    if d.main and progress:
        print(
            f"training {cfg.variant} ({num_classes} classes, {size}x{size}) on {device.type}"
            f" x{d.world_size}, {'fp32' if dtype is None else str(dtype)[6:]} autocast,"
            f" {len(train_set)} train / {len(val_set)} val images, {cfg.epochs} epochs,"
            f" {steps_per_epoch} steps/epoch -> {out}",
            file=sys.stderr,
        )
    heads = 3 if cfg.aux_logits else 1
    t_run = time.perf_counter()
    elapsed_before = log.rows[-1].get("elapsed_s", 0.0) if log.rows else 0.0
    row: dict[str, Any] = log.rows[-1] if log.rows else {}
    for epoch in range(start_epoch, cfg.epochs):
        _reseed(cfg, epoch, d.rank)
        train_loader.set_epoch(epoch)
        net.train()
        meter = Meter(heads, device)
        t0 = time.perf_counter()
        bar = _bar(steps_per_epoch, epoch, cfg.epochs, enabled=d.main and progress)
        for i, (x, y) in enumerate(train_loader):
            step = epoch * steps_per_epoch + i
            lr = lr_at(cfg, step, steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(device, dtype):
                outs = _outputs(net(x))
            losses = _losses(outs, y, cfg.label_smoothing)
            loss = losses[0] + cfg.aux_weight * sum(losses[1:], torch.zeros((), device=device))
            bad = _all_reduce((~torch.isfinite(loss.detach())).float(), d, "max")
            if bad.item():
                raise TrainingDiverged(
                    f"loss is {loss.item()} at epoch {epoch + 1} step {i + 1} (lr {lr:g}); "
                    f"training stopped, {out / 'last.safetensors'} is the last good checkpoint"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            if avg is not None:
                avg.update(raw)
            meter.add(losses, outs, y)
            if bar is not None:
                done = (i + 1) * cfg.batch_size
                bar.set_postfix(
                    loss=f"{meter.sums[0, 0].item() / meter.count.item():.3f}",
                    acc=f"{100 * meter.sums[1, 0].item() / meter.count.item():.1f}%",
                    img_s=f"{done / (time.perf_counter() - t0):.0f}",
                    refresh=False,
                )
                bar.update()
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": lr_at(cfg, (epoch + 1) * steps_per_epoch - 1,
                                                steps_per_epoch)}  # fmt: skip
        row.update(meter.result(d, "train"))
        row["images_per_s"] = steps_per_epoch * cfg.batch_size / train_time

        if not (_all_finite(raw) and (avg is None or _all_finite(avg.module))):
            raise TrainingDiverged(
                f"weights became NaN/infinite in epoch {epoch + 1}; training stopped, "
                f"{out / 'last.safetensors'} is the last good checkpoint"
            )
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            judged = avg.module if avg is not None else raw
            _broadcast_buffers(judged, d)
            row.update(evaluate(judged, val_loader, device=device, dtype=dtype,
                                smoothing=cfg.label_smoothing, dist=d))  # fmt: skip
            if not math.isfinite(row["val_loss"]):
                raise TrainingDiverged(
                    f"validation loss is {row['val_loss']} after epoch {epoch + 1}; "
                    f"{out / 'last.safetensors'} is the last good checkpoint"
                )
        row["epoch_s"] = time.perf_counter() - t0
        row["elapsed_s"] = elapsed_before + time.perf_counter() - t_run
        improved = "val_acc" in row and row["val_acc"] > best_acc
        if improved:
            best_acc, best_epoch = row["val_acc"], epoch + 1
        if d.main:
            meta = dict(meta_base, epoch=epoch + 1, metrics=row)
            meta["best"] = {"epoch": best_epoch, "val_acc": best_acc}
            groups = _state_groups(raw, opt, avg, scaler, meta)
            save_checkpoint(out / "last.safetensors", groups, meta)
            if improved:
                save_checkpoint(out / "best.safetensors", groups, meta)
            log.append(row, plot=True)
            if progress:
                print(_summary_line(row, cfg.epochs), file=sys.stderr, flush=True)
    final = avg.module if avg is not None else raw
    return RunResult(
        out=out,
        epochs=cfg.epochs,
        metrics=row,
        best_acc=best_acc,
        best_epoch=best_epoch,
        history=list(log.rows),
        model=final.eval(),
        main=d.main,
    )


def _bar(total: int, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, file=sys.stderr
    )


def _summary_line(row: dict[str, Any], epochs: int) -> str:
    def heads(split: str) -> str:
        s = f"loss {row[f'{split}_loss']:.4f} acc {row[f'{split}_acc']:.2f}%"
        aux = [
            f"{h[:-1]} {row[f'{split}_{h}acc']:.1f}%"
            for h in HEAD_NAMES[1:]
            if f"{split}_{h}acc" in row
        ]
        return s + (f" ({', '.join(aux)})" if aux else "")

    text = f"epoch {row['epoch']}/{epochs} lr {row['lr']:.4g} | train {heads('train')}"
    if "val_acc" in row:
        text += f" | val {heads('val')}"
    return text + f" | {row['images_per_s']:.0f} img/s {row['epoch_s']:.1f}s"


# --- checkpoint state ---------------------------------------------------------------------------


def _state_groups(raw, opt, avg, scaler, meta: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
    """Tensor groups for save_checkpoint; JSON-able optimizer/averager state goes into meta."""
    optim_tensors, optim_rest = optimizer_state_to_tensors(opt)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    groups = {"model": raw.state_dict(), "optim": optim_tensors, "rng": rng}
    meta["optim"] = optim_rest
    if avg is not None:
        groups["ema"] = avg.module.state_dict()
        meta["average"] = {"updates": avg.updates, "polyak": avg.polyak}
    if scaler.is_enabled():
        meta["scaler"] = {k: v for k, v in scaler.state_dict().items() if not isinstance(v, Tensor)}
    return groups


def _restore(out: Path, raw, opt, avg, scaler, meta_base: dict[str, Any]) -> tuple[int, float, int]:
    """Load last.safetensors into model/optimizer/averager; (epochs done, best acc, its epoch)."""
    path = out / "last.safetensors"
    if not path.is_file():
        raise UserError(f"{path}: nothing to resume (no last checkpoint in {out})")
    groups, meta = load_checkpoint(path)
    if meta.get("model") != meta_base["model"]:
        raise UserError(
            f"{path}: the checkpoint's model {meta.get('model')} differs from this config's "
            f"{meta_base['model']}; resume with the run's own config ({out / 'config.toml'})"
        )
    load_state_dict_strict(raw, groups["model"], source=str(path))
    if "optim" not in groups and "optim" not in meta:
        raise UserError(f"{path}: checkpoint has no optimizer state to resume from")
    optimizer_state_from_tensors(opt, groups.get("optim", {}), meta["optim"])
    if avg is not None:
        if "ema" not in groups:
            raise UserError(f"{path}: checkpoint has no averaged weights but this config has")
        load_state_dict_strict(avg.module, groups["ema"], source=str(path))
        avg.updates = int(meta.get("average", {}).get("updates", 0))
    if "scaler" in meta and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    rng = groups.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    best = meta.get("best", {})
    return int(meta["epoch"]), float(best.get("val_acc", -1.0)), int(best.get("epoch", 0))
