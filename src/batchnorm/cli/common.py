"""What every ``batchnorm`` subcommand shares: its parser, the model arguments, user errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

Runner = Callable[[argparse.Namespace], int]


class CLIError(Exception):
    """A user mistake: the command prints it on one line, without a traceback, and exits 2."""


def command_parser(
    commands: Any, name: str, help: str, description: str | None, run: Runner
) -> argparse.ArgumentParser:
    """Register ``batchnorm <name>``: ``--help`` shows ``description`` (the command module's
    docstring) as written, and ``main`` carries the command out with ``run``."""
    parser = commands.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model pkg.module:factory`` and ``--weights`` (read by ``cli.fold.load_model``)."""
    parser.add_argument("--model", required=True, help="pkg.module:factory returning the nn.Module")
    parser.add_argument(
        "--weights", help="a state_dict saved with torch.save (default: the factory's weights)"
    )


def exit_status(name: str, command: Callable[[], int], *errors: type[Exception]) -> int:
    """Run ``command``; a ``CLIError`` (or one of ``errors``) becomes one line on stderr and
    exit status 2."""
    try:
        return command()
    except (CLIError, *errors) as error:
        print(f"batchnorm {name}: error: {error}", file=sys.stderr)
        return 2


def parse_shape(text: str, option: str, example: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``: positive ints separated by commas, or a
    ``CLIError`` naming ``option`` and an ``example`` of a valid value."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise CLIError(
            f"{option} must be positive integers separated by commas, e.g. {example}; got {text!r}."
        )
    return shape
