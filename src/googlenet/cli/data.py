"""`googlenet summary`, `download`, `shards` and `build-kernel`: the network's table, the data
sets, the max-pool kernel built ahead of time."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


# --- summary ---------------------------------------------------------------------------------
def _add_summary(sub: argparse._SubParsersAction) -> None:
    from googlenet.model import list_variants

    p = sub.add_parser("summary", help="print a layer table with parameters and FLOPs")
    p.add_argument("--variant", default="cifar", choices=list_variants(), help="model variant")
    p.add_argument("--num-classes", type=int, default=None, help="classes (variant default)")
    p.add_argument("--input-size", type=int, default=None, help="image side (variant default)")
    p.add_argument("--no-aux", action="store_true", help="without the auxiliary heads")
    p.set_defaults(func=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from googlenet.model import build
    from googlenet.summary import summary

    model = build(args.variant, num_classes=args.num_classes, aux_logits=not args.no_aux)
    side = args.input_size or model.spec.input_size
    model.check_input(_probe(side))
    print(f"googlenet variant {args.variant!r}: {model.spec.description}")
    print(summary(model, (3, side, side)))
    return 0


def _probe(side: int):  # a zero-size-batch tensor, only for the input check
    import torch

    return torch.empty(0, 3, side, side)


COMMANDS.append(_add_summary)


# --- download ---
def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch an official CIFAR archive (MD5-checked) into the data folder",
    )
    p.add_argument(
        "dataset", nargs="?", default="cifar10", choices=["cifar10", "cifar10-binary", "cifar100"]
    )
    p.add_argument("--data", default=None, help="data folder (else $GOOGLENET_DATA, else ./data)")
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from googlenet.data.arrays import resolve_data_root
    from googlenet.data.cifar import download_cifar

    folder = download_cifar(resolve_data_root(args.data), args.dataset)
    print(f"{args.dataset}: {folder}")
    return 0


COMMANDS.append(_add_download)


# --- shards ---
def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="write WebDataset tar shards from an image folder with train/ and val/",
        description="Write ROOT/train and ROOT/val (one sub-folder per class) as WebDataset "
        "shards DIR/train-000000.tar ..., DIR/val-000000.tar ... and DIR/classes.json; train "
        "from them with --set dataset=shards --data DIR (a folder or a URL).",
    )
    p.add_argument("root", metavar="ROOT", help="image folder with train/ and val/")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the shards")
    p.add_argument(
        "--max-side", type=int, default=None, metavar="N",
        help="re-encode images whose longer side exceeds N (JPEG q90), e.g. 320-512",
    )  # fmt: skip
    p.add_argument("--shard-size", type=float, default=256.0, metavar="MB", help="MB per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seeds the order of training samples")
    p.set_defaults(func=_run_shards)


def _run_shards(args: argparse.Namespace) -> int:
    import warnings

    from googlenet.data.shards import write_shards

    def progress(split: str, done: int, total: int) -> None:
        print(f"{split}: {done}/{total}", file=sys.stderr, end="\r", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        report = write_shards(
            args.root, args.out, max_side=args.max_side, shard_size_mb=args.shard_size,
            seed=args.seed, workers=args.workers, progress=progress,
        )  # fmt: skip
    for split, r in report.splits.items():
        print(
            f"{split}: {r.samples} images in {len(r.shards)} shards, {r.bytes / 1e6:.1f} MB, "
            f"{r.reencoded} re-encoded, {len(r.skipped)} unreadable skipped"
        )
    print(f"wrote {report.out} ({len(report.classes)} classes)")
    return 0


COMMANDS.append(_add_shards)


# --- build-kernel ---
def _add_build_kernel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-kernel",
        help="compile the C max-pool kernel for this CPU into the cache now",
        description="Compile fastpool.c with -march=native for this CPU into $GOOGLENET_CACHE "
        "(else ~/.cache/googlenet), as the first bf16 CPU run would; for images built for a "
        "known CPU. GOOGLENET_FAST_POOL=0 turns the kernel off.",
    )
    p.set_defaults(func=_run_build_kernel)


def _run_build_kernel(args: argparse.Namespace) -> int:
    from googlenet.fastpool import build_kernel

    print(f"max-pool kernel for this CPU: {build_kernel()}")
    return 0


COMMANDS.append(_add_build_kernel)
