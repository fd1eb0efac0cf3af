"""Fine-tuning evidence on real images: does `train --init` beat training from scratch?

    .venv/bin/python bench/finetune_evidence.py all --work /tmp/ft-evidence [--data DIR]
    (or the stages one by one: pretrain, folder, arms, report)

1. pretrain: the `cifar` variant (cifar10-fast recipe) on the first five CIFAR-10 classes
   (airplane, automobile, bird, cat, deer): their 25,000 training images, less 1,000 held out
   as that run's validation.
2. folder: the other five classes (dog, frog, horse, ship, truck) written as PNG files into
   WORK/folder/train (500 per class) and WORK/folder/val (200 per class), both from the CIFAR-10
   training split, and WORK/test5 (their 5,000 CIFAR-10 test images, for the final report only).
3. arms: training on the folder, all arms at the same time (same machine load), each with one
   thread, the same epochs, batch and data:
     scratch   cifar10-fast recipe (cifar variant at 32), lr scaled to the batch, from scratch
     init      the same settings, plus --init the pre-trained checkpoint
     finetune  the shipped finetune recipe with --init (variant, size, mean/std from it)
4. report: validation top-1 (WORK/folder/val) against minutes per arm, from metrics.jsonl, and
   each arm's final model on WORK/test5 (googlenet evaluate; reported, never used to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from googlenet.data import ArrayDataset, load_cifar
from googlenet.training.config import resolve_config
from googlenet.training.loop import train

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
PRETRAIN = (0, 1, 2, 3, 4)  # airplane, automobile, bird, cat, deer
TARGET = (5, 6, 7, 8, 9)  # dog, frog, horse, ship, truck


def pick(labels: torch.Tensor, classes: tuple[int, ...], per_class: int, skip: int, seed: int):
    """Indices of `per_class` images of each class after skipping `skip` (seeded order)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in classes:
        members = (labels == k).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=g)]
        out.append(members[skip : skip + per_class])
    return torch.cat(out)


def subset(data: ArrayDataset, idx: torch.Tensor, classes: tuple[int, ...]) -> ArrayDataset:
    remap = {k: i for i, k in enumerate(classes)}
    labels = torch.tensor([remap[int(y)] for y in data.labels[idx]])
    return ArrayDataset(data.images[idx], labels, [data.classes[k] for k in classes])


def stage_pretrain(args: argparse.Namespace) -> None:
    data = load_cifar(args.data, "cifar10", "train")
    held = pick(data.labels, PRETRAIN, 200, 0, seed=1)  # 1,000 held out for validation
    rest = pick(data.labels, PRETRAIN, args.pretrain_per_class, 200, seed=1)
    cfg = resolve_config(
        overrides=[
            f"out={args.work / 'pretrain'}",
            f"epochs={args.pretrain_epochs}",
            f"workers={args.workers}",
            "warmup_min_steps=0",
            *args.pretrain_set,
        ]
    )
    t0 = time.time()
    result = train(
        cfg, train_set=subset(data, rest, PRETRAIN), val_set=subset(data, held, PRETRAIN)
    )
    print(f"pretrain: {len(rest)} images, {cfg.epochs} epochs, {time.time() - t0:.0f} s, "
          f"held-out top-1 {result.best_acc:.2f}%", flush=True)  # fmt: skip


def write_pngs(data: ArrayDataset, idx: torch.Tensor, folder: Path) -> None:
    for i in idx.tolist():
        cls = data.classes[int(data.labels[i])]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        image = data.images[i].permute(1, 2, 0).numpy()
        Image.fromarray(image).save(folder / cls / f"{i:05d}.png")


def stage_folder(args: argparse.Namespace) -> None:
    out = args.work / "folder"
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    data = load_cifar(args.data, "cifar10", "train")
    write_pngs(data, pick(data.labels, TARGET, args.per_class, 0, seed=2), out / "train")
    val = pick(data.labels, TARGET, args.val_per_class, args.per_class, seed=2)
    write_pngs(data, val, out / "val")
    test = load_cifar(args.data, "cifar10", "test")
    write_pngs(test, pick(test.labels, TARGET, args.test_per_class, 0, seed=0), args.work / "test5")
    print(f"folder: {out} ({5 * args.per_class} train, {len(val)} val), {args.work / 'test5'}")


def arm_configs(args: argparse.Namespace) -> dict[str, tuple[str, list[str]]]:
    """(recipe, --set overrides) per arm, as `googlenet train --recipe R --set ...` takes them."""
    init = f"init={str(args.work / 'pretrain' / 'last.safetensors')!r}"
    # warmup_min_steps=0: the schedule as measured (docs/results.md), before that key existed
    common = [f"epochs={args.epochs}", "batch_size=64", f"workers={args.workers}"]
    common.append("warmup_min_steps=0")
    scratch = ["dataset=folder", "lr=0.1"]  # cifar10-fast's lr 0.4 is for batch 256
    return {
        "scratch": ("cifar10-fast", [*scratch, *common]),
        "init": ("cifar10-fast", [*scratch, init, *common]),
        "finetune": ("finetune", [init, *common]),
    }


def stage_arm(args: argparse.Namespace) -> None:
    """One arm, in this process. The folder is read by load_image_folder at the 32-pixel input
    size (whole images, as issue 10 makes `train --data` do); the config is the one
    `googlenet train --recipe R --set ...` resolves."""
    from googlenet.data import load_image_folder

    recipe, overrides = arm_configs(args)[args.arm]
    cfg = resolve_config(recipe, overrides=[*overrides, f"out={args.work / args.arm}"])
    folder = args.work / "folder"
    sets = [load_image_folder(folder / s, size=32, in_memory=True) for s in ("train", "val")]
    train(cfg, train_set=sets[0], val_set=sets[1], progress=False)


def stage_arms(args: argparse.Namespace) -> None:
    """Every arm at the same time, so that they share the machine's load alike."""
    exe = [sys.executable, __file__, "arm", "--work", str(args.work), "--data", str(args.data)]
    exe += ["--epochs", str(args.epochs), "--workers", str(args.workers)]
    procs = {}
    for name in arm_configs(args):
        full = [*exe, "--arm", name]
        log = open(args.work / f"{name}.log", "w")  # noqa: SIM115 (closed when the run ends)
        log.write(" ".join(full) + "\n")
        log.flush()
        procs[name] = (subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT), log)
        print(f"started {name}: {' '.join(full)}", flush=True)
    for name, (proc, log) in procs.items():
        rc = proc.wait()
        log.close()
        print(f"{name}: exit {rc}", flush=True)


def stage_report(args: argparse.Namespace) -> None:
    rows = {}
    for name in arm_configs(args):
        path = args.work / name / "metrics.jsonl"
        rows[name] = [json.loads(line) for line in path.read_text().splitlines()]
    print("| epoch | " + " | ".join(f"{n}: min, val top-1" for n in rows) + " |")
    print("|---:|" + "---:|" * len(rows))
    for e in range(max(len(r) for r in rows.values())):
        cells = []
        for r in rows.values():
            cells.append(
                f"{r[e]['elapsed_s'] / 60:.1f}, {r[e]['val_acc']:.1f}%" if e < len(r) else ""
            )
        print(f"| {e + 1} | " + " | ".join(cells) + " |")
    for name in rows:
        cmd = [sys.executable, "-m", "googlenet", "evaluate", str(args.work / name)]
        cmd += ["--data", str(args.work / "test5"), "--out", str(args.work / f"{name}-test5")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        top1 = next(line for line in out.splitlines() if "top-1" in line)
        print(f"{name} on CIFAR-10 test images of its classes: {top1.strip()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["pretrain", "folder", "arms", "arm", "report", "all"])
    p.add_argument("--arm", default="scratch", help="for stage arm: which one")
    p.add_argument("--work", type=Path, default=Path("/tmp/ft-evidence"), help="work folder")
    p.add_argument(
        "--data", type=Path, default=Path(os.environ.get("GOOGLENET_DATA", DEFAULT_ROOT))
    )
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--pretrain-per-class", type=int, default=4800, help="at most 4800")
    p.add_argument("--pretrain-set", action="append", default=[], help="KEY=VALUE override")
    p.add_argument("--workers", type=int, default=1, help="torch threads per training process")
    p.add_argument("--per-class", type=int, default=500, help="folder training images per class")
    p.add_argument("--val-per-class", type=int, default=200, help="folder validation images")
    p.add_argument("--test-per-class", type=int, default=1000, help="CIFAR-10 test images")
    p.add_argument("--epochs", type=int, default=6, help="epochs of every arm on the folder")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    stages = ["pretrain", "folder", "arms", "report"] if args.stage == "all" else [args.stage]
    for stage in stages:
        globals()[f"stage_{stage}"](args)


if __name__ == "__main__":
    main()
