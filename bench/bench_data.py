"""Loader throughput (images/s) on the real CIFAR-10 train set, with training augmentation.

    .venv/bin/python bench/bench_data.py [--data DIR] [--batch-size 128] [--batches 40]

Prints one row per setting and the peak RSS of the process (resource.getrusage), which bounds
what the data layer holds at 224 x 224. The model trains ~160 img/s at 32 (cifar variant) and
~45 img/s at 224 (article variant) with bf16 on this machine; the loader should beat that 10x.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import torch

from googlenet.data import load_cifar
from googlenet.data.augment import Augment
from googlenet.data.loader import BatchLoader
from googlenet.transforms import CIFAR10_MEAN, CIFAR10_STD, Preprocess

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
# (name, input size, augmentation, model training img/s at that size for the 10x check)
SETTINGS = [
    ("crop+flip", 32, Augment(crop_padding=4, flip=True), 160.0),
    ("crop+flip+resize", 224, Augment(crop_padding=4, flip=True), 45.0),
    (
        "scale_aspect+flip+photometric",
        224,
        Augment(flip=True, scale_aspect=True, photometric=True),
        45.0,
    ),
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(loader: BatchLoader, batches: int, warmup: int = 2) -> float:
    """Images per second over `batches` batches (after `warmup`), consuming each batch."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            it = iter(loader)
            x, _ = next(it)
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        default=None,
        help="folder holding cifar-10-batches-bin "
        "(default: $GOOGLENET_DATA, else ../shared/datasets)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="emit channels_last batches")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data or os.environ.get("GOOGLENET_DATA") or DEFAULT_ROOT)
    t0 = time.perf_counter()
    train = load_cifar(root, "cifar10", "train")
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    print(
        f"CIFAR-10 train: {len(train)} images from {root} in {load_s:.1f}s, "
        f"{train.images.numel() / 2**20:.0f} MiB uint8; peak RSS {rss_loaded:.0f} MiB"
    )
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {args.batch_size}, {args.batches} batches per row"
    )
    print(f"{'augmentation':32s} {'size':>4s} {'img/s':>8s} {'ms/batch':>9s} {'x model':>8s}")
    for name, size, aug, model_rate in SETTINGS:
        loader = BatchLoader(
            train,
            args.batch_size,
            preprocess=Preprocess(size, CIFAR10_MEAN, CIFAR10_STD, size),
            augment=aug,
            shuffle=True,
            drop_last=True,
            channels_last=args.channels_last,
        )
        rate = measure(loader, args.batches)
        print(
            f"{name:32s} {size:4d} {rate:8.0f} {1000 * args.batch_size / rate:9.1f} "
            f"{rate / model_rate:7.1f}x"
        )
    print(
        f"peak RSS after all rows: {peak_rss_mb():.0f} MiB "
        f"(data set + loader at 224; {peak_rss_mb() - rss_loaded:+.0f} MiB over loading)"
    )


if __name__ == "__main__":
    main()
