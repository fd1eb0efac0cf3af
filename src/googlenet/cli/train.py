"""`googlenet train`: a thin wrapper over googlenet.training.train, then the report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from googlenet.training.loop import RunResult

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


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
        help="start from this checkpoint or run folder, or 'torchvision' (its ImageNet weights, "
        "downloaded once; an existing path of that name wins) (config key init; see --recipe "
        "finetune)",
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
