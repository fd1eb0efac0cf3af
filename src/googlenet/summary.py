"""Keras-style model.summary(): layer, output shape, parameters; totals and forward FLOPs."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from googlenet.model import AUX_TAPS


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass
class Summary:
    rows: list[LayerRow]
    input_size: tuple[int, int, int]
    total_params: int
    trainable_params: int
    macs: int  # multiply-accumulates of conv and linear layers, eval-mode forward, one image

    @property
    def flops(self) -> int:
        return 2 * self.macs  # one multiply + one add per MAC

    def __str__(self) -> str:
        head = f"{'Layer (type)':<34}{'Output Shape':<24}{'Param #':>12}"
        lines = [head, "=" * len(head)]
        for r in self.rows:
            shape = "(None, " + ", ".join(str(s) for s in r.output_shape) + ")"
            lines.append(f"{(r.name + ' (' + r.kind + ')'):<34}{shape:<24}{r.params:>12,}")
        lines += [
            "=" * len(head),
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.total_params - self.trainable_params:,}",
            f"Input: 3 x {self.input_size[1]} x {self.input_size[2]}; forward (eval, aux off): "
            f"{self.macs / 1e9:.3f} GMACs = {self.flops / 1e9:.3f} GFLOPs per image",
        ]
        return "\n".join(lines)


def _leaf_macs(m: nn.Module, out: Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        k = m.weight[0].numel()  # cin/groups * kh * kw
        return out[0].numel() * k
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features
    return 0


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Conv + linear multiply-accumulates for one image, eval mode (aux heads do not run)."""
    total = 0

    def hook(m: nn.Module, _inp: object, out: Tensor) -> None:
        nonlocal total
        total += _leaf_macs(m, out)

    m = copy.deepcopy(model).eval()
    handles = [
        x.register_forward_hook(hook) for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        m(torch.zeros(1, *input_size))
    for h in handles:
        h.remove()
    return total


def summary(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> Summary:
    """One row per top-level layer (aux heads included, run in train mode on a copy)."""
    if input_size is None:
        side = model.spec.input_size  # type: ignore[union-attr]
        input_size = (3, side, side)
    rows: dict[str, LayerRow] = {}

    def make_hook(name: str):
        def hook(m: nn.Module, _inp: object, out: object) -> None:
            if isinstance(out, Tensor):
                params = sum(p.numel() for p in m.parameters())
                rows[name] = LayerRow(name, type(m).__name__, tuple(out.shape[1:]), params, 0)

        return hook

    m = copy.deepcopy(model).train()  # a copy, so BatchNorm statistics of `model` stay as they are
    handles = [c.register_forward_hook(make_hook(n)) for n, c in m.named_children()]
    with torch.no_grad():
        m(torch.zeros(2, *input_size))  # batch 2: BatchNorm in train mode needs > 1 value
    for h in handles:
        h.remove()
    order = [n for n, _ in m.named_children() if n in rows]
    # Show layers in forward order: aux heads after the block they branch from.
    fwd = [n for n in order if not n.startswith("aux")]
    for aux, after in AUX_TAPS.items():
        if aux in rows and after in fwd:
            fwd.insert(fwd.index(after) + 1, aux)
    return Summary(
        rows=[rows[n] for n in fwd],
        input_size=input_size,
        total_params=count_params(model),
        trainable_params=count_params(model, trainable_only=True),
        macs=count_macs(model, input_size),
    )
