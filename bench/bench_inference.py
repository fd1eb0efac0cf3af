"""Inference speed per variant on this CPU: latency at batch 1 (median of N runs) and
throughput at batch 64, for eager fp32, bf16 autocast + channels_last, TorchScript (traced,
fp32) and ONNX Runtime (fp32). Prints a markdown table.

    python bench/bench_inference.py [--variants paper,article,bn,cifar] [--runs 10] [--iters 3]

Models are randomly initialised (speed does not depend on the weights), aux heads off (eval).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from googlenet.devices import make_runner
from googlenet.infer.export import onnx_bytes, onnx_runner, torchscript_bytes, torchscript_runner
from googlenet.model import build, get_spec

Runner = Callable[[torch.Tensor], torch.Tensor]


def timed(run: Runner, x: torch.Tensor, n: int) -> list[float]:
    run(x)  # warm-up (allocations, oneDNN primitive creation)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return times


def runners(variant: str, side: int, tmp: Path) -> dict[str, Runner]:
    torch.manual_seed(0)
    model = build(variant, aux_logits=False).eval()
    out: dict[str, Runner] = {
        "eager fp32": make_runner(model),
        "bf16 + channels_last": make_runner(
            build(variant, aux_logits=False).eval(), "cpu", torch.bfloat16, channels_last=True
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = tmp / f"{variant}.pt"
        ts.write_bytes(torchscript_bytes(model, side))
        ts_run = torchscript_runner(ts)
        out["TorchScript fp32"] = torch.inference_mode()(ts_run)
        onnx = tmp / f"{variant}.onnx"
        onnx.write_bytes(onnx_bytes(model, side))
        out["ONNX Runtime fp32"] = onnx_runner(onnx)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", default="paper,article,bn,cifar")
    ap.add_argument("--runs", type=int, default=10, help="batch-1 runs (median reported)")
    ap.add_argument("--iters", type=int, default=3, help="batch-64 runs (mean reported)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    print(
        f"| variant | input | backend | batch-1 latency ms (median of {args.runs}) "
        f"| batch-{args.batch} throughput img/s |"
    )
    print("|---|---:|---|---:|---:|")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for variant in args.variants.split(","):
            side = get_spec(variant).input_size
            x1 = torch.randn(1, 3, side, side)
            xb = torch.randn(args.batch, 3, side, side)
            backends = runners(variant, side, Path(d))
            for name, run in backends.items():
                lat = statistics.median(timed(run, x1, args.runs)) * 1000
                tput = args.batch / statistics.mean(timed(run, xb, args.iters))
                print(f"| {variant} | {side} | {name} | {lat:.1f} | {tput:.0f} |", flush=True)
            del backends, run  # free the ORT session before the next variant
            gc.collect()
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
