"""Which inception branch carries the signal: branch usage and ablation.

A branch's energy is the sum of its squared activations over channels and positions; its share
is that energy over the four branches' sum. The per-channel version divides each energy by the
branch's width first (3a: 64 / 128 / 32 / 32 channels), then normalises. Ablation zeroes one
branch at a time and measures the accuracy lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from googlenet.errors import UserError
from googlenet.model import Inception

BRANCHES = ("1x1", "3x3", "5x5", "pool")  # Inception.branch1 .. branch4

# --- blocks and branches ----------------------------------------------------------------------


def inception_blocks(model: nn.Module) -> dict[str, Inception]:
    """The inception blocks of a network by attribute name (inception3a ... inception5b)."""
    blocks = {n: m for n, m in model.named_children() if isinstance(m, Inception)}
    if not blocks:
        raise UserError(f"{type(model).__name__} has no inception blocks to explain")
    return blocks


def branch_module(block: Inception, branch: str) -> nn.Module:
    if branch not in BRANCHES:
        raise UserError(f"unknown branch {branch!r}; expected one of {', '.join(BRANCHES)}")
    return getattr(block, f"branch{BRANCHES.index(branch) + 1}")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """'inception4c' or 'inception4c:3x3' (a block, or one of its branches) -> the module.
    The 'inception' prefix may be left out ('4c:5x5')."""
    block_name, _, branch = name.partition(":")
    blocks = inception_blocks(model)
    if not block_name.startswith("inception"):
        block_name = "inception" + block_name
    if block_name not in blocks:
        raise UserError(f"unknown block {name!r}; expected one of {', '.join(blocks)}")
    block = blocks[block_name]
    return branch_module(block, branch) if branch else block


@contextmanager
def _branch_hooks(
    model: nn.Module, fn: Callable[[str, int, Tensor], Tensor | None]
) -> Iterator[None]:
    """Forward hooks on every branch of every block: fn(block, branch index, output)."""
    handles = []
    try:
        for name, block in inception_blocks(model).items():
            for i in range(len(BRANCHES)):
                mod = getattr(block, f"branch{i + 1}")

                def hook(_m, _inp, out, name=name, i=i):
                    return fn(name, i, out)

                handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


# --- branch usage -----------------------------------------------------------------------------


@dataclass
class BranchUsage:
    """Branch energies of a set of images: energy[block] is N x 4 (float64, branch order
    BRANCHES); widths[block] the branches' channel counts; sources one name per image."""

    energy: dict[str, Tensor]
    widths: dict[str, tuple[int, ...]]
    sources: list[str] = field(default_factory=list)
    outputs: Tensor | None = None  # the model's output (logits) for these images

    def __len__(self) -> int:
        return next(iter(self.energy.values())).shape[0] if self.energy else 0

    def shares(self, per_channel: bool = False) -> dict[str, Tensor]:
        """block -> N x 4 shares, each row summing to 1 (per channel: energy / width first)."""
        out = {}
        for block, e in self.energy.items():
            if per_channel:
                e = e / torch.tensor(self.widths[block], dtype=e.dtype)
            out[block] = e / e.sum(1, keepdim=True).clamp_min(1e-300)
        return out

    def mean_shares(self, per_channel: bool = False) -> dict[str, Tensor]:
        """block -> 4 shares: the mean over images of each image's shares (sums to 1)."""
        return {b: s.mean(0) for b, s in self.shares(per_channel).items()}

    def cat(self, other: BranchUsage) -> BranchUsage:
        if not self.energy:
            return other
        energy = {b: torch.cat([e, other.energy[b]]) for b, e in self.energy.items()}
        outputs = None
        if self.outputs is not None and other.outputs is not None:
            outputs = torch.cat([self.outputs, other.outputs])
        return BranchUsage(energy, self.widths, self.sources + other.sources, outputs)

    def to_json(self, images: Sequence[int] | None = None) -> dict[str, Any]:
        """{"images": {source: {block: {"1x1": s, ...}}}, "mean": {block: {...}},
        "per_channel": {"images": ..., "mean": ...}, "widths": ..., "n": N}; `images`
        picks which rows are listed per image (default all)."""
        rows = range(len(self)) if images is None else images

        def section(per_channel: bool) -> dict[str, Any]:
            sh = self.shares(per_channel)
            mean = self.mean_shares(per_channel)
            return {
                "images": {self.sources[i]: {b: _named(s[i]) for b, s in sh.items()} for i in rows},
                "mean": {b: _named(m) for b, m in mean.items()},
            }

        return {
            **section(False),
            "per_channel": section(True),
            "widths": {b: dict(zip(BRANCHES, w, strict=True)) for b, w in self.widths.items()},
            "n": len(self),
        }


def _named(row: Tensor) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in zip(BRANCHES, row, strict=True)}


@torch.no_grad()
def branch_energy(model: nn.Module, x: Tensor, sources: Sequence[str] | None = None) -> BranchUsage:
    """Branch energies of one normalised N x 3 x S x S batch through an eval-mode model."""
    energy: dict[str, Tensor] = {}
    widths: dict[str, list[int]] = {}
    n = x.shape[0]

    def record(block: str, i: int, out: Tensor) -> None:
        e = energy.setdefault(block, torch.zeros(n, len(BRANCHES), dtype=torch.float64))
        e[:, i] = out.double().pow(2).sum((1, 2, 3)).cpu()
        widths.setdefault(block, [0] * len(BRANCHES))[i] = out.shape[1]

    with _branch_hooks(model, record):
        out = model(x)
    names = list(sources) if sources is not None else [str(i) for i in range(n)]
    logits = out.detach().float().cpu() if isinstance(out, Tensor) else None
    return BranchUsage(energy, {b: tuple(w) for b, w in widths.items()}, names, logits)


# --- ablation ---------------------------------------------------------------------------------


@torch.no_grad()
def ablate(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], progress: bool = False
) -> dict[str, Any]:
    """Top-1 accuracy (%) with each branch of each block zeroed in turn, on normalised
    (x, labels) batches: {"baseline": acc, "n": N, "accuracy": {block: {branch: acc}},
    "drop": {block: {branch: baseline - acc}}}."""
    zero: tuple[str, int] | None = None

    def knock_out(block: str, i: int, out: Tensor) -> Tensor | None:
        return torch.zeros_like(out) if (block, i) == zero else None

    def accuracy() -> float:
        correct = total = 0
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
        return 100.0 * correct / max(total, 1)

    n = sum(len(y) for _, y in batches)
    if n == 0:
        raise UserError("ablation needs at least one labelled image (--data)")
    blocks = list(inception_blocks(model))
    from tqdm import tqdm

    bar = tqdm(total=len(blocks) * 4 + 1, desc="ablate", disable=not progress, leave=False)
    with _branch_hooks(model, knock_out):
        base = accuracy()
        bar.update()
        acc: dict[str, dict[str, float]] = {}
        for block in blocks:
            for i, branch in enumerate(BRANCHES):
                zero = (block, i)
                acc.setdefault(block, {})[branch] = accuracy()
                bar.update()
        zero = None
    bar.close()
    drop = {b: {k: round(base - v, 4) for k, v in row.items()} for b, row in acc.items()}
    return {"baseline": base, "n": n, "accuracy": acc, "drop": drop}
