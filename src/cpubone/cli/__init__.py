"""Command line: ``cpubone <command> ...``.

Each module in this package that defines ``register(subparsers)`` adds its commands; a command parses
its arguments and calls one library function. Modules import heavy libraries inside their handlers so
that ``cpubone --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from typing import List, Optional

from .. import __version__


class UserError(Exception):
    """An error caused by the command's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpubone", description="CPUBone: vision backbones built for CPUs.")
    parser.add_argument("--version", action="version", version=f"cpubone {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        # the library's warnings speak to the user here: one line, no source location
        print(f"cpubone {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            code = args.func(args)
    # CheckpointError is a ValueError; not importing it keeps torch-free commands (predict) free of torch
    except (UserError, FileNotFoundError, ValueError) as e:
        print(f"cpubone {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)
