"""`googlenet explain`, `report` and `serve`: see inside the network."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from googlenet.errors import UserError

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


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
