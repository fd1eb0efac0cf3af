"""Cost of the checkpoint SHA-256 on full-size training checkpoints: the time to hash the
tensor data against the time to save and to load the whole checkpoint. Prints a markdown table.

    python bench/bench_checkpoint.py [--dir /tmp] [--runs 3]

Checkpoints hold what a training run's last.safetensors holds: model + EMA + SGD momentum
(cifar10-fast: the `cifar` variant, 10 classes, aux heads; paper recipe: `paper`, 1000 classes).
--dir chooses the file system (a disk, or /dev/shm to leave the disk out).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from googlenet.checkpoint import load_checkpoint, save_checkpoint
from googlenet.model import build


def groups_for(variant: str, num_classes: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build(variant, num_classes=num_classes, aux_logits=True)
    sd = model.state_dict()
    params = enumerate(model.parameters())
    momentum = {f"{i}.momentum_buffer": p.detach().clone() for i, p in params}
    return {"model": sd, "ema": {k: v.clone() for k, v in sd.items()}, "optim": momentum}


def median_time(fn, runs: int, *args) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="folder for the checkpoint files")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, files in {args.dir or tempfile.gettempdir()}")
    print("| checkpoint | size (MB) | save (s) | load (s) | SHA-256 of the data (s) "
          "| share of save | share of load |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for label, variant, classes in (("cifar10-fast (cifar, 10)", "cifar", 10),
                                        ("paper (paper, 1000)", "paper", 1000)):  # fmt: skip
            groups = groups_for(variant, classes)
            path = Path(tmp) / "last.safetensors"
            meta = {"model": {"variant": variant, "num_classes": classes}, "epoch": 1}
            save = median_time(save_checkpoint, args.runs, path, groups, meta)
            load = median_time(load_checkpoint, args.runs, path)
            raw = path.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            data = memoryview(raw)[8 + n :]
            sha = median_time(hashlib.sha256, args.runs, data)
            print(f"| {label} | {len(raw) / 1e6:.1f} | {save:.3f} | {load:.3f} | {sha:.3f} |"
                  f" {sha / save:.0%} | {sha / load:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
