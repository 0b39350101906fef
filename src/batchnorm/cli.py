"""Command line: ``batchnorm demo``."""

from __future__ import annotations

import argparse

from batchnorm.fold_cli import add_fold_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train the article's model with and without BN")
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--seed", type=int, default=0)
    add_fold_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from batchnorm.lab.quickstart import run

        return run(epochs=args.epochs, seed=args.seed)
    if args.command == "fold":
        from batchnorm.fold_cli import run_fold

        return run_fold(args)
    return 2
