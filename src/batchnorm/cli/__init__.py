"""Command line: ``batchnorm demo``, ``batchnorm reproduce EXPERIMENT``, ``batchnorm fold`` and
``batchnorm bench``."""

from __future__ import annotations

import argparse

from batchnorm.cli import bench
from batchnorm.cli import compile as compile_command
from batchnorm.cli.audit import add_audit_parser, run_audit
from batchnorm.cli.fold import add_fold_parser, run_fold
from batchnorm.cli.lab import add_lab_parsers, run_lab_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_lab_parsers(commands)
    add_fold_parser(commands)
    add_audit_parser(commands)
    compile_command.add_parser(commands)
    bench.add_arguments(commands.add_parser("bench", help="time the CPU kernels against ATen"))
    args = parser.parse_args(argv)
    if hasattr(args, "run"):  # a command that carries its own runner
        return args.run(args)
    if args.command == "bench":
        return bench.run_from_args(args)
    if args.command == "fold":
        return run_fold(args)
    if args.command == "audit":
        return run_audit(args)
    return run_lab_command(parser, args)
