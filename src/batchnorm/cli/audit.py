"""``batchnorm audit``: audit the batch norm of a model given by a factory, its weights and a
data set, and print what is wrong, the measured evidence and the fix.

The model and weights are read as ``batchnorm fold`` reads them (``--weights`` with
``torch.load(weights_only=True)``); the data is a ``.npz`` with ``x_train, y_train, x_test,
y_test`` as the lab reads it (samples are flattened: ``--sample-shape`` gives them back
their shape, e.g. ``1,40`` or ``3,32,32``). The split audited (``--split``, default train:
the data the running statistics estimate) is cut into batches of ``--batch-size`` samples:
give the per-process batch size the model trains with, which the noise of batch statistics
depends on. A terminal gets a rich table, a pipe plain text. Exit status 0 (1 with
``--fail-on`` and a finding that severe; 2 on a mistake).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from batchnorm.cli.common import (
    CLIError,
    add_model_arguments,
    command_parser,
    exit_status,
    parse_shape,
)
from batchnorm.cli.fold import check_output_path, load_model
from batchnorm.tools.audit import DEFAULT_BATCH_SIZE, DEFAULT_NUM_BATCHES, SEVERITIES, audit


def add_parser(commands: Any) -> None:
    """Register the ``audit`` subcommand on the CLI's subparsers."""
    p = command_parser(
        commands,
        "audit",
        "audit the batch norm of a trained model on data: findings, evidence, fixes",
        __doc__,
        run,
    )
    add_model_arguments(p)
    p.add_argument(
        "--data", required=True, help=".npz with x_train, y_train, x_test, y_test (as the lab's)"
    )
    p.add_argument(
        "--split", choices=("train", "test"), default="train", help="which split to audit on"
    )
    p.add_argument(
        "--sample-shape",
        help="shape of one sample, comma-separated (default: the flat features), e.g. 1,40",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"samples per batch: the per-process training batch (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--num-batches",
        type=int,
        default=DEFAULT_NUM_BATCHES,
        help=f"batches to use at most (default {DEFAULT_NUM_BATCHES}; 0: all)",
    )
    p.add_argument("--html", help="write a self-contained HTML report to this file")
    p.add_argument("--json", help="write every finding and measurement as JSON to this file")
    p.add_argument("--no-timing", action="store_true", help="do not time the folded model")
    p.add_argument(
        "--fail-on",
        choices=(*SEVERITIES, "never"),
        default="never",
        help="exit with status 1 when a finding is at least this severe (default never)",
    )


def run(args: argparse.Namespace) -> int:
    """Carry out ``batchnorm audit``; returns the exit status."""
    from batchnorm.lab.data import DataError

    return exit_status("audit", lambda: _audit_command(args), DataError)


def _audit_command(args: argparse.Namespace) -> int:
    from batchnorm.lab.data import load_npz

    for path, option in ((args.html, "--html"), (args.json, "--json")):
        if path:
            check_output_path(path, option)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive int, got {args.batch_size}.")
    if args.num_batches < 0:
        raise CLIError(f"--num-batches must be 0 (all) or more, got {args.num_batches}.")
    model = load_model(args)
    data = load_npz(args.data)
    x = data.x_train if args.split == "train" else data.x_test
    y = data.y_train if args.split == "train" else data.y_test
    if args.sample_shape:
        x = _reshape(x, args.sample_shape)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = x.to(device, dtype)
    try:
        report = audit(
            model,
            x,
            labels=y,
            batch_size=args.batch_size,
            num_batches=args.num_batches or None,
            timing=not args.no_timing,
        )
    except (RuntimeError, ValueError, TypeError) as error:
        raise CLIError(
            f"the model failed on the data ({type(error).__name__}: {error}). Hint: "
            f"--sample-shape gives the samples the shape the model takes (they are read flat, "
            f"{tuple(x.shape[1:])})."
        ) from error
    _print(report)
    if args.json:
        report.to_json(args.json)
        print(f"wrote {args.json}")
    if args.html:
        report.to_html(args.html)
        print(f"wrote {args.html}")
    failing = args.fail_on != "never" and report.worst is not None
    return int(failing and SEVERITIES.index(report.worst) <= SEVERITIES.index(args.fail_on))


def _reshape(x: torch.Tensor, text: str) -> torch.Tensor:
    shape = parse_shape(text, "--sample-shape", "1,40")
    if math.prod(shape) != x[0].numel():
        raise CLIError(
            f"--sample-shape {text} has {math.prod(shape)} elements, the samples have "
            f"{x[0].numel()}."
        )
    return x.reshape(len(x), *shape)


def _print(report: Any) -> None:
    """A rich table in a terminal; plain text (whole lines, for grep and logs) otherwise."""
    if not sys.stdout.isatty():
        print(report)
        return
    try:
        report.print()
    except ImportError:
        print(report)
        print("(install rich, in the lab extra, for a table)", file=sys.stderr)
