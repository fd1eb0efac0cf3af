"""Rank recipe ideas by accuracy on a held-out slice of the CIFAR-10 training set (never the
test set): a baseline recipe, each option alone, then the options that helped combined, at a
few epoch budgets. Prints a markdown table; every run's row is appended to --log as JSON.

    python bench/ablate.py --data ../shared/datasets [--recipe cifar10-fast] [--holdout 5000]
        [--epochs 1] [--combine-epochs 1,2,4] [--only name,name] [--skip-baseline]

Accuracy per epoch budget does not depend on the machine's speed (a GPU ranks ideas in
seconds); minutes on the 2-core CPU follow from its images/s (bench/train_step.py).
"""

from __future__ import annotations

import argparse
import json
import time

from googlenet.data import load_cifar, resolve_data_root
from googlenet.training.config import resolve_config
from googlenet.training.loop import train

# Each idea: a name and its --set overrides on top of the recipe.
IDEAS: dict[str, list[str]] = {
    "label_smoothing=0.2": ["label_smoothing=0.2"],
    "alternate_flip": ["alternate_flip=true"],
    "whiten_init": ["whiten_init=true"],
    "norm_bias_lr_scale=8": ["norm_bias_lr_scale=8.0"],
    "freeze_bn_scale": ["freeze_bn_scale=true"],
    "lookahead_every=5": ["lookahead_every=5"],
    "lookahead_every=5+bn_momentum=0.4": ["lookahead_every=5", "bn_momentum=0.4"],
    "bn_momentum=0.4": ["bn_momentum=0.4"],
    "no aux heads": ["aux_logits=false"],
    "no ema": ["ema=false"],
    "lr=0.8": ["lr=0.8"],
    "batch=512,lr=0.8": ["batch_size=512", "lr=0.8"],
    "batch=128": ["batch_size=128"],
    "batch=128,lr=0.2": ["batch_size=128", "lr=0.2"],
    "batch=128+warmup=0.1": ["batch_size=128", "warmup=0.1"],
    "batch=128+lr=0.6": ["batch_size=128", "lr=0.6"],
    "warmup=0.1": ["warmup=0.1"],
    "batch=64": ["batch_size=64"],
    "batch=64+lr=0.2": ["batch_size=64", "lr=0.2"],
    "24px crops all run": ["train_crop=0.75", "train_crop_until=1.0"],
    "20px crops all run": ["train_crop=0.625", "train_crop_until=1.0"],
    "b128+24px to 62.5%": ["batch_size=128", "train_crop=0.75", "train_crop_until=0.625"],
    "b128+24px to 50%": ["batch_size=128", "train_crop=0.75", "train_crop_until=0.5"],
    "b128+20px to 62.5%": ["batch_size=128", "train_crop=0.625", "train_crop_until=0.625"],
    "24px to 64.7%": ["train_crop_until=0.647"],
    "lr=0.3": ["lr=0.3"],
    "lr=0.25": ["lr=0.25"],
    "lr=0.2": ["lr=0.2"],
    "ema_decay=0.98": ["ema_decay=0.98"],
    "ema_decay=0.995": ["ema_decay=0.995"],
    "label_smoothing=0.1": ["label_smoothing=0.1"],
    "no lookahead": ["lookahead_every=0"],
    "weight_decay=1e-3": ["weight_decay=1e-3"],
    "recipe as is": [],
    "no lookahead or ema": ["lookahead_every=0", "ema=false"],
    "24 then 28 px stages": ["train_crop_stages=2"],
    "24 then 28 px stages to 70%": ["train_crop_stages=2", "train_crop_until=0.7"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--recipe", default="cifar10-fast")
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--epochs", type=float, default=1, help="budget for single ideas")
    p.add_argument("--combine-epochs", default="1,2,4")
    p.add_argument("--only", default="", help="comma-separated idea names (default: all)")
    p.add_argument("--margin", type=float, default=0.3, help="points over baseline to keep")
    p.add_argument("--log", default="ablate.jsonl")
    p.add_argument("--set", dest="extra", action="append", default=[])
    p.add_argument("--skip-baseline", action="store_true", help="only the ideas, no combining")
    a = p.parse_args()
    root = resolve_data_root(a.data)
    train_set = load_cifar(root, "cifar10", "train")
    rows: list[dict] = []

    def one(name: str, sets: list[str], epochs: float) -> float:
        over = [f"holdout={a.holdout}", f"epochs={epochs}", "out=/tmp/googlenet-ablate", *a.extra]
        cfg = resolve_config(a.recipe, None, [*over, *sets])
        t0 = time.perf_counter()
        # one scratch folder, replaced run after run
        res = train(cfg, train_set=train_set, val_set=train_set, overwrite=True, progress=False)
        accs = [r["val_acc"] for r in res.history if "val_acc" in r]  # validated epochs
        row = {"name": name, "sets": sets, "epochs": epochs, "val_acc": accs,
               "images_per_s": res.history[-1]["images_per_s"],
               "seconds": round(time.perf_counter() - t0, 1),
               # with a holdout the run serves the better of raw and EMA weights: both scores
               "final": {k: v for k, v in res.history[-1].items() if k[:4] == "val_"}}  # fmt: skip
        rows.append(row)
        with open(a.log, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"| {name} | {epochs} | {' / '.join(f'{x:.2f}' for x in accs)} | "
              f"{row['images_per_s']:.0f} | {row['seconds']} |", flush=True)  # fmt: skip
        return accs[-1]

    print("| idea | epochs | holdout top-1 by epoch (%) | img/s | s |\n|---|---:|---|---:|---:|")
    only = [x for x in a.only.split(",") if x]
    ideas = {k: v for k, v in IDEAS.items() if not only or k in only}
    if a.skip_baseline:
        for k, v in ideas.items():
            one(k, v, a.epochs)
        return
    base = one("baseline", [], a.epochs)
    kept = [k for k, v in ideas.items() if one(k, v, a.epochs) > base + a.margin]
    print(f"\nkept (> baseline {base:.2f} + {a.margin}): {kept}\n")
    combo = [s for k in kept for s in ideas[k] if not k.startswith(("lr=", "batch="))]
    # at most one lr/batch choice: the best of those kept
    lr_rows = [r for r in rows if r["name"] in kept and r["name"].startswith(("lr=", "batch="))]
    if lr_rows:
        combo += max(lr_rows, key=lambda r: r["val_acc"][-1])["sets"]
    combo = list(dict.fromkeys(combo))  # keep order, drop repeats
    for e in [float(x) for x in a.combine_epochs.split(",") if x]:
        one("baseline", [], e) if e != a.epochs else None
        one("combined: " + ", ".join(combo), combo, e)


if __name__ == "__main__":
    main()
