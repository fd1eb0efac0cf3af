"""The `googlenet` command: thin wrappers over the library, one sub-command per task.

Bad input raises UserError anywhere below; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable, Sequence

from googlenet.errors import Note, UserError

Handler = Callable[[argparse.Namespace], int]
# Each section below defines one sub-command and appends its `_add_*` function here.
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
    from googlenet.datasets import resolve_data_root
    from googlenet.download import download_cifar

    folder = download_cifar(resolve_data_root(args.data), args.dataset)
    print(f"{args.dataset}: {folder}")
    return 0


COMMANDS.append(_add_download)


# --- train ---
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a network (default recipe: cifar10-fast)",
        description="Train per a recipe or config file, with --set key=value overrides. "
        "Under torchrun (torchrun --nproc_per_node=N -m googlenet train ...) it runs DDP.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", default=None, help="shipped recipe: article, paper, cifar10-fast")
    src.add_argument("--config", default=None, help="a TOML config file (e.g. a run's config.toml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (value read as TOML; repeatable), e.g. --set epochs=10",
    )
    p.add_argument("--data", default=None, help="data folder (else $GOOGLENET_DATA, else ./data)")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from googlenet.config import resolve_config
    from googlenet.engine import TrainingDiverged, train

    overrides = list(args.overrides)
    config_file = args.config
    if args.out is not None:
        overrides.append(f"out={args.out}")
    # Resuming without --recipe/--config: start from the run's own resolved config.
    if args.resume and args.recipe is None and config_file is None:
        saved = Path(args.out or "runs/cifar10-fast") / "config.toml"
        if saved.is_file():
            config_file = saved
    cfg = resolve_config(args.recipe, config_file, overrides)
    try:
        result = train(cfg, data_root=args.data, resume=args.resume, progress=not args.quiet)
    except TrainingDiverged as e:
        print(f"googlenet train: error: {e}", file=sys.stderr)
        return 3
    if not args.quiet and result.best_epoch and result.main:
        print(
            f"done: best val top-1 {result.best_acc:.2f}% at epoch {result.best_epoch}; "
            f"checkpoints in {result.out}",
            file=sys.stderr,
        )
    return 0


COMMANDS.append(_add_train)


# --- evaluate / predict / export / import-torchvision ---
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="top-1/top-5, per-class accuracy and confusion matrix (TTA, ensembles)",
        description="Evaluate checkpoints on the test split of their data set (or on a folder "
        "of class sub-folders); several checkpoints are ensembled by averaging softmax.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint file or run folder")
    p.add_argument("--data", default=None, help="data root, or a folder of class sub-folders")
    p.add_argument(
        "--tta", default="none", choices=["none", "flip", "10crop", "144crop"], help="test crops"
    )
    p.add_argument("--out", default=None, help="report folder (default: CKPT's folder/eval-TTA)")
    p.add_argument("--batch-size", type=int, default=100, help="images per batch")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast + channels_last (faster)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from googlenet.checkpoint import resolve_checkpoint
    from googlenet.evaluate import evaluate, format_result, write_report

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    result = evaluate(
        args.checkpoints, args.data, args.tta, args.batch_size, args.limit, bf16=args.bf16
    )
    name = f"eval-{args.tta}" if len(args.checkpoints) == 1 else f"eval-ensemble-{args.tta}"
    out = Path(args.out) if args.out else resolve_checkpoint(args.checkpoints[0]).parent / name
    files = write_report(result, out)
    print(format_result(result))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify image files or folders (recursively)")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run folder")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--top-k", type=int, default=5, help="labels to show per image")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import json

    from googlenet.inference import load, predict_files

    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    predictor = load(args.checkpoint)
    failed = 0
    for path, pred, error in predict_files(predictor, args.paths, args.top_k, args.batch_size):
        if pred is None:
            failed += 1
            print(f"googlenet predict: {error}", file=sys.stderr)
        elif args.json:
            print(json.dumps(pred.to_dict()), flush=True)
        else:
            best = "  ".join(f"{label} {100 * p:5.1f}%" for label, p in pred.topk)
            print(f"{path}\t{best}", flush=True)
    if failed:
        print(f"googlenet predict: {failed} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export to ONNX or TorchScript, verified against PyTorch")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run folder")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="format")
    p.add_argument("--out", default=None, help="output file (default: beside the checkpoint)")
    p.add_argument("--data", default=None, help="data root, for the check on real images")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from googlenet.export import TOLERANCE, export_checkpoint

    report = export_checkpoint(args.checkpoint, args.format, args.out, args.data)
    for name, diff in report.diffs.items():
        print(f"check {name}: max |logit difference| {diff:.2e} (<= {TOLERANCE:g})")
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {report.path} ({report.format})")
    return 0


def _add_import_torchvision(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-torchvision", help="convert torchvision's ImageNet GoogLeNet weights"
    )
    p.add_argument("file", metavar="FILE", help="googlenet-1378be20.pth or a .safetensors")
    p.add_argument("--out", required=True, help="folder for the checkpoint (best.safetensors)")
    p.set_defaults(func=_run_import_torchvision)


def _run_import_torchvision(args: argparse.Namespace) -> int:
    from googlenet.torchvision_weights import convert_torchvision

    path = convert_torchvision(args.file, args.out)
    print(f"wrote {path}")
    return 0


COMMANDS += [_add_evaluate, _add_predict, _add_export, _add_import_torchvision]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="googlenet", description="GoogLeNet / Inception v1: build, train, evaluate, export."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _show_warning(command: str, message, category, *_args, **_kw) -> None:
    """Our notes and warnings as one line each, like errors (no file/line noise)."""
    kind = "note" if issubclass(category, Note) else "warning"
    print(f"googlenet {command}: {kind}: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, args.command)
            return handler(args)
    except UserError as e:
        print(f"googlenet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"googlenet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
