"""`googlenet evaluate`, `predict`, `export` and `import-torchvision`: use a trained model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from googlenet.errors import UserError

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


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
        "--tta", default=None, choices=["none", "flip", "flip-shift", "10crop", "144crop"],
        help="test-time augmentation (default: the one the run's reported score used)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="report folder (default: CKPT's folder/eval-TTA)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default: as validated)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="a seeded class-stratified sample of N images"
    )
    _add_device_options(p, "as validated")
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    p.add_argument(
        "--weights", default="auto", choices=["auto", "model", "ema"],
        help="weights to evaluate (auto: those the checkpoint serves, as recorded)",
    )  # fmt: skip
    p.set_defaults(func=_run_evaluate)


def _add_device_options(p: argparse.ArgumentParser, precision_default: str) -> None:
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="where the model runs (auto: CUDA when available)",
    )  # fmt: skip
    p.add_argument(
        "--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
        help=f"autocast precision (default: {precision_default}; auto: bf16 where it is fast)",
    )  # fmt: skip


def _run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from googlenet.checkpoint import resolve_checkpoint
    from googlenet.devices import keep_freed_memory
    from googlenet.infer.evaluate import evaluate, format_result, write_report

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    keep_freed_memory()  # this process's batches reuse freed pages, as training's steps do
    precision = "bf16" if args.bf16 else args.precision
    result = evaluate(
        args.checkpoints, args.data, args.tta, args.batch_size, args.limit,
        precision=precision, device=args.device, weights=args.weights,
    )  # fmt: skip
    name = f"eval-{result.tta}" if len(args.checkpoints) == 1 else f"eval-ensemble-{result.tta}"
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
    _add_device_options(p, "fp32, as googlenet.load and serve")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import json

    from googlenet.infer.inference import load, predict_files

    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    predictor = load(args.checkpoint, device=args.device, precision=args.precision or "fp32")
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
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="where the fp32 reference forward of the checks runs (auto: CUDA when available)",
    )  # fmt: skip
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from googlenet.infer.export import export_checkpoint

    report = export_checkpoint(
        args.checkpoint, args.format, args.out, args.data, device=args.device
    )
    for name, diff in report.diffs.items():
        print(f"check {name}: max |logit difference| {diff:.2e} (<= {report.limits[name]:.2e})")
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {report.path} ({report.format})")
    return 0


def _add_import_torchvision(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-torchvision", help="convert torchvision's ImageNet GoogLeNet weights"
    )
    p.add_argument(
        "file", metavar="FILE", nargs="?", default=None,
        help="googlenet-1378be20.pth (checked against its hash prefix) or a .safetensors; "
        "none: download torchvision's file into $TORCH_HOME/hub/checkpoints once",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the checkpoint (best.safetensors)")
    p.set_defaults(func=_run_import_torchvision)


def _run_import_torchvision(args: argparse.Namespace) -> int:
    from googlenet.torchvision_weights import convert_torchvision
    from googlenet.weights import check_named_file, fetch

    file = args.file or fetch("torchvision", progress=True)
    check_named_file(file)
    path = convert_torchvision(file, args.out)
    print(f"wrote {path}")
    return 0


COMMANDS += [_add_evaluate, _add_predict, _add_export, _add_import_torchvision]
