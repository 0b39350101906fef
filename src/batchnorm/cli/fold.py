"""``batchnorm fold``: fold the batch norm of a model given by a factory and its weights.

The weights file is read with ``torch.load(weights_only=True)`` only: tensors and plain
containers, never arbitrary pickled objects. ``--out`` receives the folded model's
``state_dict`` (same safe format). The folded model keeps the factory's class, with each
folded BN replaced by ``nn.Identity``; rebuild it with
``batchnorm.fold(factory(), example_inputs)[0]`` and ``load_state_dict``. ``--onnx``
writes the folded model as one ONNX file, weights included (a model over ONNX's 2 GB limit
for one file gets its weights in a ``.data`` file next to it, as the command then says).
Output folders must exist (a typo in a path is reported, not turned into a new folder);
both paths are checked before any work.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import pickle
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm.cli.common import (
    CLIError,
    add_model_arguments,
    command_parser,
    exit_status,
    parse_shape,
)
from batchnorm.tools.fold import fold

DEFAULT_INPUT_SHAPE = "1,3,224,224"  # an ImageNet-sized image, as the example
#: Most elements --input-shape may ask for. fold needs one example input, to trace the model
#: and compare its outputs; 2**27 float32 values (512 MiB, before the model's activations)
#: is far above one large image (1,3,1024,1024 has 3.1M), so more is a typo.
MAX_INPUT_ELEMENTS = 2**27
# How many offending keys an error lists before "...".
_SHOWN_KEYS = 5


def add_parser(commands: Any) -> None:
    """Register the ``fold`` subcommand on the CLI's subparsers."""
    p = command_parser(
        commands, "fold", "fold batch norm into the neighbouring layers of a model", __doc__, run
    )
    add_model_arguments(p)
    p.add_argument(
        "--out",
        required=True,
        help="file to write the folded model's state_dict to (its folder must exist)",
    )
    p.add_argument(
        "--onnx", help="also export the folded model to this ONNX file (its folder must exist)"
    )
    p.add_argument(
        "--input-shape",
        default=DEFAULT_INPUT_SHAPE,
        help=f"shape of the example input, comma-separated (default {DEFAULT_INPUT_SHAPE}; at "
        f"most {MAX_INPUT_ELEMENTS} elements)",
    )


def run(args: argparse.Namespace) -> int:
    """Carry out ``batchnorm fold``; returns the exit status (2 on a user error)."""
    return exit_status("fold", lambda: _fold_command(args))


def _fold_command(args: argparse.Namespace) -> int:
    check_output_path(args.out, "--out")
    if args.onnx:
        check_output_path(args.onnx, "--onnx")
    shape = parse_input_shape(args.input_shape)
    model = load_model(args)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x)
    except Exception as error:
        raise CLIError(
            f"the model rejected an input of shape {shape}: {error}. Hint: pass the shape it "
            f"takes with --input-shape N,C,H,W (default {DEFAULT_INPUT_SHAPE})."
        ) from error
    outputs = _output_tensors(expected)
    if not any(t.numel() for t in outputs):
        shapes = ", ".join(str(tuple(t.shape)) for t in outputs)
        raise CLIError(
            f"the model's output is empty (shape {shapes}) for an input of shape {shape}, so "
            f"the folded model cannot be checked against it. Hint: pass an --input-shape for "
            f"which the model gives a non-empty output."
        )
    folded, report = fold(model, x)
    with torch.no_grad():
        actual = folded(x)
    print(report)
    diff, scale = _max_difference(actual, expected)
    print(
        f"max |folded - unfolded| = {diff:.3g} (relative to max |unfolded|: "
        f"{diff / max(scale, 1e-30):.3g}) on a random input of shape {shape}"
    )
    try:
        torch.save(folded.state_dict(), args.out)
    except (OSError, RuntimeError) as error:  # checked above, but the disk may still refuse
        raise CLIError(f"cannot write --out {args.out!r}: {error}") from error
    print(f"wrote the folded state_dict to {args.out}")
    if args.onnx:
        data = f"{args.onnx}.data"  # where torch.onnx puts weights it does not embed
        before = _modified(data)
        export_onnx(folded, x, args.onnx)
        if _modified(data) not in (None, before):
            print(
                f"wrote the folded ONNX graph to {args.onnx} and its weights (over ONNX's "
                f"2 GB limit for one file) to {data}: keep the two files together"
            )
        else:
            print(f"wrote the folded ONNX graph to {args.onnx} (one file, weights included)")
    return 0


def _modified(path: str) -> float | None:
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model of ``--model`` with the weights of ``--weights``, if given."""
    model = load_factory(args.model)
    if args.weights:
        load_weights(model, args.weights, args.model)
    return model


def load_factory(spec: str) -> nn.Module:
    """Build the model named ``pkg.module:factory``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(
            f"--model must look like pkg.module:factory, got {spec!r}. Hint: e.g. "
            f"batchnorm.example_models:resnet18_like."
        )
    if os.getcwd() not in sys.path:  # find the user's own modules, as `python -m` would
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CLIError(
            f"cannot import module {module_name!r} ({error}). Hint: install its package or run "
            f"from the directory that contains it."
        ) from error
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise CLIError(
            f"module {module_name!r} has no callable {attr!r}. Hint: --model names a function "
            f"or class that builds the model with no arguments."
        )
    try:
        model = factory()
    except Exception as error:
        raise CLIError(f"{spec}() raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise CLIError(f"{spec}() returned a {type(model).__name__}, not an nn.Module.")
    return model


def load_weights(model: nn.Module, path: str, spec: str) -> None:
    """Load a state_dict file into ``model`` safely, with clear errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CLIError(f"--weights: no such file {path!r}.") from error
    except pickle.UnpicklingError as error:
        message = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found:
            raise CLIError(
                f"refusing to load {path!r}: it holds a Python object ({found.group(1)}) that "
                f"is not a tensor or plain container, and unpickling it could run arbitrary "
                f"code. Hint: save only the weights, torch.save(model.state_dict(), path)."
            ) from error
        detail = message.rpartition("WeightsUnpickler error:")[2].strip().split("\n")[0]
        raise CLIError(f"cannot read {path!r} as a torch.save file ({detail}).") from error
    except Exception as error:
        raise CLIError(f"cannot read {path!r} as a torch.save file: {error}") from error
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CLIError(
            f"{path!r} is not a state_dict (a mapping of names to tensors), got "
            f"{type(state).__name__}. Hint: save model.state_dict(); from a training "
            f"checkpoint save checkpoint['state_dict'] (or whatever key holds it)."
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        problems = [
            f"{label} {_some(items)}"
            for label, items in [
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            ]
            if items
        ]
        raise CLIError(
            f"the weights in {path!r} do not match the model built by {spec}: "
            f"{'; '.join(problems)}. Hint: use the factory (and its arguments) the weights "
            f"were trained with."
        )
    model.load_state_dict(state)


def _some(items: list[str]) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > _SHOWN_KEYS else ""
    return "[" + ", ".join(items[:_SHOWN_KEYS]) + more + "]"


def check_output_path(path: str, option: str) -> None:
    """Refuse an output path that cannot be a new file, before the (slow) folding."""
    if os.path.isdir(path):
        raise CLIError(
            f"{option} {path!r} is a folder; expected a file name. Hint: e.g. "
            f"{os.path.join(path, 'folded.pt' if option == '--out' else 'folded.onnx')!r}."
        )
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise CLIError(
            f"{option} {path!r}: the folder {folder!r} does not exist. Hint: create it first "
            f"(mkdir -p {folder}), or check the path for typos."
        )


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: a shape of at most ``MAX_INPUT_ELEMENTS`` elements."""
    shape = parse_shape(text, "--input-shape", DEFAULT_INPUT_SHAPE)
    elements = math.prod(shape)
    if elements > MAX_INPUT_ELEMENTS:
        raise CLIError(
            f"--input-shape {text} has {elements} elements, more than the "
            f"{MAX_INPUT_ELEMENTS} allowed (MAX_INPUT_ELEMENTS). Hint: fold needs a single "
            f"example; use batch size 1 and the model's usual input size, e.g. "
            f"{DEFAULT_INPUT_SHAPE}."
        )
    return shape


def _output_tensors(output: object) -> list[Tensor]:
    """The tensors of a model output: a tensor or a tuple/list of them."""
    tensors = (
        [output]
        if isinstance(output, Tensor)
        else list(output)
        if isinstance(output, (tuple, list))
        else []
    )
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise CLIError(
            f"cannot compare model outputs of type {type(output).__name__}; fold compares a "
            f"tensor or a tuple/list of tensors."
        )
    return tensors


def _max_difference(actual: object, expected: object) -> tuple[float, float]:
    """max |actual - expected| and max |expected| over a tensor or a tuple/list of them
    (at least one of them non-empty)."""
    pairs = list(zip(_output_tensors(actual), _output_tensors(expected), strict=True))
    diff = max((a.double() - e.double()).abs().max().item() for a, e in pairs if e.numel())
    scale = max(e.double().abs().max().item() for _, e in pairs if e.numel())
    return diff, scale


def export_onnx(model: nn.Module, x: Tensor, path: str) -> None:
    """Export with torch.onnx's torch.export-based exporter (the default since torch 2.9;
    the TorchScript one is deprecated). It needs the onnx and onnxscript packages."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise CLIError(
            "--onnx needs the onnx and onnxscript packages: pip install onnx onnxscript"
        ) from error
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    except Exception as error:
        raise CLIError(f"ONNX export failed: {type(error).__name__}: {error}") from error
    try:
        # One file, weights included; only past ONNX's 2 GB limit for one file do they go
        # to a separate file, which the fold command names.
        program.save(path)
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot write --onnx {path!r}: {error}") from error
