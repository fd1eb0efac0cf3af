"""What test-time crops and a small ensemble gain over one plain evaluation, as a markdown table.

    python bench/tta_report.py CKPT [CKPT ...] [--data DIR] [--limit N] [--out FILE] [--fp32]

Rows: the first checkpoint under every TTA mode (none, flip, 10crop, 144crop), then, with two
or more checkpoints, their softmax-averaged ensemble (plain and with flip). 144crop on the full
CIFAR-10 test set is the slow one (48 distinct crops per 32x32 image); --limit shortens it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from googlenet.files import atomic_write_text
from googlenet.infer.evaluate import evaluate, load_members
from googlenet.tta import TTA_MODES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", default=None, help="data root (default: $GOOGLENET_DATA, ./data)")
    ap.add_argument("--limit", type=int, default=None, help="a stratified sample of N images")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--modes", default=",".join(TTA_MODES), help="comma-separated TTA modes")
    ap.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 autocast")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args(argv)

    members = load_members(args.checkpoints)
    bf16 = not args.fp32
    runs: list[tuple[str, list, str]] = [
        (f"{Path(members[0].name).name}", members[:1], mode) for mode in args.modes.split(",")
    ]
    if len(members) > 1:
        label = f"ensemble of {len(members)}"
        runs += [(label, members, "none"), (label, members, "flip")]
    rows = []
    base: float | None = None
    for label, ms, mode in runs:
        t0 = time.perf_counter()
        precision = "bf16" if bf16 else "fp32"
        r = evaluate([], args.data, mode, args.batch_size, args.limit, precision, "cpu", members=ms)
        dt = time.perf_counter() - t0
        base = r.top1 if base is None else base
        gain = 100 * (r.top1 - base)
        rows.append(
            f"| {label} | {mode} | {r.n} | {100 * r.top1:.2f} | {100 * r.top5:.2f} "
            f"| {gain:+.2f} | {dt:.0f} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    precision = "fp32" if args.fp32 else "bf16 autocast + channels_last"
    table = "\n".join(
        [
            f"Test-time augmentation and ensembling ({precision}; gain = top-1 points over the "
            "first row):",
            "",
            "| model | TTA | images | top-1 % | top-5 % | gain | seconds |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
