"""Training-step time on model-shaped networks: torch.nn's batch norm vs this package's
(``batchnorm.convert``) vs this package's with the activation (and residual) fused into the
layer (``BatchNormAct2d``).

The networks have the real batch-norm shapes of torchvision's resnet18 (20 BN layers),
mobilenet_v2 (52) and efficientnet_b0 (49): the same convolutions, channels, strides and
residual connections, each conv followed by BN and its activation. Two simplifications:
mobilenet_v2's ReLU6 is a ReLU (ReLU6 is not a fused activation of this package), and
efficientnet_b0 has no stochastic depth (its squeeze-and-excitation blocks are kept).

One training step is forward + cross-entropy + backward (no optimizer step: it is the same
for every contender) at batch 8, 3x96x96, on ONE torch thread, in NCHW and channels_last.
The contenders alternate call by call (:func:`batchnorm.lab.timing.time_interleaved`), so
they see the same background load; the figures are medians of wall-clock and of the thread's
CPU time, with the page faults per step. The machine's load average is recorded before and
after.

Two allocator settings, one after the other in the same process:

* ``glibc default``: what a plain ``python`` gives. glibc hands freed memory back to the
  system when the top of its heap grows past a threshold, and the next large allocation
  (a conv's reordered weights, an activation) faults its pages in again: thousands of page
  faults in some steps and none in others, depending on the order of every allocation of
  the process (measured: 0-13,000 per resnet18 step, ±20 % of a step's time, on any
  contender). Its medians carry that noise.
* ``glibc, memory kept``: ``mallopt`` keeps freed memory in the process, as jemalloc or
  tcmalloc do, which PyTorch's CPU performance guide recommends (the setting of
  ``batchnorm bench``, see :func:`batchnorm.cli.bench.keep_freed_memory`); steps then
  fault almost no pages and the medians compare the computations.

Then, with memory kept, the BN layers alone (``bn_layers`` in the JSON): in a step BN is
5-21 % of the time, so a step cannot show a BN that is 1.2x faster. Each conv's BN part
(BN, the residual, the activation: ``ConvBN.normalize``) runs on an input of the conv's
output shape, every layer of the model in its call order, all forwards then one backward
(training), or the forwards without autograd (eval): as in a step, a layer's backward
finds its data out of the caches (unlike in a step, so does its forward).

    python benchmarks/models.py [OUT.json] [--reps N] [--warmup N] [--models a,b]

writes OUT.json (default benchmarks/results/models.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import batchnorm
from batchnorm.cli.bench import keep_freed_memory
from batchnorm.lab.timing import time_interleaved, wall_and_cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"
BATCH, SIZE, CLASSES = 8, 96, 1000
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
REPS, WARMUP = 9, 3  # a short run (about 30 s): the machine is shared
#: The BN layers alone take a tenth of a step: more calls for the same time.
BN_LAYER_REPS_PER_STEP = 3

# --------------------------------------------------------------------------- building blocks


class ConvBN(nn.Module):
    """Conv -> BN -> activation, with an optional residual added before the activation.
    ``fused``: one BatchNormAct2d does BN, residual and activation."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int, act: str | None, fused: bool,
        groups: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.fused = fused
        self.activation = act
        if fused:
            self.bn = batchnorm.BatchNormAct2d(cout, activation=act)
            self.act = None
        else:
            self.bn = nn.BatchNorm2d(cout)
            self.act = {None: None, "relu": nn.ReLU(inplace=True),
                        "silu": nn.SiLU(inplace=True)}[act]  # fmt: skip

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.normalize(self.conv(x), residual)

    def normalize(self, y: Tensor, residual: Tensor | None = None) -> Tensor:
        """What follows the conv: BN, residual, activation (the part the contenders differ in)."""
        if self.fused:
            return self.bn(y, residual)
        y = self.bn(y)
        if residual is not None:
            y = y + residual
        return y if self.act is None else self.act(y)


class Head(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------- resnet18


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, fused: bool) -> None:
        super().__init__()
        self.a = ConvBN(cin, cout, 3, stride, "relu", fused)
        self.b = ConvBN(cout, cout, 3, 1, "relu", fused)  # relu(bn(conv) + shortcut)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = ConvBN(cin, cout, 1, stride, None, fused)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.down is None else self.down(x)
        return self.b(self.a(x), shortcut)


def resnet18(fused: bool = False) -> nn.Module:
    layers: list[nn.Module] = [ConvBN(3, 64, 7, 2, "relu", fused), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride, fused), BasicBlock(cout, cout, 1, fused)]
        cin = cout
    return nn.Sequential(*layers, Head(cin))


# --------------------------------------------------------------------------- mobilenet_v2


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise kxk -> project 1x1 (no activation) [+ input]."""

    def __init__(
        self, cin: int, cout: int, stride: int, expand: int, k: int, act: str, fused: bool,
        se: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        hidden = cin * expand
        self.expand = ConvBN(cin, hidden, 1, 1, act, fused) if expand != 1 else None
        self.depthwise = ConvBN(hidden, hidden, k, stride, act, fused, groups=hidden)
        self.se = SqueezeExcite(hidden, max(1, cin // 4)) if se else None
        self.project = ConvBN(hidden, cout, 1, 1, None, fused)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y)
        return self.project(y, x if self.residual else None)


def mobilenet_v2(fused: bool = False) -> nn.Module:
    layers: list[nn.Module] = [ConvBN(3, 32, 3, 2, "relu", fused)]
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, 3, "relu", fused))
            cin = c
    return nn.Sequential(*layers, ConvBN(cin, 1280, 1, 1, "relu", fused), Head(1280))


# --------------------------------------------------------------------------- efficientnet_b0


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


def efficientnet_b0(fused: bool = False) -> nn.Module:
    layers: list[nn.Module] = [ConvBN(3, 32, 3, 2, "silu", fused)]
    cin = 32
    for expand, k, stride, cout, n in ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2),
                                       (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
                                       (6, 3, 1, 320, 1)):  # fmt: skip
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand, k,
                                           "silu", fused, se=True))  # fmt: skip
            cin = cout
    return nn.Sequential(*layers, ConvBN(cin, 1280, 1, 1, "silu", fused), Head(1280))


MODELS: dict[str, Callable[[bool], nn.Module]] = {
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_b0": efficientnet_b0,
}


# --------------------------------------------------------------------------- measurement


def contenders(name: str) -> dict[str, nn.Module]:
    """torch.nn's BN, ours (converted), ours fused: the same weights and statistics."""
    torch.manual_seed(0)
    reference = MODELS[name](False)
    ours = batchnorm.convert(MODELS[name](False))
    ours.load_state_dict(reference.state_dict())
    fused = MODELS[name](True)
    fused.load_state_dict(reference.state_dict())  # the activations have no state
    return {"torch.nn": reference, "batchnorm": ours, "batchnorm fused": fused}


def training_step(model: nn.Module, x: Tensor, target: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), target).backward()


def _median_ms(samples: list[tuple[float, float, int]], which: int) -> float:
    return round(1e3 * statistics.median(s[which] for s in samples), 2)


def _timed_with_faults(run: Callable[[], object]) -> tuple[float, float, int]:
    """(wall seconds, thread CPU seconds, minor page faults) of one call of ``run``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = wall_and_cpu_seconds(run)
    return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


ALLOCATORS = ("glibc default", "glibc, memory kept")


def _add_ratios(row: dict) -> str:
    """Adds the contenders' CPU time / torch.nn's to ``row``; returns them as a line."""
    base = row["torch.nn cpu_ms"]
    row["batchnorm / torch.nn (cpu)"] = round(row["batchnorm cpu_ms"] / base, 3)
    row["fused / torch.nn (cpu)"] = round(row["batchnorm fused cpu_ms"] / base, 3)
    return (
        f"cpu ms: torch.nn {base:8.2f}  batchnorm {row['batchnorm cpu_ms']:8.2f} "
        f"({row['batchnorm / torch.nn (cpu)']:.2f}x)  fused {row['batchnorm fused cpu_ms']:8.2f} "
        f"({row['fused / torch.nn (cpu)']:.2f}x)"
    )


def _measure(models: list[str], allocator: str, reps: int, warmup: int) -> list[dict]:
    """The rows of every (model, layout) under the current allocator setting."""
    rows = []
    for name in models:
        nets = contenders(name)
        bn_layers = sum(isinstance(m, nn.BatchNorm2d) for m in nets["torch.nn"].modules())
        for layout, memory_format in LAYOUTS.items():
            g = torch.Generator().manual_seed(1)
            x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
            x = x.contiguous(memory_format=memory_format)
            target = torch.randint(0, CLASSES, (BATCH,), generator=g)
            for net in nets.values():
                net.to(memory_format=memory_format).train()
            with torch.no_grad():  # same function: eval-mode outputs agree
                outputs = [net.eval()(x) for net in nets.values()]
                difference = max((o - outputs[0]).abs().max().item() for o in outputs)
            for net in nets.values():
                net.train()
            runs = {k: partial(training_step, net, x, target) for k, net in nets.items()}
            times = time_interleaved(runs, reps=reps, warmup=warmup, measure=_timed_with_faults)
            row = {"model": name, "layout": layout, "allocator": allocator,
                   "bn_layers": bn_layers, "max_output_difference": difference}  # fmt: skip
            for contender, samples in times.items():
                row[f"{contender} wall_ms"] = _median_ms(samples, 0)
                row[f"{contender} cpu_ms"] = _median_ms(samples, 1)
                row[f"{contender} page_faults"] = round(statistics.mean(s[2] for s in samples))
            print(f"{allocator:19s} {name:16s} {layout:13s} {_add_ratios(row)}", flush=True)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- BN layers alone


def bn_calls(model: nn.Module, x: Tensor) -> list[tuple[str, torch.Size, bool]]:
    """(name, conv output shape, residual given) of every ConvBN call of ``model(x)``."""
    calls: list[tuple[str, torch.Size, bool]] = []
    hooks = [
        layer.register_forward_hook(
            lambda _, args, out, name=name: calls.append(
                (name, out.shape, len(args) > 1 and args[1] is not None)
            )
        )
        for name, layer in model.named_modules()
        if isinstance(layer, ConvBN)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def bn_layers_training(layers: list[ConvBN], inputs: list[tuple[Tensor, Tensor | None]],
                       grads: list[Tensor]) -> None:  # fmt: skip
    """Forward and backward of each layer's BN part (BN, residual, activation) on its input."""
    outputs = []
    for layer, (y, residual) in zip(layers, inputs, strict=True):
        y.grad = None
        if residual is not None:
            residual.grad = None
        outputs.append(layer.normalize(y, residual))
    torch.autograd.backward(outputs, grads)


def bn_layers_eval(layers: list[ConvBN], inputs: list[tuple[Tensor, Tensor | None]]) -> None:
    with torch.no_grad():
        for layer, (y, residual) in zip(layers, inputs, strict=True):
            layer.normalize(y, residual)


def _measure_bn_layers(models: list[str], allocator: str, reps: int, warmup: int) -> list[dict]:
    """The rows of every (model, layout, mode) for the models' BN layers alone: each
    ConvBN's BN part on an input of its conv's output shape, in the model's call order."""
    rows = []
    for name in models:
        nets = contenders(name)
        for layout, memory_format in LAYOUTS.items():
            g = torch.Generator().manual_seed(2)

            def tensor(shape: torch.Size, memory_format=memory_format, g=g) -> Tensor:
                return torch.randn(shape, generator=g).contiguous(memory_format=memory_format)

            for net in nets.values():
                net.to(memory_format=memory_format).eval()
            calls = bn_calls(nets["torch.nn"], tensor((BATCH, 3, SIZE, SIZE)))
            layers = {k: [net.get_submodule(n) for n, _, _ in calls] for k, net in nets.items()}
            inputs = [
                (tensor(shape).requires_grad_(), tensor(shape).requires_grad_() if res else None)
                for _, shape, res in calls
            ]
            grads = [tensor(shape) for _, shape, _ in calls]
            with torch.no_grad():  # same function: eval-mode outputs agree
                outputs = {
                    k: [m.normalize(y, r) for m, (y, r) in zip(ms, inputs, strict=True)]
                    for k, ms in layers.items()
                }
                difference = max(
                    (o - r).abs().max().item()
                    for out in outputs.values()
                    for o, r in zip(out, outputs["torch.nn"], strict=True)
                )
            for mode, step in (("training", bn_layers_training), ("eval", bn_layers_eval)):
                for net in nets.values():
                    net.train(mode == "training")
                extra = (grads,) if mode == "training" else ()
                runs = {k: partial(step, ms, inputs, *extra) for k, ms in layers.items()}
                times = time_interleaved(runs, reps=reps, warmup=warmup,
                                         measure=_timed_with_faults)  # fmt: skip
                row = {"model": name, "layout": layout, "mode": mode, "allocator": allocator,
                       "bn_calls": len(calls), "values": sum(s.numel() for _, s, _ in calls),
                       "max_output_difference": difference}  # fmt: skip
                for contender, samples in times.items():
                    row[f"{contender} cpu_ms"] = _median_ms(samples, 1)
                print(f"BN layers alone {name:16s} {layout:13s} {mode:8s} {_add_ratios(row)}",
                      flush=True)  # fmt: skip
                rows.append(row)
    return rows


def _layout_label(layout: str) -> str:
    return "NCHW" if layout == "nchw" else layout


def steps_table(result: dict) -> str:
    """The Markdown table of the training steps that the performance page quotes: a row per
    model and layout, glibc's default allocator, then memory kept (where measured)."""
    by_key = {(r["model"], r["layout"], r["allocator"]): r for r in result["results"]}
    lines = [
        "| model | layout | torch.nn (ms, CPU) | batchnorm / torch.nn | fused / torch.nn "
        "| memory kept: torch.nn (ms) | batchnorm / torch.nn | fused / torch.nn |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, layout, allocator), row in by_key.items():
        if allocator != ALLOCATORS[0]:
            continue
        cells = [model, _layout_label(layout)]
        for kept in (row, by_key.get((model, layout, ALLOCATORS[1]))):
            if kept is None:
                cells += ["", "", ""]
                continue
            cells += [f"{kept['torch.nn cpu_ms']:.1f}", f"{kept['batchnorm / torch.nn (cpu)']:.2f}",
                      f"{kept['fused / torch.nn (cpu)']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bn_layers_table(result: dict) -> str:
    """The Markdown table of the BN layers alone that the performance page quotes."""
    lines = [
        "| model | layout | mode | BN calls | torch.nn (ms, CPU) | batchnorm / torch.nn "
        "| fused / torch.nn |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["bn_layers"]:
        lines.append(
            f"| {r['model']} | {_layout_label(r['layout'])} | {r['mode']} | {r['bn_calls']} "
            f"| {r['torch.nn cpu_ms']:.2f} | {r['batchnorm / torch.nn (cpu)']:.2f} "
            f"| {r['fused / torch.nn (cpu)']:.2f} |"
        )
    return "\n".join(lines)


def run(out: Path | None = RESULTS, reps: int = REPS, warmup: int = WARMUP,
        models: list[str] | None = None) -> dict:  # fmt: skip
    """Measure every (model, layout); return the JSON-ready results and write them to
    ``out`` (unless None)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    started = time.time()
    rows = []
    try:
        for allocator in ALLOCATORS:
            if allocator != ALLOCATORS[0] and not keep_freed_memory():
                print(f"skipped {allocator!r}: no glibc mallopt here")
                continue
            rows += _measure(models or list(MODELS), allocator, reps, warmup)
            applied = allocator
        # after both settings: memory kept where glibc allows it (the computations alone)
        bn_layer_rows = _measure_bn_layers(models or list(MODELS), applied,
                                           BN_LAYER_REPS_PER_STEP * reps, warmup)  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    result = {
        "benchmark": "training step (forward + cross-entropy + backward), medians of "
        "interleaved calls",
        "input": f"batch {BATCH}, 3x{SIZE}x{SIZE}",
        "threads": 1,
        "reps": reps,
        "warmup": warmup,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared)",
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.time() - started, 1),
        "notes": "mobilenet_v2 with ReLU instead of ReLU6; efficientnet_b0 without stochastic "
        "depth. Ratios below 1: faster than torch.nn.",
        "results": rows,
        "bn_layers_benchmark": "the same models' BN layers alone: each conv's BN, residual and "
        "activation on an input of the conv's output shape, forward + backward (training) or "
        f"forward without autograd (eval); medians of {BN_LAYER_REPS_PER_STEP * reps} "
        "interleaved calls of all the layers",
        "bn_layers": bn_layer_rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=RESULTS, help="the JSON file")
    parser.add_argument("--reps", type=int, default=REPS, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps first")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    args = parser.parse_args()
    run(args.out, args.reps, args.warmup, args.models.split(","))
