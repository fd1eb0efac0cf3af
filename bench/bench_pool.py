"""GoogLeNet's 3x3 max-pools: ATen against the C kernel (googlenet.fastpool), forward and
forward + backward, on bf16 channels-last batches of the shapes the `cifar` variant's pools see
at 32x32 (the inception pool branches' 3x3/1 and the stage pools' 3x3/2, padding 1). Prints a
markdown table of median milliseconds.

    python bench/bench_pool.py [--batch 256] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from googlenet.fastpool import MaxPool3, library
from googlenet.model import build


def pool_shapes(side: int = 32) -> list[tuple[int, int, int]]:
    """(channels, side, stride) entering each 3x3 max-pool of the `cifar` variant at `side`,
    branch pools (stride 1) first: read off a forward pass, not written out by hand."""
    model = build("cifar", num_classes=10).eval()
    seen: list[tuple[int, int, int]] = []

    def record(m: nn.Module, inputs: tuple[torch.Tensor]) -> None:
        seen.append((inputs[0].shape[1], inputs[0].shape[2], m.stride))  # the model's: ints

    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d) and m.kernel_size == 3]
    hooks = [m.register_forward_pre_hook(record) for m in pools]
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for h in hooks:
        h.remove()
    return sorted(seen, key=lambda t: t[2])  # stable: network order within a stride


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def step(pool, x: torch.Tensor, g: torch.Tensor) -> None:
    x.grad = None
    pool(x).backward(g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if library() is None:
        raise SystemExit("no C compiler: the kernel could not be built")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| shape | stride | ATen fwd | C fwd | ATen fwd+bwd | C fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = {1: [0.0] * 4, 2: [0.0] * 4}
    for c, s, stride in pool_shapes():
        fast = MaxPool3(stride, 1)

        def aten(x: torch.Tensor, stride: int = stride) -> torch.Tensor:
            return F.max_pool2d(x, 3, stride, 1)

        x = torch.randn(args.batch, c, s, s).to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(aten(x))
        xg = x.clone().requires_grad_()
        with torch.no_grad():
            row = [median_ms(lambda x=x: aten(x), args.reps),
                   median_ms(lambda x=x, f=fast: f(x), args.reps)]  # fmt: skip
        row += [median_ms(lambda xg=xg, g=g: step(aten, xg, g), args.reps),
                median_ms(lambda xg=xg, g=g, f=fast: step(f, xg, g), args.reps)]  # fmt: skip
        totals[stride] = [a + b for a, b in zip(totals[stride], row, strict=True)]
        cells = " | ".join(f"{v:.1f}" for v in row)
        print(f"| {args.batch}x{c}x{s}x{s} | {stride} | {cells} |")
    for stride, name in ((1, "the nine branch pools"), (2, "the three stage pools")):
        cells = " | ".join(f"**{v:.1f}**" for v in totals[stride])
        print(f"| **{name}** | {stride} | {cells} |")


if __name__ == "__main__":
    main()
