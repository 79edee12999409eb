"""The ``jobwrap`` command line: a thin dispatcher over ``jobwrap.commands``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# Order is the order shown in --help.
COMMAND_MODULES = ("run", "ls", "status", "export", "simulate", "submit", "doctor", "task")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobwrap",
        description="Preemption-safe PyTorch training on Slurm: trap, checkpoint, requeue, resume.",
        epilog="example: jobwrap run --max-requeues 5 -- python train.py --epochs 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"jobwrap.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"jobwrap.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="jobwrap: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))
