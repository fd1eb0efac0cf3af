"""The `googlenet` command: thin wrappers over the library, one sub-command per task.

Bad input raises UserError anywhere below; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from googlenet.errors import Note, UserError

if TYPE_CHECKING:
    from googlenet.training.loop import RunResult

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
    from googlenet.data.arrays import resolve_data_root
    from googlenet.data.cifar import download_cifar

    folder = download_cifar(resolve_data_root(args.data), args.dataset)
    print(f"{args.dataset}: {folder}")
    return 0


COMMANDS.append(_add_download)


# --- train ---
def _add_train(sub: argparse._SubParsersAction) -> None:
    from googlenet.training.config import DEFAULT_RECIPE, list_recipes

    p = sub.add_parser(
        "train",
        help=f"train a network (default recipe: {DEFAULT_RECIPE})",
        description="Train per a recipe or config file, with --set key=value overrides. "
        "Under torchrun (torchrun --nproc_per_node=N -m googlenet train ...) it runs DDP.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", default=None, help=f"shipped recipe: {', '.join(list_recipes())}")
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
    p.add_argument(
        "--out", default=None, help="run folder (default: the first free runs/<recipe>[-N])"
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="start from this checkpoint or run folder (config key init; see --recipe finetune)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (default: the newest runs/<recipe>[-N]) from its last "
        "checkpoint, or start it when it has none yet",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="remove the run in --out first, then train"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from googlenet.training import runs
    from googlenet.training.config import DEFAULT_RECIPE, resolve_config
    from googlenet.training.loop import train
    from googlenet.training.state import TrainingDiverged

    overrides = list(args.overrides)
    config_file = args.config
    out = args.out
    if args.resume and out is None and config_file is None:  # the newest run of the recipe
        out = runs.choose(None, args.recipe or DEFAULT_RECIPE, resume=True, overwrite=False)
    if out is not None:
        overrides.append(f"out={out}")
    if args.init is not None:
        overrides.append(f"init={json.dumps(args.init)}")  # quoted: any path is a TOML string
    # Resuming without --recipe/--config: start from the run's own resolved config.
    if args.resume and args.recipe is None and config_file is None:
        saved = Path(out) / "config.toml"
        if saved.is_file():
            config_file = saved
    cfg = resolve_config(args.recipe, config_file, overrides)
    try:
        result = train(
            cfg,
            data_root=args.data,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except TrainingDiverged as e:
        print(f"googlenet train: error: {e}", file=sys.stderr)
        return 3
    if result.main and cfg.report:  # from what validation recorded; a failure only warns
        from googlenet.insight.report import report_after_training

        report_after_training(result.out, result.val_set, not args.quiet)
    if not args.quiet and result.best_epoch and result.main:
        print(f"done: {_kept(result)}; checkpoints in {result.out}", file=sys.stderr)
    return 0


def _kept(result: RunResult) -> str:
    """What the checkpoint train kept scored: a test split reports but never picks."""
    acc, epoch = f"val top-1 {result.best_acc:.2f}%", result.best_epoch
    if result.picks_best:
        return f"best {acc} at epoch {epoch}"
    return f"final {acc} (epoch {epoch}; on a test split the checkpoint kept is the latest)"


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
    p.add_argument("file", metavar="FILE", help="googlenet-1378be20.pth or a .safetensors")
    p.add_argument("--out", required=True, help="folder for the checkpoint (best.safetensors)")
    p.set_defaults(func=_run_import_torchvision)


def _run_import_torchvision(args: argparse.Namespace) -> int:
    from googlenet.torchvision_weights import convert_torchvision

    path = convert_torchvision(args.file, args.out)
    print(f"wrote {path}")
    return 0


COMMANDS += [_add_evaluate, _add_predict, _add_export, _add_import_torchvision]


# --- explain / report / serve (see inside the network) ---
def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="branch usage, Grad-CAM, first-layer filters, ablation, feature visualisation",
        description="Write branch_usage.json/.png, gradcam_<image>.png and filters.png for "
        "the images given (and ablation.json/.png with --ablate, features_*.png with "
        "--features) into --out.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run folder")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    p.add_argument("--out", default="explain", help="output folder (default: ./explain)")
    p.add_argument("--data", default=None, help="average branch usage over this data set")
    p.add_argument("--limit", type=int, default=500, help="images used from --data")
    p.add_argument("--class", dest="target", default=None, help="Grad-CAM class (default: top-1)")
    p.add_argument("--block", default="inception5b", help="Grad-CAM layer (BLOCK[:BRANCH])")
    p.add_argument("--ablate", action="store_true", help="accuracy drop per zeroed branch")
    p.add_argument("--features", default=None, metavar="BLOCK[:BRANCH]", help="visualise")
    p.add_argument("--channels", type=int, default=4, help="channels to visualise")
    p.add_argument("--size", type=int, default=128, help="feature visualisation side")
    p.add_argument("--steps", type=int, default=256, help="feature visualisation steps")
    p.add_argument("--force", action="store_true", help="replace files already in --out")
    p.set_defaults(func=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from googlenet.infer.inference import load
    from googlenet.insight.explain import ExplainOptions, explain_files

    for name in ("limit", "channels", "size", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    opts = ExplainOptions(
        target=args.target,
        block=args.block,
        data=args.data,
        limit=args.limit,
        ablate=args.ablate,
        features=args.features,
        channels=args.channels,
        feature_size=args.size,
        feature_steps=args.steps,
        force=args.force,
    )
    for path in explain_files(load(args.checkpoint), args.images, args.out, opts):
        print(f"wrote {path}")
    return 0


COMMANDS.append(_add_explain)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write RUN/report.html: curves, confusion, mistakes with Grad-CAM, branch usage",
    )
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--data", default=None, help="data root holding the run's validation images")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the run's best)")
    p.add_argument("--out", default=None, help="output file (default: RUN/report.html)")
    p.add_argument(
        "--features",
        default=None,
        metavar="BLOCK[:BRANCH]",
        help="add a feature visualisation (minutes on a CPU)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing report")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from googlenet.insight.report import write_report

    path = write_report(
        args.run,
        args.data,
        args.out,
        args.force,
        checkpoint=args.checkpoint,
        features=args.features,
    )
    print(f"wrote {path}")
    return 0


COMMANDS.append(_add_report)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page and JSON API: top-5, Grad-CAM, branch usage (serve extra)",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--max-mb", type=float, default=20.0, help="largest upload in MB")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="wait to batch requests")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch (1: no batching)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from googlenet.serve import serve

    if args.max_batch < 1 or args.batch_window_ms < 0 or args.max_mb <= 0:
        raise UserError("--max-batch must be >= 1, --batch-window-ms >= 0 and --max-mb > 0")
    serve(
        args.checkpoint,
        args.host,
        args.port,
        max_bytes=int(args.max_mb * 1024 * 1024),
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
    )
    return 0


COMMANDS.append(_add_serve)


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


class _UsageError(UserError):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other refused input (argparse would print the
    whole usage first and exit from inside parse_args); the usage is one --help away."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    handler: Handler = args.func
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_show_warning, args.command)
            # Pillow warns about large images before we refuse them with a clearer error.
            warnings.filterwarnings("ignore", message=r"Image size .* decompression bomb")
            return handler(args)
    except UserError as e:  # one line, even when a library's message had several
        print(f"googlenet {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # train's Interrupted carries 130 (SIGINT) or 143 (SIGTERM)
        print(f"googlenet {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))


if __name__ == "__main__":
    sys.exit(main())
