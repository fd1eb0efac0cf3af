"""On a GPU machine: `bn` training throughput at 224 (bf16) from memory, then end to end from
an image folder and from shards (full size and --max-side 320) of synthetic ImageNet-size
photos (500x375 JPEG q90, bench_decode.py's generator), decoded by the loader's worker
processes. Shows whether decoding keeps up with the GPU.

usage: PYTHONPATH=src python3 bench/gpu_scale.py [--images 11000] [--work /tmp/scale]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import encode, synthetic_photo
from googlenet.data import ArrayDataset
from googlenet.data.shards import write_shards
from googlenet.training.config import resolve_config
from googlenet.training.loop import train

CLASSES = 10
BASE = ["variant=bn", "input_size=224", "batch_size=256", "epochs=2", "ema=false",
        "precision=bf16", "channels_last=true", "lr=0.05", "schedule=constant",
        "scale_aspect=true", "flip=true", "crop_padding=0"]  # fmt: skip


def _write(args: tuple[Path, int]) -> None:
    path, seed = args
    path.write_bytes(encode(synthetic_photo(np.random.default_rng(seed)), None))


def make_folder(root: Path, n: int) -> None:
    jobs = []
    for i in range(n):
        split = "val" if i % 10 == 0 else "train"
        d = root / split / f"c{i // 10 % CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"{i:06d}.jpg", i))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=64))


def run(name: str, overrides: list[str], **kw) -> None:
    t = time.perf_counter()
    cfg = resolve_config(overrides=[*BASE, *overrides, f"out=/tmp/scale-runs/{name}"])
    result = train(cfg, progress=False, **kw)
    rates = ", ".join(f"{r['images_per_s']:.0f}" for r in result.history)
    print(f"{name}: train img/s per epoch {rates}; {time.perf_counter() - t:.1f} s in all",
          flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=11000)
    p.add_argument("--work", default="/tmp/scale")
    p.add_argument("--memory-images", type=int, default=12800, help="for the in-memory run")
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    BASE.append(f"batch_size={args.batch_size}")
    work = Path(args.work)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print("torch", torch.__version__, gpu, os.cpu_count(), "cores", flush=True)
    g = torch.Generator().manual_seed(0)
    n = args.memory_images
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    classes = [str(i) for i in range(CLASSES)]
    if n:
        run("memory", [], train_set=ArrayDataset(images, labels, classes),
            val_set=ArrayDataset(images[:512], labels[:512], classes))  # fmt: skip
    t = time.perf_counter()
    make_folder(work / "folder", args.images)
    print(f"photos: {args.images} in {time.perf_counter() - t:.1f} s", flush=True)
    for side in (None, 320):
        t = time.perf_counter()
        rep = write_shards(work / "folder", work / f"shards-{side or 'full'}", max_side=side)
        mb = rep.splits["train"].bytes / 1e6
        print(f"shards max_side={side}: {time.perf_counter() - t:.1f} s, train {mb:.0f} MB, "
              f"{len(rep.splits['train'].shards)} shards", flush=True)  # fmt: skip
    run("folder", ["dataset=folder"], data_root=work / "folder")
    run("shards-full", ["dataset=shards"], data_root=str(work / "shards-full"))
    run("shards-320", ["dataset=shards"], data_root=str(work / "shards-320"))


if __name__ == "__main__":
    main()
