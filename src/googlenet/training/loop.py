"""The training loop: `train(config) -> RunResult`.

One loop for every recipe, read top to bottom: set up (setup.py: data, model, optimizer,
loaders, run folder), then per epoch train one epoch (`_train_epoch`, `_train_step`), validate
(validation.py), checkpoint (state.py). The loss with the auxiliary heads weighted as configured
lives here, not in the model. Schedule, optimizer and weight averaging are in optim.py, the
speed-run tricks in speedrun.py, counting in metrics.py, DDP in distributed.py, device and
precision in devices.py.

Determinism: the data order and augmentation are a function of (seed, epoch, rank) (see
BatchLoader), and the torch RNG (dropout) is reseeded from (seed, epoch, rank) at the start of
each epoch; both generators' states are saved in every checkpoint, so `--resume` reproduces an
uninterrupted run exactly on CPU, from an epoch end or from the middle of one.

The run folder is chosen and locked by runs.py. GOOGLENET_TRACE=FILE makes the loop append its
phase to FILE ("step-begin E S", "val-begin E", "save-begin NAME", ...) for the kill tests.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from googlenet.devices import autocast, bound_kept_memory
from googlenet.errors import note
from googlenet.metrics import Metrics
from googlenet.model import HEAD_PREFIXES
from googlenet.training import runs
from googlenet.training.config import TrainConfig
from googlenet.training.distributed import all_reduce, init_distributed
from googlenet.training.interrupt import StopRequest
from googlenet.training.optim import epoch_count, lr_at, pass_steps, set_lr
from googlenet.training.setup import setup
from googlenet.training.state import (
    Run,
    TrainingDiverged,
    check_weights_finite,
    elapsed,
    interrupted,
    resume_command,
    save_epoch,
    save_mid_epoch,
)
from googlenet.training.validation import head_losses, outputs, validate_epoch


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
    val_set: Any = None  # the validation images as validation saw them (for the run's report)
    picks_best: bool = True  # False on a test split: best.safetensors is the latest validated


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
    `googlenet train` then writes report.html from what the run recorded
    (insight.report.report_after_training(result.out, result.val_set)).
    """
    cfg.validate()
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    d, own_group = init_distributed("cuda" if use_cuda else "cpu")
    lock = None
    try:
        out = runs.choose(cfg.out, cfg.recipe, resume=resume, overwrite=overwrite)
        if d.enabled:  # rank 0's choice (a free runs/<recipe>-N) for every rank
            chosen = [str(out)]
            torch_dist.broadcast_object_list(chosen, src=0)
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
            run = setup(cfg, d, out, train_set, val_set, data_root, resume, progress)
            run.stop = stop
            run.resume_command = resume_command(out, data_root, d)
            return _train(run)
    finally:
        if lock is not None:
            lock.release()
        if own_group:
            torch_dist.destroy_process_group()


def _train(run: Run) -> RunResult:
    """The epochs of a set-up run: train, validate, checkpoint."""
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
            row.update(validate_epoch(run, epoch, final))
        row["epoch_s"] = time.perf_counter() - t0
        row["elapsed_s"] = elapsed(run)
        save_epoch(run, epoch, row)
        if d.main and run.progress:
            print(_summary_line(row, epoch_count(cfg), cfg.tta), file=sys.stderr, flush=True)
    run.trace("done")
    if d.main and run.progress and run.served:
        print(f"serving the {run.served} weights ({run.served_reason})", file=sys.stderr)
    return RunResult(
        out=run.out,
        epochs=cfg.epochs,
        metrics=row,
        best_acc=run.best_acc,
        best_epoch=run.best_epoch,
        history=list(run.log.rows),
        model=run.judged.eval(),
        main=d.main,
        val_set=run.val_loader.dataset,
        picks_best=not run.on_test_split,
    )


def _reseed(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Dropout randomness as a function of (seed, epoch, rank), so a resume replays it."""
    torch.manual_seed((cfg.seed * 1_000_003 + epoch * 1009 + rank) % (2**63))


def _train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass over the training data (from run.start_step when resuming into this epoch);
    returns the epoch's log row (lr, train metrics). Saves mid-epoch every checkpoint_every_s,
    and on Ctrl-C / SIGTERM saves after the step and raises Interrupted."""
    cfg, d, device = run.cfg, run.d, run.device
    steps_per_epoch = len(run.train_loader)
    steps = pass_steps(cfg, epoch, steps_per_epoch)
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
        bound_kept_memory()  # what keep_freed_memory keeps stays near the step's working set
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
            save_mid_epoch(run, epoch, i + 1, meter)
        if stop:
            if bar is not None:
                bar.close()
            interrupted(run, f"epoch {epoch + 1} step {i + 1}/{steps}")
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
    check_weights_finite(run, epoch)
    return row


def _train_step(run: Run, epoch: int, i: int, x: Tensor, y: Tensor, meter: Metrics) -> bool:
    """Step i of pass `epoch`: forward, the loss with the aux heads weighted, backward, the
    optimizer and weight averages; counts into `meter`. Returns whether any rank asked to stop
    (Ctrl-C / SIGTERM); raises TrainingDiverged on a NaN/inf loss."""
    cfg, d, device = run.cfg, run.d, run.device
    steps_per_epoch = len(run.train_loader)
    step = epoch * steps_per_epoch + i
    lr = lr_at(cfg, step, steps_per_epoch)
    set_lr(run.opt, lr)
    with autocast(device, run.dtype):
        outs = outputs(run.net(x))
    losses = head_losses(outs, y, cfg.label_smoothing)
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
