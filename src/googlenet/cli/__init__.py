"""The `googlenet` command: thin wrappers over the library, one sub-command per task.

Bad input raises UserError anywhere below; here it becomes one line on stderr and exit code 2.

The sub-commands live by what they work on: data.py (summary, download, shards, build-kernel),
train.py, infer.py (evaluate, predict, export, import-torchvision), insight.py (explain, report,
serve).
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from googlenet.cli import data, infer, insight, train
from googlenet.errors import Note, UserError

# In the order `googlenet --help` lists them.
COMMANDS = [*data.COMMANDS[:2], *train.COMMANDS, *infer.COMMANDS, *insight.COMMANDS,
            *data.COMMANDS[2:]]  # fmt: skip


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
    handler = args.func
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
