"""The `googlenet` command: thin wrappers over the library, one sub-command per task.

Bad input raises UserError anywhere below; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from googlenet.errors import UserError

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


# --- train (training helper's section) ---


# --- evaluate / predict / export / import-torchvision (inference helper's section) ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="googlenet", description="GoogLeNet / Inception v1: build, train, evaluate, export."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except UserError as e:
        print(f"googlenet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"googlenet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
