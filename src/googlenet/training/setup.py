"""Setting a run up: the process and device, the data sets, the model (built, initialised,
frozen), the optimizer and weight average, the loaders, the checkpoint metadata and the run
folder; restored from `last` on resume (state.restore)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from googlenet import fastpool
from googlenet.checkpoint import CheckpointMeta, Validation
from googlenet.data.arrays import ArrayDataset
from googlenet.data.augment import Augment
from googlenet.data.build import Data as _Data
from googlenet.data.build import setup_data as _setup_data
from googlenet.data.build import working_side
from googlenet.data.loader import BatchLoader
from googlenet.devices import keep_freed_memory, pick_device, pick_dtype
from googlenet.errors import UserError, note
from googlenet.files import atomic_write_text
from googlenet.logs import RunLog
from googlenet.model import build
from googlenet.training import finetune
from googlenet.training.config import TrainConfig, to_toml
from googlenet.training.distributed import Dist
from googlenet.training.optim import WeightAverage, make_optimizer, serve_rule, total_steps
from googlenet.training.speedrun import Lookahead, apply_norm_options, crop_stages, whiten
from googlenet.training.state import Run, restore


def model_args(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """build() arguments, as stored in the checkpoint's meta.model (all of them that matter)."""
    args: dict[str, Any] = {
        "variant": cfg.variant,
        "num_classes": num_classes,
        "aux_logits": cfg.aux_logits,
        "transform_input": cfg.transform_input,
    }
    if cfg.dropout >= 0:
        args["dropout"] = cfg.dropout
    if cfg.aux_dropout >= 0:
        args["aux_dropout"] = cfg.aux_dropout
    return args


def loader_workers(cfg: TrainConfig) -> int:
    """Decoding processes per rank: `loader_workers`, or (-1) this rank's share of the CPU
    cores less one for the training process, between 1 and 16."""
    if cfg.loader_workers >= 0:
        return cfg.loader_workers
    per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(16, per_rank - 1))


def setup(
    cfg: TrainConfig,
    d: Dist,
    out: Path,
    train_set: Any,
    val_set: Any,
    data_root: str | Path | None,
    resume: bool,
    progress: bool,
) -> Run:
    """Data, model, optimizer, loaders and the run folder (restored from `last` on resume)."""
    cfg, init = _init_source(cfg, out, resume)
    device = _prepare_process(cfg, d)
    data = _setup_data(cfg, out, train_set, val_set, data_root)
    dtype = pick_dtype(cfg.precision, device)
    raw, args, init_record, frozen = _setup_model(cfg, d, device, dtype, data, init)
    del init
    opt = make_optimizer(cfg, raw)
    avg = WeightAverage(raw, cfg.ema_decay, cfg.polyak) if cfg.ema or cfg.polyak else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    per_rank = cfg.batch_size // d.world_size
    train_loader, val_loader = _make_loaders(cfg, d, device, data, per_rank)
    meta_base = _meta_base(cfg, data, args, init_record, avg is not None, dtype, per_rank)
    log = RunLog(out)
    run = Run(cfg, d, out, device, dtype, raw, raw, opt, avg, scaler, train_loader, val_loader,
              meta_base, log, progress)  # fmt: skip
    total = total_steps(cfg, len(train_loader))
    train_loader.small = stages = crop_stages(cfg, data.size, raw, total)
    run.served, run.served_reason = serve_rule(cfg, total)
    if cfg.lookahead_every:
        run.lookahead = Lookahead(raw, cfg.lookahead_every, cfg.lookahead_decay, total)
    if resume:
        restore(run)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        log.resume(run.start_epoch)  # drops rows a killed run logged after its checkpoint
        atomic_write_text(out / "config.toml", to_toml(cfg))
    if cfg.compile:
        run.net = torch.compile(run.net)
    if d.enabled:
        run.net = DDP(run.net, device_ids=[device.index] if device.type == "cuda" else None)
    if d.main and progress:
        _print_banner(run, data, stages, frozen)
    return run


def _init_source(cfg: TrainConfig, out: Path, resume: bool) -> tuple[TrainConfig, Any]:
    """(the config with what an `init` checkpoint supplies, that checkpoint or None). A resume
    restores its own checkpoint instead; one killed before its first starts afresh."""
    if cfg.init and not (
        resume and any((out / n).is_file() for n in ("last.safetensors", "previous.safetensors"))
    ):
        init = finetune.read_init(cfg.init)
        return finetune.config_from_init(cfg, init).validate(), init
    return cfg, None


def _prepare_process(cfg: TrainConfig, d: Dist) -> torch.device:
    """This rank's device, torch's threads and allocator as configured; the batch checked."""
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
    return device


def _meta_base(
    cfg: TrainConfig,
    data: _Data,
    args: dict[str, Any],
    init_record: dict[str, Any] | None,
    averaged: bool,
    dtype: torch.dtype | None,
    per_rank: int,
) -> CheckpointMeta:
    """The checkpoint metadata every save starts from (the training state comes per save)."""
    provenance: dict[str, Any] = {"source": "train", "config": cfg.to_dict()}
    if init_record is not None:
        provenance["init"] = init_record
    return CheckpointMeta(
        model=args,
        classes=data.classes,
        preprocess=data.val_pp,
        dataset=cfg.dataset,
        provenance=provenance,
        validation=Validation(
            weights="ema" if averaged else "model",
            precision=_precision_name(dtype),
            batch_size=per_rank,
            channels_last=cfg.channels_last,
            data=data.record,
        ),
    )


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


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
        pp = data.val_pp
        finetune.check_init_features(raw, data.train_set, pp.input_size, pp.mean, pp.std)
    raw.train()
    raw.check_input(torch.empty(0, 3, data.size, data.size))
    apply_norm_options(cfg, raw)
    if cfg.whiten_init and not cfg.init:  # loaded weights are not replaced
        pp = data.val_pp
        whiten(raw, data.train_set, cfg, pp.input_size, pp.mean, pp.std)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    raw = raw.to(device, memory_format=fmt)
    if cfg.sync_bn and d.enabled:  # BN statistics over the global batch (same parameters)
        if device.type != "cuda":
            raise UserError("config key 'sync_bn': SyncBatchNorm needs CUDA GPUs (NCCL)")
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    # After any module swap (SyncBatchNorm), so that the frozen layers are the ones trained.
    frozen = finetune.freeze(raw, cfg.freeze) if cfg.freeze else []
    if cfg.fast_pool and fastpool.applies(device, dtype, cfg.channels_last):
        swapped = fastpool.use_fast_pool(raw)
        if not swapped:
            note("fast_pool: the C kernel is unavailable (no C compiler?); ATen's max-pool is used")
    return raw, args, init_record, frozen


def augment_of(cfg: TrainConfig) -> Augment:
    """The training augmentation the config asks for."""
    return Augment(
        crop_padding=cfg.crop_padding,
        flip=cfg.flip,
        cutout=cfg.cutout,
        scale_aspect=cfg.scale_aspect,
        photometric=cfg.photometric,
        alternate_flip=cfg.alternate_flip,
        min_area=cfg.min_area,
    )


def _make_loaders(
    cfg: TrainConfig, d: Dist, device: torch.device, data: _Data, per_rank: int
) -> tuple[Any, Any]:
    """The training loader (shuffled, augmented, whole batches) and the validation loader."""
    augment = augment_of(cfg)
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


def _print_banner(run: Run, data: _Data, stages: list[tuple[int, int]], frozen: list[str]) -> None:
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
