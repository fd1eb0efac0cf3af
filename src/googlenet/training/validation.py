"""Validation: the loss with every head (shared with the training step), the validation pass
(`validate`), the per-epoch and final validation of a run, and val_predictions.csv.

The final validation scores the judged weights with BatchNorm folded, adds the config's TTA
and writes the per-image results; with serve_weights auto and a holdout it first picks the
weights to serve on the held-out images."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from googlenet.devices import autocast, bound_kept_memory
from googlenet.fuse import fold_batchnorm
from googlenet.metrics import VAL_PREDICTIONS, Metrics, write_predictions
from googlenet.model import AUX_TAPS
from googlenet.training.distributed import Dist, all_reduce, broadcast_buffers, gather_by_index
from googlenet.training.interrupt import StopRequest
from googlenet.training.optim import pass_steps
from googlenet.training.state import Run, TrainingDiverged, interrupted, save_mid_epoch
from googlenet.tta import tta_logits


def outputs(out: Any) -> list[Tensor]:
    """[logits, aux1, aux2] (the ones present) from a train()-mode forward."""
    if isinstance(out, Tensor):
        return [out]
    return [t for t in out if t is not None]


def head_losses(outs: list[Tensor], y: Tensor, smoothing: float) -> list[Tensor]:
    """Each head's cross-entropy (the training step weights the aux ones by aux_weight)."""
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
            pred = meter.update(outs, y, head_losses(outs, y, smoothing))
            if tta_meter is not None:
                t0 = time.perf_counter()
                outs = [tta_logits(forward, x, tta, first=outs[0])]
                tta_s += time.perf_counter() - t0
                pred = tta_meter.update(outs, y, head_losses(outs, y, smoothing))
            if predictions:
                prob = torch.softmax(outs[0].float(), 1).gather(1, pred[:, None])[:, 0]
                parts.append((y.cpu(), pred.cpu(), prob.cpu()))
            bound_kept_memory()
    model.train(was_training)
    return _reduced(meter, tta_meter, tta_s, dist or Dist(), parts if predictions else None, loader)


def _reduced(
    meter: Metrics,
    tta_meter: Metrics | None,
    tta_s: float,
    d: Dist,
    parts: list[tuple[Tensor, Tensor, Tensor]] | None,
    loader: Any,
) -> tuple[dict[str, float], ValPredictions | None]:
    """validate's log row over every rank, and the per-image results (`parts`, None: not
    wanted) gathered from every rank in data-set order."""
    meter.reduce(lambda t: all_reduce(t, d))
    row = meter.row("val")
    if tta_meter is not None:
        tta_meter.reduce(lambda t: all_reduce(t, d))
        row |= tta_meter.row("val_tta") | {"val_tta_s": tta_s}
    yielded = getattr(loader, "yielded", None)  # sample indices, as batches came (BatchLoader)
    if parts is None or yielded is None:
        return row, None
    cols = [torch.cat([p[i] for p in parts]) if parts else torch.zeros(0) for i in range(3)]
    index = torch.cat(yielded) if yielded else torch.zeros(0, dtype=torch.int64)
    index, label, pred, prob = gather_by_index(index, cols, d)
    return row, ValPredictions(index, label.long(), pred.long(), prob)


# --- a run's validation -------------------------------------------------------------------------


def validate_epoch(run: Run, epoch: int, final: bool) -> dict[str, float]:
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
        save_mid_epoch(run, epoch, pass_steps(cfg, epoch, len(run.train_loader)),
                       run.epoch_meter)  # fmt: skip
        interrupted(run, f"the validation after epoch {epoch + 1} (it reruns on resume)")
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


def _choose_on_holdout(run: Run, kw: dict[str, Any]) -> dict[str, float]:
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


def _write_val_predictions(run: Run, preds: ValPredictions) -> None:
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
