"""Data-parallel training under torchrun: the rank/world description, joining the process
group torchrun describes in environment variables, and the two collectives the engine uses."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


def init_distributed(device_kind: str) -> tuple[Dist, bool]:
    """Join the process group torchrun describes in env vars; (dist, whether we created it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return d, False
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return d, True


def all_reduce(t: Tensor, d: Dist, op: str = "sum") -> Tensor:
    """In-place sum (or max) over ranks; a no-op on one process."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def broadcast_buffers(module: nn.Module, d: Dist) -> None:
    """BN running stats drift apart per rank; validate everywhere with rank 0's."""
    if d.enabled:
        for b in module.buffers():
            dist.broadcast(b, 0)


def gather_by_index(index: Tensor, columns: list[Tensor], d: Dist) -> tuple[Tensor, ...]:
    """Per-sample columns computed on every rank (rank r holds the samples `index`) -> all
    samples on every rank, sorted by index: (index, *columns)."""
    parts = [(index, *columns)]
    if d.enabled:
        gathered: list = [None] * d.world_size
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    index = torch.cat([p[0] for p in parts])
    order = index.argsort()
    return (
        index[order],
        *(torch.cat([p[i] for p in parts])[order] for i in range(1, len(parts[0]))),
    )
