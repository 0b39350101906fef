"""Command line: ``batchnorm demo``, ``batchnorm reproduce EXPERIMENT``, ``batchnorm fold`` and
``batchnorm bench``."""

from __future__ import annotations

import argparse

from batchnorm.cli import audit, bench, fold
from batchnorm.cli import compile as compile_command
from batchnorm.cli.lab import add_lab_parsers, run_lab_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_lab_parsers(commands)
    for command in (fold, audit, compile_command, bench):
        command.add_parser(commands)
    args = parser.parse_args(argv)
    if hasattr(args, "run"):  # a command that carries its own runner
        return args.run(args)
    return run_lab_command(parser, args)
