"""The ``lowbit`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

from .. import __version__
from . import eval_cmd, models_cmd, quantize_cmd, vq_cmd

COMMANDS = (quantize_cmd, eval_cmd, models_cmd, vq_cmd)


class UsageError(Exception):
    """Bad command-line input: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Compress trained neural networks to low bit-widths.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    err = Console(stderr=True)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        err.print(f"lowbit: error: {exc}", highlight=False, soft_wrap=True)
        return 2
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UsageError as exc:
        err.print(f"lowbit: error: {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print(
            "lowbit: interrupted; no output was written (the same command resumes a quantize run)", highlight=False
        )
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        if args.verbose >= 2:
            raise
        where = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        err.print(f"lowbit: error: {exc}{where}", highlight=False, soft_wrap=True)
        return 2 if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError)) else 1


def entry() -> None:
    sys.exit(main())
