"""A run's state: what a set-up run holds (`Run`), and saving and restoring it.

Crash safety: `last.safetensors` is written at every epoch end and every `checkpoint_every_s`
seconds mid-epoch (the file it replaces is kept as `previous.safetensors`); `best.safetensors`
when validation top-1 improved. A checkpoint holds the weights, the optimizer, the averaged
weights and the lookahead copy, the RNG states (torch, CUDA, the augmentation's) and, mid-epoch,
the epoch's counts so far, so `--resume` continues exactly where the run stopped. Ctrl-C /
SIGTERM finish the step, save, print the resume command and raise Interrupted (exit 130 / 143).
"""

from __future__ import annotations

import dataclasses
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
from googlenet.data.loader import BatchLoader
from googlenet.errors import UserError, note
from googlenet.metrics import Metrics
from googlenet.training.config import TrainConfig
from googlenet.training.distributed import Dist
from googlenet.training.interrupt import Interrupted, StopRequest
from googlenet.training.optim import WeightAverage, epoch_count
from googlenet.training.speedrun import Lookahead


class TrainingDiverged(UserError):
    """The loss (or the weights) became NaN/infinite; the last good checkpoint is kept."""


@dataclass
class Run:
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

    @property
    def on_test_split(self) -> bool:
        """Validation on a test split (CIFAR's, when no holdout is set) reports but never
        picks: there `best` is the latest validated epoch."""
        val = self.meta_base.validation
        return val is not None and val.data.get("split") == "test" and not self.cfg.holdout


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values())


def check_weights_finite(run: Run, epoch: int) -> None:
    """Raise TrainingDiverged (before anything is saved over the last good checkpoint) when
    the weights or their average hold a NaN/inf."""
    if not (_all_finite(run.raw) and (run.avg is None or _all_finite(run.avg.module))):
        raise TrainingDiverged(
            f"weights became NaN/infinite in epoch {epoch + 1}; training stopped, "
            f"{run.out / 'last.safetensors'} is the last good checkpoint"
        )


def elapsed(run: Run) -> float:
    return run.elapsed_before + time.monotonic() - run.t_start


# --- saving -------------------------------------------------------------------------------------


def _validation_record(run: Run, epoch: int) -> Validation:
    """What produced this epoch's reported score: the final validation's TTA and folding."""
    assert run.meta_base.validation is not None
    final = epoch + 1 == epoch_count(run.cfg)
    tta = run.cfg.tta if final else "none"
    return dataclasses.replace(
        run.meta_base.validation, tta=tta, fold_bn=final, weights=run.judged_group,
        weights_reason=run.served_reason or "validated; the held-out comparison comes last",
    )  # fmt: skip


def save_epoch(run: Run, epoch: int, row: dict[str, Any]) -> None:
    """`last` every epoch, `best` when validation top-1 improved; log and plots (rank 0).
    A test split reports but never picks (Run.on_test_split): there `best` is the latest
    validated epoch.

    The order is log, best, last: a kill or a full disk at any point leaves a `last` from
    which a resume redoes this epoch and rewrites whatever came after it."""
    improved = "val_acc" in row and (run.on_test_split or row["val_acc"] > run.best_acc)
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


def save_mid_epoch(run: Run, epoch: int, step: int, meter: Metrics) -> None:
    """last.safetensors mid-epoch: epoch `epoch` (0-based) has done `step` steps, with these
    counts. Every rank calls it (the stop decision is shared); rank 0 writes."""
    run.last_save = time.monotonic()
    if not run.d.main:
        return
    check_weights_finite(run, epoch)
    state = _training_state(run, epoch, step, run.log.rows[-1] if run.log.rows else {})
    groups = _state_groups(run, state)
    meta = dataclasses.replace(run.meta_base, training=state)
    groups["meter"] = {n: getattr(meter, n) for n in ("sums", "count", "confusion")}
    if run.train_loader.generator is not None:  # where the next batch's augmentation starts
        groups["rng"]["augment"] = run.train_loader.generator.get_state()
    _save(run, "last", groups, meta, keep="previous.safetensors")
    run.last_save = time.monotonic()


def _training_state(run: Run, epoch: int, step: int, row: dict[str, Any]) -> TrainingState:
    """Where the run stands: `epoch` epochs done plus `step` steps of the next one."""
    return TrainingState(epoch=epoch, step=step, elapsed_s=elapsed(run), metrics=row,
                         best={"epoch": run.best_epoch, "val_acc": run.best_acc})  # fmt: skip


def _save(run: Run, name: str, groups: dict, meta: CheckpointMeta, keep: str | None = None) -> None:
    run.trace(f"save-begin {name}")
    save_checkpoint(run.out / f"{name}.safetensors", groups, meta,
                    keep_previous=run.out / keep if keep else None)  # fmt: skip
    run.trace(f"save-end {name}")


def _state_groups(run: Run, state: TrainingState) -> dict[str, dict[str, Tensor]]:
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


# --- interrupting -------------------------------------------------------------------------------


def resume_command(out: Path, data_root: str | Path | None, d: Dist) -> str:
    cmd = ["googlenet", "train", "--resume", "--out", str(out)]
    if data_root:
        cmd += ["--data", str(data_root)]
    if d.enabled:
        cmd[:1] = ["torchrun", f"--nproc_per_node={d.world_size}", "-m", "googlenet"]
    return shlex.join(cmd)


def interrupted(run: Run, where: str) -> None:
    """After the checkpoint of an interrupted run: say how to resume, raise Interrupted."""
    signum = run.stop.signum if run.stop is not None and run.stop.signum else signal.SIGINT
    raise Interrupted(
        f"{signal.Signals(signum).name}: stopped at {where}; saved "
        f"{run.out / 'last.safetensors'}. Resume with: {run.resume_command}",
        signum,
    )


# --- restoring ----------------------------------------------------------------------------------


def restore(run: Run) -> None:
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


def _apply_state(run: Run, path: Path, groups: dict, meta: CheckpointMeta) -> None:
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
    if "cuda" in rng and torch.cuda.is_available():  # dropout on a GPU; rank 0's on every rank
        torch.cuda.set_rng_state(rng["cuda"])
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
