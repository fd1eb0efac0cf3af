"""Images/s per CPU core for decoding and preparing a batch of ImageNet-size photos, and the
CPU cores per GPU that this pipeline needs at a stated GPU training throughput.

    PYTHONPATH=src python bench/bench_decode.py [--images 200] [--sizes full,400,320]
        [--work-size 256] [--input-size 224] [--gpu-img-s 2500] [--procs N]

Synthetic photos: 500x375 (ImageNet's typical size) JPEG quality 90, textured with noise at
several scales so they compress like photos (the mean file size is printed; ILSVRC-2012 train
averages ~110 KB). "Bounded" copies are what `googlenet shards --max-side N` stores: the same
photos re-encoded at quality 90 with the longer side N. Files are read from a temporary folder
(page cache warm), so disk and network are not measured.

Per image, on one core (torch and the decoder single-threaded):
  decode   Pillow decodes the file to RGB (the JPEG's full size; draft mode only helps when the
           photo is at least twice the working size)
  load     the project's loader step for one file: decode + resize (shorter side) + centre crop
           to --work-size (the function the folder and shard data sets call)
  batch    the batch transform on those uint8 images: the paper's augmentation (scale/aspect
           crop, flip, photometric) resized to --input-size and normalised
Then the same load step on --procs processes at once (default: all cores) for the scaling, and
on as many threads in one process (Pillow releases the GIL while decoding and resizing).
Every rate is given per wall second and [per CPU second]: the CPU-time rate is what one core
delivers even when other jobs share the machine (the wall rate then shrinks, CPU time does not).
cores/GPU = GPU img/s / (load img/s per CPU second), rounded up: on a GPU the training loader
moves the uint8 batch to the GPU first and runs the batch step there. The figure with the batch
step on the CPU as well is printed beside it.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from googlenet.data.augment import Augment
from googlenet.data.loader import BatchLoader
from googlenet.transforms import IMAGENET_MEAN, IMAGENET_STD, read_image_resized


def synthetic_photo(rng: np.random.Generator, w: int = 500, h: int = 375) -> Image.Image:
    """A photo-like RGB image: smooth colour fields plus detail at several scales."""
    acc = np.zeros((h, w, 3), np.float32)
    for cell, amp in ((64, 90.0), (16, 40.0), (4, 22.0), (1, 10.0)):
        small = rng.standard_normal((h // cell + 2, w // cell + 2, 3)).astype(np.float32)
        im = Image.fromarray(np.uint8(np.clip(small * 40 + 128, 0, 255)))
        big = np.asarray(im.resize((w + 2 * cell, h + 2 * cell), Image.Resampling.BICUBIC))
        acc += (big[cell : cell + h, cell : cell + w].astype(np.float32) - 128) * amp / 40
    return Image.fromarray(np.uint8(np.clip(acc + 128, 0, 255)))


def encode(im: Image.Image, max_side: int | None) -> bytes:
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decode(path: Path) -> None:
    with Image.open(path) as im:
        im.convert("RGB").load()


def _load_all(args: tuple[list[Path], int]) -> tuple[int, float]:
    """Load every file; (count, CPU seconds this thread spent on it)."""
    files, size = args
    torch.set_num_threads(1)
    c = time.thread_time()
    for f in files:
        read_image_resized(f, size)
    return len(files), time.thread_time() - c


def rate(fn, items: list, repeat: int = 2) -> tuple[float, float]:
    """(items per wall second, items per CPU second of this process) of fn over all items,
    best of `repeat` passes. CPU time is what a core costs even when other jobs share it."""
    wall = cpu = math.inf
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        for it in items:
            fn(it)
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return len(items) / wall, len(items) / cpu


def parallel_rate(
    files: list[Path], size: int, procs: int, threads: bool = False
) -> tuple[float, float]:
    """(images per wall second, per CPU second) of the load step over `procs` processes or
    threads, each taking a share of the files (CPU time as each worker thread counts it)."""
    work = files * max(1, (procs * 40) // len(files) + 1)
    chunks = [(work[i::procs], size) for i in range(procs)]
    executor = ThreadPoolExecutor if threads else ProcessPoolExecutor
    with executor(procs) as pool:
        list(pool.map(_load_all, [(files[:2], size)] * procs))  # start and import everywhere
        t = time.perf_counter()
        done = list(pool.map(_load_all, chunks))
        wall = time.perf_counter() - t
    n = sum(k for k, _ in done)
    return n / wall, n / sum(c for _, c in done)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="distinct synthetic photos")
    p.add_argument("--sizes", default="full,400,320", help="stored longer side: full or N")
    p.add_argument("--work-size", type=int, default=256, help="side the loader decodes to")
    p.add_argument("--input-size", type=int, default=224, help="model input side")
    p.add_argument("--batch-size", type=int, default=64, help="images per transformed batch")
    p.add_argument("--gpu-img-s", type=float, default=2500.0, help="GPU training img/s assumed")
    p.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="parallel processes")
    args = p.parse_args()
    torch.set_num_threads(1)
    cores = os.cpu_count()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {cores} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"Pillow {Image.__version__}, load average {os.getloadavg()[0]:.2f}"
    )
    rng = np.random.default_rng(0)
    photos = [synthetic_photo(rng) for _ in range(args.images)]
    loader = BatchLoader(
        [],  # only .transform is used
        args.batch_size,
        input_size=args.input_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=Augment(flip=True, scale_aspect=True, photometric=True),
    )
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (args.batch_size, 3, args.work_size, args.work_size),
                          dtype=torch.uint8, generator=g)  # fmt: skip
    loader.transform(batch, g)  # warm-up
    batch_wall, batch_cpu = (
        r * args.batch_size for r in rate(lambda b: loader.transform(b, g), [batch] * 8)
    )
    print(
        f"rates in images/s: per wall second, [per CPU second]; batch step: "
        f"{batch_wall:.0f} [{batch_cpu:.0f}] img/s on one core (scale_aspect+flip+photometric "
        f"{args.work_size} -> {args.input_size}, batch {args.batch_size})"
    )
    print(
        "stored     KB  decode        load (1 core)  "
        f"{args.procs} procs load      {args.procs} threads load    "
        f"cores/GPU at {args.gpu_img_s:.0f} img/s (batch step on the CPU too)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.sizes.split(","):
            max_side = None if spec == "full" else int(spec)
            files = []
            total_bytes = 0
            for i, im in enumerate(photos):
                data = encode(im, max_side)
                total_bytes += len(data)
                f = Path(tmp) / f"{spec}-{i}.jpg"
                f.write_bytes(data)
                files.append(f)
            with Image.open(files[0]) as im0:
                dims = f"{im0.width}x{im0.height}"
            dec = rate(_decode, files)
            load = rate(lambda f: read_image_resized(f, args.work_size), files)
            par = parallel_rate(files, args.work_size, args.procs)
            thr = parallel_rate(files, args.work_size, args.procs, threads=True)
            per_core = load[1]  # CPU-time rate: unaffected by other jobs' share of the cores
            need_gpu = math.ceil(args.gpu_img_s / per_core)
            need_cpu = math.ceil(args.gpu_img_s * (1 / per_core + 1 / batch_cpu))
            print(
                f"{dims:>9} {total_bytes / len(files) / 1000:4.0f} "
                f"{dec[0]:5.0f} [{dec[1]:4.0f}]  {load[0]:5.0f} [{load[1]:4.0f}]  "
                f"{par[0]:7.0f} [{par[1]:4.0f}]  {thr[0]:7.0f} [{thr[1]:4.0f}]    "
                f"{need_gpu} ({need_cpu})",
                flush=True,
            )


if __name__ == "__main__":
    main()
