"""Does an inception block use its larger filters when objects are larger? Branch usage of the
same CIFAR-10 training-split images shown zoomed out and in (the tutorial's claim: each block
picks the filter size that suits the object's scale). The test split is kept for reporting
final accuracy, so the images are the run's held-out training images when it validated on a
holdout (never trained on), else a seeded stratified sample of the training split.

Zoom z > 1: the central (S/z) x (S/z) crop is resized up to S x S (objects larger);
zoom z < 1: the whole image is resized down to zS x zS and centred on a mean-grey canvas
(objects smaller). Prints top-1 and the mean energy share (and per-channel share) of each
branch per block and zoom, as a markdown table.

usage: PYTHONPATH=src python bench/branch_scale.py CKPT DATA_ROOT [--n 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from googlenet.data import load_cifar, stratified_indices
from googlenet.data.build import recorded_val_set
from googlenet.infer.inference import load
from googlenet.insight import BRANCHES, BranchUsage, branch_energy

ZOOMS = (0.5, 0.75, 1.0, 1.5, 2.0)


def zoom(images: torch.Tensor, z: float) -> torch.Tensor:
    """0..1 float N x 3 x S x S -> the same images zoomed by z, still S x S (mean-grey pad)."""
    s = images.shape[-1]
    if z == 1.0:
        return images
    if z > 1:
        c = round(s / z)
        top = (s - c) // 2
        crop = images[..., top : top + c, top : top + c]
        return F.interpolate(crop, size=(s, s), mode="bilinear", antialias=True)
    small = F.interpolate(images, size=(round(s * z),) * 2, mode="bilinear", antialias=True)
    out = images.mean((0, 2, 3), keepdim=True).expand_as(images).clone()
    top = (s - small.shape[-1]) // 2
    out[..., top : top + small.shape[-1], top : top + small.shape[-1]] = small
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    predictor = load(args.checkpoint)
    pp, model = predictor.preprocess, predictor.model.eval()
    meta = predictor.meta
    held = meta.validation is not None and meta.validation.data.get("dataset") == "holdout"
    ds = recorded_val_set(meta, meta.config, args.data) if held else None
    source = "held-out training images (not trained on)"
    if ds is None:
        ds, source = load_cifar(args.data, "cifar10", "train"), "training images (trained on)"
    ds = ds.subset(stratified_indices(ds.labels, args.n, 0))
    images, labels = ds.images.float() / 255, ds.labels
    result: dict[str, dict] = {}
    for z in ZOOMS:
        x = pp.normalize(zoom(images, z))  # 0..1 floats, used as they are
        usage = BranchUsage({}, {})
        correct = 0
        for i in range(0, len(x), 100):
            part = branch_energy(model, x[i : i + 100])
            assert part.outputs is not None
            correct += int((part.outputs.argmax(1) == labels[i : i + 100]).sum())
            usage = usage.cat(part)
        result[str(z)] = {
            "top1": 100 * correct / len(x),
            "mean": {b: s.tolist() for b, s in usage.mean_shares().items()},
            "per_channel": {b: s.tolist() for b, s in usage.mean_shares(True).items()},
        }
    blocks = list(result["1.0"]["mean"])
    print(f"{len(ds)} CIFAR-10 {source}; top-1 per zoom: ", end="")
    print(", ".join(f"x{z}: {result[str(z)]['top1']:.1f}%" for z in ZOOMS))
    for key, what in (("mean", "energy share"), ("per_channel", "per-channel share")):
        print(f"\n{what} (%) of 1x1 / 3x3 / 5x5 / pool, per zoom\n")
        print("| block | " + " | ".join(f"x{z}" for z in ZOOMS) + " |")
        print("|---|" + "---|" * len(ZOOMS))
        for b in blocks:
            cells = [" / ".join(f"{100 * v:.0f}" for v in result[str(z)][key][b]) for z in ZOOMS]
            print(f"| {b.replace('inception', '')} | " + " | ".join(cells) + " |")
    five = BRANCHES.index("5x5")
    print("\n5x5 energy share, mean over blocks: ", end="")
    print(
        ", ".join(
            f"x{z}: {100 * sum(result[str(z)]['mean'][b][five] for b in blocks) / len(blocks):.1f}%"
            for z in ZOOMS
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
