"""The lab's commands: ``batchnorm demo`` and ``batchnorm reproduce ioffe2015``."""

from __future__ import annotations

import argparse
from typing import Any

from batchnorm.lab import demo as lab_demo
from batchnorm.lab import reproduce as lab_reproduce
from batchnorm.lab.data import load_dataset
from batchnorm.lab.extras import MissingExtraError, import_extra
from batchnorm.lab.fit import resolve_device, torch_threads

#: Intra-op CPU threads the lab commands use by default (see batchnorm.lab.fit.torch_threads:
#: the models are small, and a busy machine makes a thread pool slow).
LAB_THREADS = 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _add_lab_options(parser: argparse.ArgumentParser, out: str) -> None:
    """Options shared by the lab's commands: data, device, output."""
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and batches (%(default)s)"
    )
    parser.add_argument(
        "--data",
        choices=["mnist1d", "mnist", "fashion-mnist", "npz"],
        default="mnist1d",
        help="data set: mnist1d (default; generated locally, cached), mnist, fashion-mnist "
        "(the four IDX files, raw or .gz, in --data-dir; for mnist also Keras' mnist.npz), "
        "npz (--data-dir: a .npz with x_train, y_train, x_test, y_test)",
    )
    parser.add_argument("--data-dir", help="folder (or .npz file) of the data; never downloaded")
    parser.add_argument(
        "--bn",
        choices=["batchnorm", "torch"],
        default="batchnorm",
        help="BatchNorm1d implementation: batchnorm (ours, default) or torch (torch.nn)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1...")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=LAB_THREADS,
        help="intra-op CPU threads (%(default)s: the models are small)",
    )
    parser.add_argument("--out", default=out, help="report folder (%(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
        help="no progress on stderr (by default a live bar on a terminal, else a line per "
        "tenth of the training)",
    )  # fmt: skip


def add_lab_parsers(commands: Any) -> None:
    """The ``demo`` and ``reproduce`` subcommands, with the lab's defaults."""
    demo = commands.add_parser(
        "demo", help="train the article's model with and without BN, plot and report"
    )
    demo.add_argument("--epochs", type=_positive_int, default=lab_demo.EPOCHS, help="(%(default)s)")
    demo.add_argument(
        "--batch-size", type=_positive_int, default=lab_demo.BATCH_SIZE, help="(%(default)s)"
    )
    demo.add_argument(
        "--lr", type=_positive_float, default=lab_demo.LR, help="Adam's learning rate (%(default)s)"
    )
    demo.add_argument(
        "--distributed", action="store_true",
        help="under torchrun: DistributedDataParallel + SyncBatchNorm, e.g. "
        "`torchrun --standalone --nproc_per_node=2 -m batchnorm demo --distributed`",
    )  # fmt: skip
    _add_lab_options(demo, out="batchnorm-report")

    reproduce = commands.add_parser(
        "reproduce", help="reproduce a paper's experiment: ioffe2015 (the BN paper's Figure 1)"
    )
    reproduce.add_argument("experiment", choices=["ioffe2015"])
    reproduce.add_argument(
        "--steps", type=_positive_int, default=lab_reproduce.STEPS, help="SGD steps (%(default)s)"
    )
    reproduce.add_argument(
        "--batch-size", type=_positive_int, default=lab_reproduce.BATCH_SIZE,
        help="(%(default)s)",
    )  # fmt: skip
    reproduce.add_argument(
        "--lr", type=_positive_float, default=lab_reproduce.LR, help="SGD's learning rate "
        "(%(default)s)",
    )  # fmt: skip
    reproduce.add_argument(
        "--eval-every", type=_positive_int, default=lab_reproduce.EVAL_EVERY,
        help="steps between test evaluations (%(default)s)",
    )  # fmt: skip
    reproduce.add_argument(
        "--activation", choices=["sigmoid", "tanh", "relu"], default="sigmoid",
        help="nonlinearity of the hidden layers (%(default)s)",
    )  # fmt: skip
    reproduce.add_argument(
        "--threshold", type=float, default=lab_reproduce.THRESHOLD,
        help="report the steps to this test accuracy (%(default)s)",
    )  # fmt: skip
    reproduce.add_argument(
        "--unit", type=int, default=0, help="last-hidden-layer unit to plot (%(default)s)"
    )
    _add_lab_options(reproduce, out="batchnorm-report/ioffe2015")


def run_lab_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``demo`` or ``reproduce`` as parsed by :func:`add_lab_parsers`."""
    if args.command == "demo":
        return _run_lab(
            parser, args, lab_demo.run_demo, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, distributed=args.distributed,
        )  # fmt: skip
    return _run_lab(
        parser, args, lab_reproduce.run_ioffe2015, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
        activation=args.activation, threshold=args.threshold, unit=args.unit,
    )  # fmt: skip


def _run_lab(parser: argparse.ArgumentParser, args: argparse.Namespace, run, **options) -> int:
    """Load the data, run a lab command; bad data or settings end with a message, not a
    traceback."""
    try:
        resolve_device(args.device)
        if not args.no_plots:
            import_extra("matplotlib")  # missing: said now, not after the training
        data = load_dataset(args.data, args.data_dir)
        with torch_threads(args.threads):
            run(
                data=data, device=args.device, out=args.out, seed=args.seed, bn=args.bn,
                plots_enabled=not args.no_plots, progress=False if args.no_progress else None,
                **options,
            )  # fmt: skip
    except (ValueError, MissingExtraError) as error:  # DataError is a ValueError
        parser.exit(2, f"batchnorm {args.command}: error: {error}\n")
    return 0
