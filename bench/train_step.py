"""Training-step speed on this machine: the engine's images/s and the model's GFLOP/s against the
bf16 matmul peak measured in the same run, next to a naive fp32 NCHW eager loop of the same
network, for the `cifar` variant at 32 and `bn` / `article` at 224. Prints a markdown table.

    python bench/train_step.py [--variants cifar,bn,article] [--steps 12] [--batch 0]

"engine": googlenet.training.loop.train() on synthetic in-memory data (the real loop: loader,
autocast, channels_last, aux losses, EMA/optimizer of the variant's recipe), images/s of its
second epoch.
"naive": model(x) + cross-entropy + SGD step in fp32 NCHW eager, no aux loss.
GFLOP/s counts 3x the forward multiply-adds x 2 (backward ~ 2x forward), per image.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from googlenet.data import ArrayDataset
from googlenet.errors import UserError
from googlenet.model import build, get_spec
from googlenet.summary import count_macs
from googlenet.training.config import resolve_config
from googlenet.training.loop import train

RECIPE = {"cifar": "cifar10-fast", "bn": "finetune", "article": "article"}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10, trials: int = 5) -> float:
    """GFLOP/s of the best of `trials` timings of `reps` matmuls (one timing varied by up to
    1.5x between runs here)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best / 1e9


def engine_ips(variant: str, size: int, batch: int, steps: int) -> float:
    n = batch * steps
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    data = ArrayDataset(images, labels, [str(i) for i in range(10)])
    val = ArrayDataset(images[:batch], labels[:batch], data.classes)
    recipe = RECIPE[variant]
    try:
        resolve_config(recipe, None, [])
    except UserError:  # recipe not shipped: the default one with this variant
        recipe = None
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"variant='{variant}'", f"input_size={size}", f"batch_size={batch}", "epochs=2"]
        cfg = resolve_config(recipe, None, [*sets, f"out='{tmp}/run'"])
        res = train(cfg, train_set=data, val_set=val, progress=False)
    return res.history[-1]["images_per_s"]


def naive_ips(variant: str, size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build(variant, num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    t = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            t += time.perf_counter() - t0
    return batch * steps / t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="cifar,bn,article")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=0, help="0: 256 at 32x32, 64 at 224")
    a = p.parse_args()
    bf16, fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"threads {torch.get_num_threads()}, matmul 2048^3: bf16 {bf16:.0f} GFLOP/s, "
          f"fp32 {fp32:.0f} GFLOP/s\n")  # fmt: skip
    print("| variant | side | batch | fwd GFLOP/img | engine img/s | engine GFLOP/s | % of bf16 "
          "peak | naive fp32 img/s | speed-up |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    variants = a.variants.split(",")
    shapes = {v: (get_spec(v).input_size, a.batch or (256 if get_spec(v).input_size <= 64 else 64))
              for v in variants}  # fmt: skip
    # every naive run first: the engine's CPU runs keep freed memory in the process from then
    # on (devices.keep_freed_memory), which a naive loop would not have
    naive_all = {v: naive_ips(v, *shapes[v], max(2, a.steps // 3)) for v in variants}
    for v in variants:
        size, batch = shapes[v]
        gflop = 2 * count_macs(build(v, num_classes=10, aux_logits=False).eval(), (3, size, size))
        gflop /= 1e9
        eng, naive = engine_ips(v, size, batch, a.steps), naive_all[v]
        rate = eng * 3 * gflop
        cells = [v, size, batch, f"{gflop:.2f}", f"{eng:.1f}", f"{rate:.0f}",
                 f"{100 * rate / bf16:.0f}%", f"{naive:.1f}", f"{eng / naive:.1f}x"]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
