"""How predictions are counted: one accumulator (`Metrics`) for training, validation and
`googlenet evaluate` alike: per head the loss sum and top-1/top-5 hits, plus the main head's
confusion matrix; reduced over DDP ranks on demand."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from googlenet.errors import UserError
from googlenet.model import HEAD_PREFIXES


def count_confusion(confusion: Tensor, labels: Tensor, predicted: Tensor) -> Tensor:
    """Add each (true, predicted) class pair to `confusion` (C x C int64, rows = true class),
    in place; returns it. The one place a confusion matrix is counted."""
    idx = labels.long() * confusion.shape[0] + predicted.long()
    confusion.view(-1).index_add_(0, idx, torch.ones_like(idx))
    return confusion


@dataclass
class EvalResult:
    """Accuracy of a model (or ensemble) on one data set under one TTA scheme."""

    classes: list[str]
    confusion: Tensor  # C x C int64, rows = true class, columns = predicted
    topk_correct: dict[int, int]  # k -> number of samples whose label is in the top k
    tta: str = "none"
    checkpoints: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unreadable files (folder evaluation)
    paths: list[str] = field(default_factory=list)  # file of each sample index (folders)
    predictions: list[tuple[int, int, int, float]] = field(default_factory=list)
    # per image, in sample order: (index, true class, predicted class, its probability)

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        return self.topk_correct.get(1, 0) / max(self.n, 1)

    @property
    def top5(self) -> float:
        k = max(k for k in self.topk_correct if k <= 5)
        return self.topk_correct[k] / max(self.n, 1)

    @property
    def per_class(self) -> list[float | None]:
        """Accuracy per true class (None for a class with no samples)."""
        support = self.confusion.sum(1)
        diag = self.confusion.diagonal()
        return [None if s == 0 else float(d) / float(s) for d, s in zip(diag, support, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoints": self.checkpoints,
            "tta": self.tta,
            "n": self.n,
            "top1": self.top1,
            "top5": self.top5,
            "per_class": dict(zip(self.classes, self.per_class, strict=True)),
            "skipped": self.skipped,
        }


class Metrics:
    """Running counts over batches. Per head (main, aux1, aux2): the loss summed over samples
    (when losses are given) and the top-k hits; for the main head the confusion matrix.
    Everything stays on `device` (no host sync per step) until read."""

    def __init__(
        self,
        num_classes: int,
        heads: int = 1,
        ks: Sequence[int] = (1, 5),
        device: str | torch.device = "cpu",
    ) -> None:
        self.c = num_classes
        self.ks = sorted({min(k, num_classes) for k in (1, *ks)})
        # per head: loss sum, then hits for each k
        self.sums = torch.zeros(heads, 1 + len(self.ks), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(
        self,
        scores: Tensor | Sequence[Tensor],
        labels: Tensor,
        losses: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Count one batch: `scores` (logits or probabilities, N x C) per head, true labels N,
        and optionally each head's mean loss on the batch. Returns the main head's predicted
        classes as counted, so per-image records agree with the counts even on tied scores."""
        outs = [scores] if isinstance(scores, Tensor) else list(scores)
        labels = labels.to(self.sums.device).long()
        n = labels.shape[0]
        for i, out in enumerate(outs):
            top = out.topk(self.ks[-1], dim=1).indices.to(labels.device)
            hit = top == labels[:, None]
            for j, k in enumerate(self.ks):
                self.sums[i, 1 + j] += hit[:, :k].any(1).sum()
            if losses is not None:
                self.sums[i, 0] += losses[i].detach().double() * n
            if i == 0:
                predicted = top[:, 0]
                count_confusion(self.confusion, labels, predicted)
        self.count += n
        return predicted

    def reduce(self, all_reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum the counts over DDP ranks in place (all_reduce: a summing all-reduce)."""
        packed = all_reduce(torch.cat([self.sums.flatten(), self.count[None]]))
        self.sums.copy_(packed[:-1].view_as(self.sums))
        self.count.copy_(packed[-1])
        self.confusion.copy_(all_reduce(self.confusion))

    @property
    def n(self) -> int:
        return int(self.count.item())

    def loss(self, head: int = 0) -> float:
        """Mean loss of a head (needs losses passed to update)."""
        return self.sums[head, 0].item() / max(self.count.item(), 1.0)

    def accuracy(self, head: int = 0, k: int = 1) -> float:
        """Top-k accuracy of a head, in percent."""
        j = self.ks.index(min(k, self.c))
        return 100.0 * self.sums[head, 1 + j].item() / max(self.count.item(), 1.0)

    def row(self, prefix: str) -> dict[str, float]:
        """The log row's entries: {prefix}_loss/_acc per head, and {prefix}_acc5 (main)."""
        out: dict[str, float] = {}
        for i in range(self.sums.shape[0]):
            head = HEAD_PREFIXES[i]
            out[f"{prefix}_{head}loss"] = self.loss(i)
            out[f"{prefix}_{head}acc"] = self.accuracy(i, 1)
            if i == 0:
                out[f"{prefix}_acc5"] = self.accuracy(0, 5)
        return out

    def result(self, classes: list[str], **kw: Any) -> EvalResult:
        """The main head's counts as an EvalResult."""
        topk = {k: int(self.sums[0, 1 + j].item()) for j, k in enumerate(self.ks)}
        return EvalResult(list(classes), self.confusion.cpu().clone(), topk, **kw)


VAL_PREDICTIONS = "val_predictions.csv"  # in a run folder: the final validation, per image
PREDICTION_COLUMNS = ("index", "path", "true", "predicted", "probability")


def write_predictions(
    path: Path,
    index: Sequence[int],
    paths: Sequence[str] | None,
    true: Sequence[int],
    predicted: Sequence[int],
    prob: Sequence[float],
    classes: Sequence[str],
) -> Path:
    """Per-image results as CSV (atomically): index in the data set, file path (empty for
    in-memory data), true and predicted class names, the predicted class's probability."""
    from googlenet.files import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PREDICTION_COLUMNS)
    for j, i in enumerate(index):
        source = paths[j] if paths is not None else ""
        w.writerow([i, source, classes[true[j]], classes[predicted[j]], f"{prob[j]:.6f}"])
    atomic_write_text(path, buf.getvalue())
    return path


def read_predictions(path: Path) -> list[dict[str, str]]:
    """The rows of a predictions CSV written by write_predictions (val_predictions.csv,
    evaluate's predictions.csv), keyed by PREDICTION_COLUMNS; UserError for another CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != PREDICTION_COLUMNS:
            raise UserError(
                f"{path}: columns {reader.fieldnames} are not {','.join(PREDICTION_COLUMNS)}"
            )
        return list(reader)
