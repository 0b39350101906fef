"""The lab's commands: ``batchnorm demo`` and ``batchnorm reproduce EXPERIMENT``."""

from __future__ import annotations

import argparse
from typing import Any

from batchnorm.lab import demo as lab_demo
from batchnorm.lab.data import load_dataset
from batchnorm.lab.extras import MissingExtraError, import_extra
from batchnorm.lab.fit import resolve_device, torch_threads
from batchnorm.lab.models import ACTIVATIONS
from batchnorm.lab.reproduce import ioffe2015, renorm2017, santurkar2018
from batchnorm.lab.reproduce.common import RunOptions

#: Intra-op CPU threads the lab commands use by default (see batchnorm.lab.fit.torch_threads:
#: the models are small, and a busy machine makes a thread pool slow).
LAB_THREADS = 1
ACTIVATION_CHOICES = list(ACTIVATIONS)


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


def _add_lab_options(parser: argparse.ArgumentParser, out: str | None, out_help: str) -> None:
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
    parser.add_argument("--out", default=out, help=f"report folder ({out_help})")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
        help="no progress on stderr (by default a live bar on a terminal, else a line per "
        "tenth of the training)",
    )  # fmt: skip


#: The reproductions: experiment -> (module, run function, help).
EXPERIMENTS = {
    "ioffe2015": (ioffe2015, ioffe2015.run_ioffe2015, "the BN paper's Figure 1"),
    "santurkar2018": (
        santurkar2018, santurkar2018.run_santurkar2018,
        "why BN helps: noisy BN and the loss landscape (Santurkar et al. 2018)",
    ),
    "renorm2017": (
        renorm2017, renorm2017.run_renorm2017,
        "when BN fails (micro-batches, non-i.i.d.) and what fixes it (Ioffe 2017)",
    ),
}  # fmt: skip

#: Options of ``reproduce``: flag -> (type or choices, help, experiments that take it). The
#: default of each comes from the experiment's module (its constant of the same name).
_REPRODUCE_OPTIONS: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    "--steps": (_positive_int, "SGD steps", ("ioffe2015", "santurkar2018", "renorm2017")),
    "--batch-size": (_positive_int, "mini-batch size", ("ioffe2015", "santurkar2018")),
    "--lr": (_positive_float, "SGD's learning rate", ("ioffe2015", "santurkar2018")),
    "--eval-every": (_positive_int, "steps between test evaluations", ("ioffe2015",)),
    "--activation": (ACTIVATION_CHOICES, "nonlinearity of the hidden layers", ("ioffe2015",)),
    "--threshold": (float, "report the steps to this test accuracy", ("ioffe2015",)),
    "--unit": (int, "last-hidden-layer unit to plot", ("ioffe2015",)),
    "--seeds": (_positive_int, "number of seeds (--seed, --seed + 1, ...)",
                ("santurkar2018", "renorm2017")),
    "--quick": (None, "test-sized run (seconds): fewer steps and seeds",
                ("santurkar2018", "renorm2017")),
}  # fmt: skip
_DEFAULTS = {"--activation": "sigmoid", "--unit": 0, "--quick": None}


def _default_text(flag: str) -> str:
    """The defaults of ``flag`` per experiment, for --help."""
    name = flag.lstrip("-").replace("-", "_").upper()
    texts = []
    for experiment in _REPRODUCE_OPTIONS[flag][2]:
        value = _DEFAULTS.get(flag, getattr(EXPERIMENTS[experiment][0], name, None))
        if value is not None:
            texts.append(f"{experiment}: {value}")
    return f" ({'; '.join(texts)})" if texts else ""


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
    _add_lab_options(demo, "batchnorm-report", "batchnorm-report")

    reproduce = commands.add_parser(
        "reproduce",
        help="reproduce a paper's experiment: "
        + "; ".join(f"{name} ({text})" for name, (_, _, text) in EXPERIMENTS.items()),
    )
    reproduce.add_argument("experiment", choices=list(EXPERIMENTS))
    for flag, (kind, text, experiments) in _REPRODUCE_OPTIONS.items():
        only = "" if len(experiments) == len(EXPERIMENTS) else f"; {', '.join(experiments)}"
        extra = {"action": "store_true"} if kind is None else (
            {"choices": kind} if isinstance(kind, list) else {"type": kind}
        )  # fmt: skip
        reproduce.add_argument(flag, help=f"{text}{_default_text(flag)}{only}", **extra)
    _add_lab_options(reproduce, None, "batchnorm-report/EXPERIMENT")


def run_lab_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``demo`` or ``reproduce`` as parsed by :func:`add_lab_parsers`."""
    if args.command == "demo":
        options = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                   "distributed": args.distributed}  # fmt: skip
        return _run_lab(parser, args, lab_demo.run_demo, options)
    experiment = args.experiment
    options = {}
    for flag, (_, _, experiments) in _REPRODUCE_OPTIONS.items():
        key = flag.lstrip("-").replace("-", "_")
        value = getattr(args, key)
        if value in (None, False):
            continue
        if experiment not in experiments:
            parser.exit(
                2, f"batchnorm reproduce: error: {flag} applies to {', '.join(experiments)}, "
                f"not to {experiment}.\n",
            )  # fmt: skip
        options[key] = value
    return _run_lab(parser, args, EXPERIMENTS[experiment][1], options)


def _run_lab(parser: argparse.ArgumentParser, args: argparse.Namespace, run, options) -> int:
    """Load the data, run a lab command; bad data or settings end with a message, not a
    traceback."""
    try:
        resolve_device(args.device)
        if not args.no_plots:
            import_extra("matplotlib")  # missing: said now, not after the training
        data = load_dataset(args.data, args.data_dir)
        run_options = RunOptions(
            seed=args.seed, device=args.device, out=args.out, plots=not args.no_plots,
            progress=False if args.no_progress else None,
        )  # fmt: skip
        with torch_threads(args.threads):
            run(data=data, bn=args.bn, options=run_options, **options)
    except (ValueError, MissingExtraError) as error:  # DataError is a ValueError
        parser.exit(2, f"batchnorm {args.command}: error: {error}\n")
    return 0
