"""The pool branches' 3x3/1 max-pool: ATen against the C kernel (googlenet.fastpool), forward
and forward + backward, on bf16 channels-last batches of the shapes the `cifar` variant's
inception blocks see at batch 256. Prints a markdown table of median milliseconds.

    python bench/bench_pool.py [--batch 256] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from googlenet.fastpool import MaxPool3, library

# (channels, side) entering the pool branches of the `cifar` variant (3a..5b)
SHAPES = [
    (192, 16),
    (256, 16),
    (480, 8),
    (512, 8),
    (512, 8),
    (512, 8),
    (528, 8),
    (832, 4),
    (832, 4),
]


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def aten(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 1, 1)


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
    fast = MaxPool3()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| shape | ATen fwd | C fwd | ATen fwd+bwd | C fwd+bwd |")
    print("|---|---:|---:|---:|---:|")
    totals = [0.0] * 4
    for c, s in SHAPES:
        x = torch.randn(args.batch, c, s, s).to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        xg = x.clone().requires_grad_()
        with torch.no_grad():
            row = [median_ms(lambda x=x: aten(x), args.reps),
                   median_ms(lambda x=x: fast(x), args.reps)]  # fmt: skip
        row += [median_ms(lambda xg=xg, g=g: step(aten, xg, g), args.reps),
                median_ms(lambda xg=xg, g=g: step(fast, xg, g), args.reps)]  # fmt: skip
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        print(f"| {args.batch}x{c}x{s}x{s} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    print("| **all nine** | " + " | ".join(f"**{v:.1f}**" for v in totals) + " |")


if __name__ == "__main__":
    main()
