"""Run logs: one row per epoch as JSONL and CSV, and PNG plots of the curves.

Rows are flat dicts: epoch, lr, train_/val_ loss and accuracy per head (main, aux1, aux2),
images/s and seconds. Every file is rewritten whole each epoch (atomically), so a kill or a
full disk leaves the previous complete file, and a resumed run that truncated its history
leaves consistent files.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from googlenet.files import atomic_write_bytes, atomic_write_text
from googlenet.model import HEAD_PREFIXES


class RunLog:
    """metrics.jsonl + metrics.csv + loss.png / accuracy.png in a run folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.jsonl = self.folder / "metrics.jsonl"
        self.csv = self.folder / "metrics.csv"
        self.rows: list[dict[str, Any]] = []

    def resume(self, up_to_epoch: int) -> list[dict[str, Any]]:
        """Reload the rows of epochs <= up_to_epoch (a killed run may have logged more)."""
        rows = read_jsonl(self.jsonl) if self.jsonl.is_file() else []
        self.rows = [r for r in rows if int(r.get("epoch", 0)) <= up_to_epoch]
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_write_text(self.jsonl, text)
        return self.rows

    def append(self, row: dict[str, Any], plot: bool = True) -> None:
        self.rows.append(row)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Rewritten whole (atomically) rather than appended: a kill or a full disk mid-write
        # then leaves the previous complete file, never a torn last line.
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        atomic_write_text(self.csv, to_csv(self.rows))
        if plot:
            plot_history(self.rows, self.folder)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: everything before it is good
    return rows


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(v) for k, v in r.items()})
    return buf.getvalue()


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_history(rows: Sequence[dict[str, Any]], folder: str | Path) -> list[Path]:
    """loss.png and accuracy.png: each head, train (solid) vs validation (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    written = []
    for metric, ylabel in (("loss", "loss"), ("acc", "accuracy (%)")):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        for head, colour in zip(HEAD_PREFIXES, ("C0", "C1", "C2"), strict=True):
            name = head.rstrip("_") or "output"
            for split, style in (("train", "-"), ("val", "--")):
                key = f"{split}_{head}{metric}"
                pts = [
                    (r["epoch"], r[key])
                    for r in rows
                    if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, color=colour, marker=".", label=f"{name} {split}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = folder / f"{'loss' if metric == 'loss' else 'accuracy'}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written
