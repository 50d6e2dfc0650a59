"""The ``lowbit`` command: a thin layer over the Python API.

Parsing, ``--help`` and ``--version`` import neither torch nor transformers; a command imports
what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from . import eval_cmd, export_cmd, generate_cmd, models_cmd, quantize_cmd, vq_cmd

COMMANDS = (quantize_cmd, eval_cmd, generate_cmd, export_cmd, models_cmd, vq_cmd)
INTERRUPTED = "lowbit: interrupted; no output was written (the same command resumes a quantize run)"


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


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _error(message: str) -> None:
    _stderr_console().print(f"lowbit: error: {message}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _error(str(exc))
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    _setup_process(args.verbose)
    try:
        return args.run(args)
    except UsageError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        if args.verbose >= 2:
            raise
        where = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        _error(f"{exc}{where}")
        # bad input (values, files, permissions, the network) is the user's to fix: 2; a failure inside a run: 1
        return 2 if isinstance(exc, (ValueError, OSError)) else 1


def _setup_process(verbose: int) -> None:
    """Process-wide settings belong to the command, not to the library."""
    from rich.logging import RichHandler

    # scipy's OpenBLAS (the LAPACK behind packed Hessians) keeps its threads spinning for a while
    # after each call, taking the cores from torch's threads: matmuls right after ran 12% slower
    # on 2 cores. Let them sleep almost at once. Read when scipy.linalg loads, later.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(message)s",
        handlers=[RichHandler(console=_stderr_console(), show_path=False)],
        force=True,
    )
    # transformers' own progress bars and advice lines would interleave with lowbit's bar
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def entry() -> None:
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before a command runs (while Python starts, while argv is parsed)
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
