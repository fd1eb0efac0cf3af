"""The training engine: `train(config) -> RunResult`.

One loop for every recipe, read top to bottom in `_train`: set up (data, model, optimizer,
loaders, run folder), then per epoch train one epoch, validate, checkpoint. The loss with the
auxiliary heads weighted as configured lives here, not in the model. Schedule, optimizer and
weight averaging are in optim.py, counting in metrics.py, DDP in distributed.py, device and
precision in devices.py.

Determinism: the data order and augmentation are a function of (seed, epoch, rank) (see
BatchLoader), and the torch RNG (dropout) is reseeded from (seed, epoch, rank) at the start of
each epoch; both generators' states are saved in every checkpoint, so `--resume` reproduces an
uninterrupted run exactly on CPU, from an epoch end or from the middle of one.

Crash safety: `last.safetensors` is written at every epoch end and every `checkpoint_every_s`
seconds mid-epoch (the file it replaces is kept as `previous.safetensors`); Ctrl-C / SIGTERM
finish the step, save, print the resume command and raise Interrupted (exit 130 / 143). The
run folder is chosen and locked by runs.py. GOOGLENET_TRACE=FILE makes the loop append its
phase to FILE ("step-begin E S", "val-begin E", "save-begin NAME", ...) for the kill tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import shlex
import signal
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
    CheckpointMeta,
    TrainingState,
    Validation,
    load_checkpoint,
    load_state_dict_strict,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_checkpoint,
)
from googlenet.data.arrays import stratified_indices
from googlenet.data.build import Data as _Data
from googlenet.data.build import setup_data as _setup_data
from googlenet.data.build import working_side
from googlenet.data.loader import BatchLoader
from googlenet.devices import autocast, keep_freed_memory, pick_device, pick_dtype
from googlenet.errors import UserError, note
from googlenet.files import atomic_write_text
from googlenet.fuse import fold_batchnorm
from googlenet.metrics import VAL_PREDICTIONS, Metrics, write_predictions
from googlenet.model import AUX_TAPS, HEAD_PREFIXES
from googlenet.training.config import TrainConfig, to_toml
from googlenet.training.distributed import (
    Dist,
    all_reduce,
    broadcast_buffers,
    gather_by_index,
    init_distributed,
)
from googlenet.training.interrupt import Interrupted, StopRequest
from googlenet.training.optim import (
    Lookahead,
    WeightAverage,
    apply_norm_options,
    epoch_count,
    lr_at,
    make_optimizer,
    serve_rule,
    set_lr,
    total_steps,
    whiten_conv1,
)
from googlenet.transforms import Preprocess


class TrainingDiverged(UserError):
    """The loss (or the weights) became NaN/infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    out: Path  # the run folder
    epochs: float  # passes over the data (including those before a resume)
    metrics: dict[str, Any]  # the last epoch's log row
    best_acc: float  # top-1 (%) of best.safetensors (on a test split: the latest), -1: none
    best_epoch: int  # the epoch of best_acc (0 when never validated)
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's log row
    model: nn.Module | None = None  # the trained network (averaged weights when EMA/Polyak)
    main: bool = True  # False on DDP ranks other than 0 (which write nothing)


# --- loss and validation ----------------------------------------------------------------------


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
        for name in AUX_TAPS.values():
            mod = getattr(model, name)
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: feats.__setitem__(n, o)))
    try:
        yield feats
    finally:
        for h in hooks:
            h.remove()


@dataclass
class ValPredictions:
    """Per-image results of a validation pass, in data-set order."""

    index: Tensor  # sample index in the validation set
    label: Tensor  # true class
    pred: Tensor  # predicted class (main head)
    prob: Tensor  # its softmax probability


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    smoothing: float = 0.0,
    dist: Dist | None = None,
    predictions: bool = False,
    stop: StopRequest | None = None,
    tta: str = "none",
    channels_last: bool = False,
) -> tuple[dict[str, float], ValPredictions | None] | None:
    """Validation: the main output in eval() mode, the aux heads scored on the features
    captured by hooks (also eval(): no dropout). Counts are reduced over every rank; with
    `predictions` the per-image results are gathered from every rank too. None when `stop`
    was requested before the end (validation abandoned). With `tta` (an input mode of
    tta.tta_logits, run as evaluate's runner runs the model) only the main head, its
    mean logits over the views, reported as val_tta_loss/_acc/_acc5 next to the plain pass's
    val_* (every head), in one pass: the plain logits are the TTA's first view. val_tta_s: the
    seconds the other views took. `predictions`: those of the TTA score when there is one."""
    from googlenet.tta import tta_logits

    d = dist or Dist()
    was_training = model.training
    model.eval()
    heads = 3 if getattr(model, "aux1", None) is not None else 1
    meter = Metrics(model.num_classes, heads, device=device)
    tta_meter = Metrics(model.num_classes, 1, device=device) if tta != "none" else None
    tta_s = 0.0
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def forward(v: Tensor) -> Tensor:  # as devices.make_runner, so evaluate reproduces it
        with autocast(device, dtype):
            return model(v.contiguous(memory_format=fmt)).float()

    with _aux_taps(model) as feats:
        for x, y in loader:
            if stop is not None and stop.requested:
                model.train(was_training)
                return None
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = x.contiguous(memory_format=fmt)
            with autocast(device, dtype):
                outs = [model(x)]
                if heads == 3:
                    outs += [getattr(model, h)(feats[tap]) for h, tap in AUX_TAPS.items()]
            pred = meter.update(outs, y, _losses(outs, y, smoothing))
            if tta_meter is not None:
                t0 = time.perf_counter()
                outs = [tta_logits(forward, x, tta, first=outs[0])]
                tta_s += time.perf_counter() - t0
                pred = tta_meter.update(outs, y, _losses(outs, y, smoothing))
            if predictions:
                prob = torch.softmax(outs[0].float(), 1).gather(1, pred[:, None])[:, 0]
                parts.append((y.cpu(), pred.cpu(), prob.cpu()))
    model.train(was_training)
    meter.reduce(lambda t: all_reduce(t, d))
    row = meter.row("val")
    if tta_meter is not None:
        tta_meter.reduce(lambda t: all_reduce(t, d))
        row |= tta_meter.row("val_tta") | {"val_tta_s": tta_s}
    yielded = getattr(loader, "yielded", None)  # sample indices, as batches came (BatchLoader)
    if not predictions or yielded is None:
        return row, None
    cols = [torch.cat([p[i] for p in parts]) if parts else torch.zeros(0) for i in range(3)]
    index = torch.cat(yielded) if yielded else torch.zeros(0, dtype=torch.int64)
    index, label, pred, prob = gather_by_index(index, cols, d)
    return row, ValPredictions(index, label.long(), pred.long(), prob)


# --- set-up -----------------------------------------------------------------------------------


def _reseed(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Dropout randomness as a function of (seed, epoch, rank), so a resume replays it."""
    torch.manual_seed((cfg.seed * 1_000_003 + epoch * 1009 + rank) % (2**63))


def loader_workers(cfg: TrainConfig) -> int:
    """Decoding processes per rank: `loader_workers`, or (-1) this rank's share of the CPU
    cores less one for the training process, between 1 and 16."""
    if cfg.loader_workers >= 0:
        return cfg.loader_workers
    import os

    per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, per_rank - 1))


def model_args(cfg: TrainConfig, num_classes: int, transform_input: bool = False) -> dict[str, Any]:
    """build() arguments, as stored in the checkpoint's meta.model (all of them that matter)."""
    args: dict[str, Any] = {
        "variant": cfg.variant,
        "num_classes": num_classes,
        "aux_logits": cfg.aux_logits,
        "transform_input": transform_input,
    }
    if cfg.transform_input:
        args["transform_input"] = True
    if cfg.dropout >= 0:
        args["dropout"] = cfg.dropout
    if cfg.aux_dropout >= 0:
        args["aux_dropout"] = cfg.aux_dropout
    return args


def _whiten(raw: nn.Module, train_set: Any, cfg: TrainConfig, size: int, mean, std) -> None:
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


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values())


def _check_weights_finite(run: _Run, epoch: int) -> None:
    """Raise TrainingDiverged (before anything is saved over the last good checkpoint) when
    the weights or their average hold a NaN/inf."""
    if not (_all_finite(run.raw) and (run.avg is None or _all_finite(run.avg.module))):
        raise TrainingDiverged(
            f"weights became NaN/infinite in epoch {epoch + 1}; training stopped, "
            f"{run.out / 'last.safetensors'} is the last good checkpoint"
        )


@dataclass
class _Run:
    """Everything a run needs once set up."""

    cfg: TrainConfig
    d: Dist
    out: Path
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype (None: fp32)
    raw: nn.Module  # the model being trained (unwrapped)
    net: nn.Module  # what the step calls: raw, compiled and/or wrapped in DDP
    opt: torch.optim.Optimizer
    avg: WeightAverage | None
    scaler: torch.amp.GradScaler
    train_loader: BatchLoader
    val_loader: BatchLoader
    meta_base: CheckpointMeta  # checkpoint metadata without the training state
    log: Any  # logs.RunLog
    progress: bool
    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    lookahead: Lookahead | None = None
    start_step: int = 0  # resuming mid-epoch: the batch of start_epoch to continue at
    resumed_meter: dict[str, Tensor] | None = None  # ... and that epoch's counts so far
    resumed_augment: Tensor | None = None  # ... and the augmentation generator's state there
    elapsed_before: float = 0.0  # training seconds before this process (resumed runs)
    stop: StopRequest | None = None  # Ctrl-C / SIGTERM
    last_save: float = 0.0  # time.monotonic() of the last checkpoint
    resume_command: str = ""  # printed when interrupted
    trace_file: str | None = None  # GOOGLENET_TRACE
    t_start: float = 0.0  # time.monotonic() when this process started training
    epoch_meter: Metrics | None = None  # the finished epoch's train counts (before validation)
    served: str | None = None  # "ema" | "model" (optim.serve_rule); None: holdout decides
    served_reason: str = ""

    def trace(self, event: str) -> None:
        if self.trace_file:
            with open(self.trace_file, "a") as f:
                f.write(event + "\n")

    @property
    def judged_group(self) -> str:
        """The tensor group validation sees and the checkpoint serves (`served`): "model"
        (raw) or "ema" (the average, also while the held-out comparison is still to come)."""
        return "model" if self.avg is None or self.served == "model" else "ema"

    @property
    def judged(self) -> nn.Module:
        """The weights of judged_group."""
        return self.raw if self.judged_group == "model" or self.avg is None else self.avg.module

    @property
    def num_classes(self) -> int:
        return self.meta_base.num_classes


def train(
    cfg: TrainConfig,
    *,
    train_set: Any = None,
    val_set: Any = None,
    data_root: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train per `cfg`; data from cfg.dataset unless train_set/val_set (ArrayDataset) are given.

    Writes into cfg.out, else the first free runs/<recipe>[-N] (runs.py: a folder holding a run
    is refused unless resume or overwrite): config.toml, metrics.jsonl/.csv, loss.png,
    accuracy.png, last.safetensors (+ previous.safetensors) and best.safetensors. resume
    continues from the last checkpoint, or starts afresh when there is none yet. Under torchrun
    (WORLD_SIZE > 1) it runs data-parallel; only rank 0 writes. Raises TrainingDiverged on a
    NaN/inf loss and Interrupted (a KeyboardInterrupt) after saving on Ctrl-C / SIGTERM.
    """
    from googlenet.training import runs

    cfg.validate()
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    d, own_group = init_distributed("cuda" if use_cuda else "cpu")
    lock = None
    try:
        out = runs.choose(cfg.out, cfg.recipe, resume=resume, overwrite=overwrite)
        if d.enabled:  # rank 0's choice (a free runs/<recipe>-N) for every rank
            import torch.distributed as dist

            chosen = [str(out)]
            dist.broadcast_object_list(chosen, src=0)
            out = Path(chosen[0])
        if d.main:
            lock = runs.RunLock(out).acquire()
            if lock.note:
                note(lock.note)
            if overwrite and (gone := runs.remove_run_files(out)):
                note(f"--overwrite: removed {len(gone)} files of the previous run in {out}")
            runs.remove_stale_temp_files(out)
            if not cfg.out:
                print(f"run folder: {out}", file=sys.stderr, flush=True)
        with StopRequest() as stop:
            run = _setup(cfg, d, out, train_set, val_set, data_root, resume, progress)
            run.stop = stop
            run.resume_command = _resume_command(out, data_root, d)
            return _train(run)
    finally:
        if lock is not None:
            lock.release()
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(run: _Run) -> RunResult:
    """The epochs of a set-up run: train, validate, checkpoint; then the report."""
    cfg, d = run.cfg, run.d
    run.trace_file = os.environ.get("GOOGLENET_TRACE") or None
    row: dict[str, Any] = run.log.rows[-1] if run.log.rows else {}
    run.last_save = run.t_start = time.monotonic()
    run.trace(f"start {run.start_epoch} {run.start_step}")
    for epoch in range(run.start_epoch, epoch_count(cfg)):
        t0 = time.perf_counter()
        row = _train_epoch(run, epoch)
        final = epoch + 1 == epoch_count(cfg)
        if (epoch + 1) % cfg.eval_every == 0 or final:
            row.update(_validate(run, epoch, final))
        row["epoch_s"] = time.perf_counter() - t0
        row["elapsed_s"] = _elapsed(run)
        _checkpoint(run, epoch, row)
    run.trace("done")
    if d.main and run.progress and run.served:
        print(f"serving the {run.served} weights ({run.served_reason})", file=sys.stderr)
    if d.main and cfg.report:  # from what validation recorded; a failure only warns
        from googlenet.insight.report import report_after_training

        report_after_training(run.out, run.val_loader.dataset, run.progress)
    return RunResult(
        out=run.out,
        epochs=cfg.epochs,
        metrics=row,
        best_acc=run.best_acc,
        best_epoch=run.best_epoch,
        history=list(run.log.rows),
        model=run.judged.eval(),
        main=d.main,
    )


def _setup(
    cfg: TrainConfig,
    d: Dist,
    out: Path,
    train_set: Any,
    val_set: Any,
    data_root: str | Path | None,
    resume: bool,
    progress: bool,
) -> _Run:
    """Data, model, optimizer, loaders and the run folder (restored from `last` on resume)."""
    from googlenet.logs import RunLog
    from googlenet.training import finetune

    init = None
    # A resume restores its own checkpoint instead; one killed before its first starts afresh.
    if cfg.init and not (
        resume and any((out / n).is_file() for n in ("last.safetensors", "previous.safetensors"))
    ):
        init = finetune.read_init(cfg.init)
        cfg = finetune.config_from_init(cfg, init).validate()
    device = pick_device(cfg.device, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: autotune once
    if cfg.workers:
        torch.set_num_threads(cfg.workers)
    if cfg.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    if cfg.batch_size % d.world_size:
        raise UserError(
            f"config key 'batch_size': {cfg.batch_size} does not split over {d.world_size} ranks"
        )
    data = _setup_data(cfg, out, train_set, val_set, data_root)
    dtype = pick_dtype(cfg.precision, device)
    raw, args, init_record, frozen = _setup_model(cfg, d, device, dtype, data, init)
    del init
    opt = make_optimizer(cfg, raw)
    avg = WeightAverage(raw, cfg.ema_decay, cfg.polyak) if cfg.ema or cfg.polyak else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    per_rank = cfg.batch_size // d.world_size
    train_loader, val_loader = _make_loaders(cfg, d, device, data, per_rank)

    provenance: dict[str, Any] = {"source": "train", "config": cfg.to_dict()}
    if init_record is not None:
        provenance["init"] = init_record
    meta_base = CheckpointMeta(
        model=args,
        classes=data.classes,
        preprocess=data.val_pp,
        dataset=cfg.dataset,
        provenance=provenance,
        validation=Validation(
            weights="ema" if avg is not None else "model",
            precision=_precision_name(dtype),
            batch_size=per_rank,
            channels_last=cfg.channels_last,
            data=data.record,
        ),
    )
    log = RunLog(out)
    run = _Run(cfg, d, out, device, dtype, raw, raw, opt, avg, scaler, train_loader, val_loader,
               meta_base, log, progress)  # fmt: skip
    total = total_steps(cfg, len(train_loader))
    train_loader.small = stages = _crop_stages(cfg, data.size, raw, total)
    run.served, run.served_reason = serve_rule(cfg, total)
    if cfg.lookahead_every:
        run.lookahead = Lookahead(raw, cfg.lookahead_every, cfg.lookahead_decay, total)
    if resume:
        _restore(run)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        log.resume(run.start_epoch)  # drops rows a killed run logged after its checkpoint
        atomic_write_text(out / "config.toml", to_toml(cfg))

    if cfg.compile:
        run.net = torch.compile(run.net)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.net = DDP(run.net, device_ids=[device.index] if device.type == "cuda" else None)

    if d.main and progress:
        _print_banner(run, data, stages, frozen)
    return run


def _setup_model(
    cfg: TrainConfig,
    d: Dist,
    device: torch.device,
    dtype: torch.dtype | None,
    data: _Data,
    init: Any,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any] | None, list[str]]:
    """The model on its device: built, initialised (init checkpoint or whitening), frozen as
    configured. Returns it, its build args, the init record and the frozen layers' names."""
    from googlenet.model import build
    from googlenet.training import finetune

    # Same seed on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    args = model_args(cfg, data.num_classes)
    raw = build(args["variant"], **{k: v for k, v in args.items() if k != "variant"})
    init_record = None
    if init is not None:
        report = finetune.apply_init(raw, init, data.classes, cfg.init_partial)
        for line in report.lines():
            note(line)
        init_record = report.record(finetune.checksum(init.path))
    raw.train()
    raw.check_input(torch.empty(0, 3, data.size, data.size))
    apply_norm_options(cfg, raw)
    if cfg.whiten_init and not cfg.init:  # loaded weights are not replaced
        pp = data.val_pp
        _whiten(raw, data.train_set, cfg, pp.input_size, pp.mean, pp.std)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    raw = raw.to(device, memory_format=fmt)
    if cfg.sync_bn and d.enabled:  # BN statistics over the global batch (same parameters)
        if device.type != "cuda":
            raise UserError("config key 'sync_bn': SyncBatchNorm needs CUDA GPUs (NCCL)")
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    # After any module swap (SyncBatchNorm), so that the frozen layers are the ones trained.
    frozen = finetune.freeze(raw, cfg.freeze) if cfg.freeze else []
    from googlenet import fastpool

    if cfg.fast_pool and fastpool.applies(device, dtype, cfg.channels_last):
        swapped = fastpool.use_fast_pool(raw)
        if not swapped:
            note("fast_pool: the C kernel is unavailable (no C compiler?); ATen's max-pool is used")
    return raw, args, init_record, frozen


def _make_loaders(
    cfg: TrainConfig, d: Dist, device: torch.device, data: _Data, per_rank: int
) -> tuple[Any, Any]:
    """The training loader (shuffled, augmented, whole batches) and the validation loader."""
    from googlenet.data.arrays import ArrayDataset
    from googlenet.data.augment import Augment

    augment = Augment(
        crop_padding=cfg.crop_padding,
        flip=cfg.flip,
        cutout=cfg.cutout,
        scale_aspect=cfg.scale_aspect,
        photometric=cfg.photometric,
        alternate_flip=cfg.alternate_flip,
    )
    kw: dict[str, Any] = dict(device=device, rank=d.rank, world_size=d.world_size,
                              channels_last=cfg.channels_last)  # fmt: skip
    if not isinstance(data.train_set, ArrayDataset):  # decoded from files while training
        kw["workers"] = loader_workers(cfg)
    if cfg.dataset == "shards" and not isinstance(data.train_set, ArrayDataset):
        from googlenet.data.shards import ShardLoader

        loader_cls: Any = functools.partial(ShardLoader, size=working_side(cfg.resize, data.size))
    else:
        loader_cls = BatchLoader
    train_loader = loader_cls(
        data.train_set, per_rank, preprocess=data.loader_pp, augment=augment, shuffle=True,
        drop_last=True, seed=cfg.seed, **kw,
    )  # fmt: skip
    return train_loader, loader_cls(data.val_set, per_rank, preprocess=data.loader_pp, **kw)


def _print_banner(run: _Run, data: _Data, stages: list[tuple[int, int]], frozen: list[str]) -> None:
    cfg, d = run.cfg, run.d
    print(
        f"training {cfg.variant} ({data.num_classes} classes, {data.size}x{data.size}) on"
        f" {run.device.type} x{d.world_size},"
        f" {'fp32' if run.dtype is None else str(run.dtype)[6:]} autocast,"
        f" {len(data.train_set)} train / {len(data.val_set)} val images, {cfg.epochs:g} epochs,"
        f" {len(run.train_loader)} steps/epoch -> {run.out}"
        + (
            f"; {', '.join(f'{s}x{s}' for s, _ in stages)} crops for"
            f" {cfg.train_crop_until:.0%} of the steps"
            if stages
            else ""
        )
        + (f"; frozen {frozen[0]}..{frozen[-1]}" if frozen else ""),
        file=sys.stderr,
    )


# --- one epoch, validation, checkpoint --------------------------------------------------------


def _crop_stages(cfg: TrainConfig, size: int, raw: nn.Module, total: int) -> list[tuple[int, int]]:
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


def _pass_steps(cfg: TrainConfig, epoch: int, steps_per_epoch: int) -> int:
    """Steps of pass `epoch`: all of them, except in a last pass that `epochs` cuts short."""
    return min(steps_per_epoch, total_steps(cfg, steps_per_epoch) - epoch * steps_per_epoch)


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One pass over the training data (from run.start_step when resuming into this epoch);
    returns the epoch's log row (lr, train metrics). Saves mid-epoch every checkpoint_every_s,
    and on Ctrl-C / SIGTERM saves after the step and raises Interrupted."""
    cfg, d, device = run.cfg, run.d, run.device
    steps_per_epoch = len(run.train_loader)
    steps = _pass_steps(cfg, epoch, steps_per_epoch)
    meter = Metrics(run.num_classes, 3 if cfg.aux_logits else 1, device=device)
    start = run.start_step if epoch == run.start_epoch else 0
    if start:  # the RNG states came with the checkpoint; so did the epoch's counts so far
        for name, t in (run.resumed_meter or {}).items():
            getattr(meter, name).copy_(t)
    else:
        _reseed(cfg, epoch, d.rank)
    run.train_loader.set_epoch(epoch, start, run.resumed_augment if start else None)
    run.net.train()
    t0 = time.perf_counter()
    bar = _bar(steps, epoch, epoch_count(cfg), enabled=d.main and run.progress)
    if bar is not None:
        bar.update(start)
    # islice: a fractional last pass ends without building a batch it would not use
    for i, (x, y) in enumerate(itertools.islice(run.train_loader, steps - start), start):
        run.trace(f"step-begin {epoch} {i}")
        stop = _train_step(run, epoch, i, x, y, meter)
        if bar is not None:
            done = (i + 1 - start) * cfg.batch_size
            bar.set_postfix(
                loss=f"{meter.loss():.3f}",
                acc=f"{meter.accuracy():.1f}%",
                img_s=f"{done / (time.perf_counter() - t0):.0f}",
                refresh=False,
            )
            bar.update()
        due = cfg.checkpoint_every_s and time.monotonic() - run.last_save >= cfg.checkpoint_every_s
        if stop or due:
            _save_mid_epoch(run, epoch, i + 1, meter)
        if stop:
            if bar is not None:
                bar.close()
            _interrupted(run, f"epoch {epoch + 1} step {i + 1}/{steps}")
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t0
    row = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch * steps_per_epoch + steps - 1,
                                            steps_per_epoch)}  # fmt: skip
    run.epoch_meter = meter  # kept unreduced: validation may still be interrupted
    reduced = Metrics(run.num_classes, meter.sums.shape[0], device=device)
    for name in ("sums", "count", "confusion"):
        getattr(reduced, name).copy_(getattr(meter, name))
    reduced.reduce(lambda t: all_reduce(t, d))
    row.update(reduced.row("train"))
    row["images_per_s"] = max(steps - start, 1) * cfg.batch_size / train_time
    _check_weights_finite(run, epoch)
    return row


def _train_step(run: _Run, epoch: int, i: int, x: Tensor, y: Tensor, meter: Metrics) -> bool:
    """Step i of pass `epoch`: forward, the loss with the aux heads weighted, backward, the
    optimizer and weight averages; counts into `meter`. Returns whether any rank asked to stop
    (Ctrl-C / SIGTERM); raises TrainingDiverged on a NaN/inf loss."""
    cfg, d, device = run.cfg, run.d, run.device
    steps_per_epoch = len(run.train_loader)
    step = epoch * steps_per_epoch + i
    lr = lr_at(cfg, step, steps_per_epoch)
    set_lr(run.opt, lr)
    with autocast(device, run.dtype):
        outs = _outputs(run.net(x))
    losses = _losses(outs, y, cfg.label_smoothing)
    loss = losses[0] + cfg.aux_weight * sum(losses[1:], torch.zeros((), device=device))
    # One all-reduce for both flags, so every rank stops at the same step.
    stopping = run.stop is not None and run.stop.requested
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(stopping), device=device)])  # fmt: skip
    bad, stop = all_reduce(flags, d, "max").tolist()
    if bad:
        raise TrainingDiverged(
            f"loss is {loss.item()} at epoch {epoch + 1} step {i + 1} (lr {lr:g}); "
            f"training stopped, {run.out / 'last.safetensors'} is the last good checkpoint"
        )
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.clip_grad:
        run.scaler.unscale_(run.opt)
        nn.utils.clip_grad_norm_(run.raw.parameters(), cfg.clip_grad)
    run.scaler.step(run.opt)
    run.scaler.update()
    if run.lookahead is not None:
        run.lookahead.step(run.raw, step)
    if run.avg is not None:
        run.avg.update(run.raw)
    meter.update(outs, y, losses)
    return bool(stop)


def _validate(run: _Run, epoch: int, final: bool) -> dict[str, float]:
    """Validation of the judged weights (the average when there is one) on every rank. The
    final one runs with BatchNorm folded into the convolutions (on a copy), adds the score
    under the config's TTA and the seconds that pass took (val_tta_*), and writes the
    reported pass (TTA when on) to val_predictions.csv. Ctrl-C / SIGTERM abandon it (one
    process only: DDP ranks finish it together): the checkpoint then holds the trained epoch,
    and a resume validates it."""
    cfg = run.cfg
    run.trace(f"val-begin {epoch}")
    kw: dict[str, Any] = dict(device=run.device, dtype=run.dtype, smoothing=cfg.label_smoothing,
                              dist=run.d)  # fmt: skip
    chosen: dict[str, float] = {}
    if final and run.served is None:  # not interruptible: a few passes over the holdout
        chosen = _choose_on_holdout(run, kw)
    kw["stop"] = run.stop if not run.d.enabled else None
    model = run.judged
    broadcast_buffers(model, run.d)
    if final:
        model = fold_batchnorm(model)
    result = validate(model, run.val_loader, predictions=final, tta=cfg.tta if final else "none",
                      channels_last=cfg.channels_last, **kw)  # fmt: skip
    if result is None:
        assert run.epoch_meter is not None
        _save_mid_epoch(run, epoch, _pass_steps(cfg, epoch, len(run.train_loader)),
                        run.epoch_meter)  # fmt: skip
        _interrupted(run, f"the validation after epoch {epoch + 1} (it reruns on resume)")
    assert result is not None
    row, preds = result
    run.trace(f"val-end {epoch}")
    if not math.isfinite(row["val_loss"]):
        raise TrainingDiverged(
            f"validation loss is {row['val_loss']} after epoch {epoch + 1}; "
            f"{run.out / 'last.safetensors'} is the last good checkpoint"
        )
    if preds is not None and run.d.main:
        _write_val_predictions(run, preds)
    return row | chosen


def _choose_on_holdout(run: _Run, kw: dict[str, Any]) -> dict[str, float]:
    """serve_weights auto with a holdout: validate the raw and the averaged weights (folded)
    on the held-out training images and serve the better (top-1, then loss; the average on a
    tie). Sets run.served and its reason; returns both scores for the log row."""
    assert run.avg is not None
    scores = {}
    for group, module in (("model", run.raw), ("ema", run.avg.module)):
        broadcast_buffers(module, run.d)
        result = validate(fold_batchnorm(module), run.val_loader, **kw)
        assert result is not None
        scores[group] = result[0]
    run.served = max(
        scores, key=lambda g: (scores[g]["val_acc"], -scores[g]["val_loss"], g == "ema")
    )
    n = len(run.val_loader.dataset)
    run.served_reason = (
        f"auto: on {n} held-out training images, ema {scores['ema']['val_acc']:.2f}% vs "
        f"model {scores['model']['val_acc']:.2f}% top-1"
    )
    return {
        f"val_{g}_{k}": scores[g][f"val_{k}"] for g in ("model", "ema") for k in ("acc", "loss")
    }


def _validation_record(run: _Run, epoch: int) -> Validation:
    """What produced this epoch's reported score: the final validation's TTA and folding."""
    assert run.meta_base.validation is not None
    final = epoch + 1 == epoch_count(run.cfg)
    tta = run.cfg.tta if final else "none"
    return dataclasses.replace(
        run.meta_base.validation, tta=tta, fold_bn=final, weights=run.judged_group,
        weights_reason=run.served_reason or "validated; the held-out comparison comes last",
    )  # fmt: skip


def _checkpoint(run: _Run, epoch: int, row: dict[str, Any]) -> None:
    """`last` every epoch, `best` when validation top-1 improved; log and plots (rank 0).
    A test split (CIFAR's, when no holdout is set) reports but never picks: there `best` is
    the latest validated epoch.

    The order is log, best, last: a kill or a full disk at any point leaves a `last` from
    which a resume redoes this epoch and rewrites whatever came after it."""
    val = run.meta_base.validation
    on_test = val is not None and val.data.get("split") == "test" and not run.cfg.holdout
    improved = "val_acc" in row and (on_test or row["val_acc"] > run.best_acc)
    if improved:
        run.best_acc, run.best_epoch = row["val_acc"], epoch + 1
    run.last_save = time.monotonic()
    if not run.d.main:
        return
    state = _training_state(run, epoch + 1, 0, row)
    groups = _state_groups(run, state)
    meta = dataclasses.replace(
        run.meta_base, training=state, validation=_validation_record(run, epoch)
    )
    run.log.append(row, plot=True)
    if improved:
        _save(run, "best", groups, meta)
    _save(run, "last", groups, meta, keep="previous.safetensors")
    run.last_save = time.monotonic()
    if run.progress:
        print(_summary_line(row, epoch_count(run.cfg), run.cfg.tta), file=sys.stderr, flush=True)


def _write_val_predictions(run: _Run, preds: ValPredictions) -> None:
    """RUN/val_predictions.csv: the final validation, one row per image."""
    paths = getattr(run.val_loader.dataset, "paths", None)
    write_predictions(
        run.out / VAL_PREDICTIONS,
        preds.index.tolist(),
        [str(paths[i]) for i in preds.index.tolist()] if paths is not None else None,
        preds.label.tolist(),
        preds.pred.tolist(),
        preds.prob.tolist(),
        run.meta_base.classes,
    )


def _save_mid_epoch(run: _Run, epoch: int, step: int, meter: Metrics) -> None:
    """last.safetensors mid-epoch: epoch `epoch` (0-based) has done `step` steps, with these
    counts. Every rank calls it (the stop decision is shared); rank 0 writes."""
    run.last_save = time.monotonic()
    if not run.d.main:
        return
    _check_weights_finite(run, epoch)
    state = _training_state(run, epoch, step, run.log.rows[-1] if run.log.rows else {})
    groups = _state_groups(run, state)
    meta = dataclasses.replace(run.meta_base, training=state)
    groups["meter"] = {n: getattr(meter, n) for n in ("sums", "count", "confusion")}
    if run.train_loader.generator is not None:  # where the next batch's augmentation starts
        groups["rng"]["augment"] = run.train_loader.generator.get_state()
    _save(run, "last", groups, meta, keep="previous.safetensors")
    run.last_save = time.monotonic()


def _training_state(run: _Run, epoch: int, step: int, row: dict[str, Any]) -> TrainingState:
    """Where the run stands: `epoch` epochs done plus `step` steps of the next one."""
    return TrainingState(epoch=epoch, step=step, elapsed_s=_elapsed(run), metrics=row,
                         best={"epoch": run.best_epoch, "val_acc": run.best_acc})  # fmt: skip


def _save(
    run: _Run, name: str, groups: dict, meta: CheckpointMeta, keep: str | None = None
) -> None:
    run.trace(f"save-begin {name}")
    save_checkpoint(run.out / f"{name}.safetensors", groups, meta,
                    keep_previous=run.out / keep if keep else None)  # fmt: skip
    run.trace(f"save-end {name}")


def _elapsed(run: _Run) -> float:
    return run.elapsed_before + time.monotonic() - run.t_start


def _resume_command(out: Path, data_root: str | Path | None, d: Dist) -> str:
    cmd = ["googlenet", "train", "--resume", "--out", str(out)]
    if data_root:
        cmd += ["--data", str(data_root)]
    if d.enabled:
        cmd[:1] = ["torchrun", f"--nproc_per_node={d.world_size}", "-m", "googlenet"]
    return shlex.join(cmd)


def _interrupted(run: _Run, where: str) -> None:
    """After the checkpoint of an interrupted run: say how to resume, raise Interrupted."""
    signum = run.stop.signum if run.stop is not None and run.stop.signum else signal.SIGINT
    raise Interrupted(
        f"{signal.Signals(signum).name}: stopped at {where}; saved "
        f"{run.out / 'last.safetensors'}. Resume with: {run.resume_command}",
        signum,
    )


def _bar(total: int, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, file=sys.stderr
    )


def _summary_line(row: dict[str, Any], epochs: int, tta: str = "none") -> str:
    def heads(split: str) -> str:
        s = f"loss {row[f'{split}_loss']:.4f} acc {row[f'{split}_acc']:.2f}%"
        aux = [
            f"{h[:-1]} {row[f'{split}_{h}acc']:.1f}%"
            for h in HEAD_PREFIXES[1:]
            if f"{split}_{h}acc" in row
        ]
        return s + (f" ({', '.join(aux)})" if aux else "")

    text = f"epoch {row['epoch']}/{epochs} lr {row['lr']:.4g} | train {heads('train')}"
    if "val_acc" in row:
        text += f" | val {heads('val')}"
    if "val_tta_acc" in row:
        text += f" | tta {tta} acc {row['val_tta_acc']:.2f}% ({row['val_tta_s']:.1f}s)"
    return text + f" | {row['images_per_s']:.0f} img/s {row['epoch_s']:.1f}s"


# --- checkpoint state ---------------------------------------------------------------------------


def _state_groups(run: _Run, state: TrainingState) -> dict[str, dict[str, Tensor]]:
    """Tensor groups for save_checkpoint; JSON-able optimizer/averager state goes into state."""
    raw, avg, scaler = run.raw, run.avg, run.scaler
    optim_tensors, state.optim = optimizer_state_to_tensors(run.opt)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    groups = {"model": raw.state_dict(), "optim": optim_tensors, "rng": rng}
    if run.lookahead is not None:
        groups["lookahead"] = run.lookahead.state_tensors()
    if avg is not None:
        groups["ema"] = avg.module.state_dict()
        state.average = {"updates": avg.updates, "polyak": avg.polyak}
    if scaler.is_enabled():
        state.scaler = {k: v for k, v in scaler.state_dict().items() if not isinstance(v, Tensor)}
    return groups


def _restore(run: _Run) -> None:
    """Continue from last.safetensors, or from previous.safetensors when last is missing or
    damaged: weights, optimizer, average, RNG, the epoch and step, the epoch's counts so far.
    With no checkpoint yet (a run killed before its first), start from the beginning."""
    errors: list[str] = []
    for name in ("last.safetensors", "previous.safetensors"):
        path = run.out / name
        if not path.is_file():
            continue
        try:
            groups, meta = load_checkpoint(path)
        except UserError as e:
            errors.append(str(e))
            continue
        if errors:
            note(f"{errors[0]}; resuming from {path} instead")
            if run.d.main:  # set aside, so that the next save does not keep it as previous
                damaged = run.out / "last.safetensors"
                damaged.replace(damaged.with_name("last.safetensors.damaged"))
        _apply_state(run, path, groups, meta)
        return
    if errors:
        raise UserError(f"{errors[0]}; no other good checkpoint in {run.out} to resume from")
    note(f"{run.out}: no checkpoint yet, so the run starts from the beginning")


def _apply_state(run: _Run, path: Path, groups: dict, meta: CheckpointMeta) -> None:
    if meta.model != run.meta_base.model:
        raise UserError(
            f"{path}: the checkpoint's model {meta.model} differs from this config's "
            f"{run.meta_base.model}; resume with the run's own config ({run.out / 'config.toml'})"
        )
    state = meta.training
    if state is None or not state.optim:
        raise UserError(f"{path}: checkpoint has no optimizer state to resume from")
    if "init" in meta.provenance:  # the run's provenance carries over
        run.meta_base.provenance["init"] = meta.provenance["init"]
    load_state_dict_strict(run.raw, groups["model"], source=str(path))
    optimizer_state_from_tensors(run.opt, groups.get("optim", {}), state.optim)
    if run.lookahead is not None:
        if "lookahead" not in groups:
            raise UserError(f"{path}: checkpoint has no lookahead state but this config has")
        run.lookahead.load_state_tensors(groups["lookahead"])
    if run.avg is not None:
        if "ema" not in groups:
            raise UserError(f"{path}: checkpoint has no averaged weights but this config has")
        load_state_dict_strict(run.avg.module, groups["ema"], source=str(path))
        run.avg.updates = int(state.average.get("updates", 0))
    if state.scaler and run.scaler.is_enabled():
        run.scaler.load_state_dict(state.scaler)
    rng = groups.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    best = state.best
    run.best_acc, run.best_epoch = float(best.get("val_acc", -1.0)), int(best.get("epoch", 0))
    run.start_epoch, run.start_step = state.epoch, state.step
    steps = len(run.train_loader)
    if run.start_step:
        if run.start_step > steps or "meter" not in groups:
            raise UserError(
                f"{path}: saved at step {run.start_step} of an epoch, but this run has {steps} "
                "steps per epoch (other data or batch size?) or the counts are missing"
            )
        run.resumed_meter = groups["meter"]
        run.resumed_augment = groups.get("rng", {}).get("augment")
    rows = run.log.rows
    # Checkpoints from before mid-epoch saves hold no elapsed_s: the log has it.
    run.elapsed_before = state.elapsed_s or (float(rows[-1]["elapsed_s"]) if rows else 0.0)
    where = (
        f"epoch {run.start_epoch + 1} step {run.start_step}/{steps}"
        if run.start_step
        else f"the end of epoch {run.start_epoch}"
    )
    note(f"resuming {run.out} from {where} ({path.name})")
