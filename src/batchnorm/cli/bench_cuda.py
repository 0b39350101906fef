"""``batchnorm bench --device cuda``: batch norm on an NVIDIA GPU — ours against torch.nn
(cuDNN), float32 and under half precision (bfloat16, float16 inputs with float32
parameters, as torch.autocast gives them), NCHW and channels_last.

Measured, each case as the median of many calls timed with CUDA events, contenders
interleaved (:func:`batchnorm.lab.timing.time_interleaved`):

* ResNet-50's batch-norm shapes, (C, H) from (64, 112) to (2048, 7), at batch 32 and 128,
  and (N, C) = (8192, 4096);
* modes ``forward_train``, ``eval``, ``forward_backward`` and ``bn_relu_residual`` (forward +
  backward of act(BN(x) + z): our fused BatchNormAct against torch.nn's BN, add and ReLU);
* contenders ``torch`` (torch.nn's layer), ``ours`` (the default dispatch) and ``ours_<name>``
  for every other backend that computes on CUDA, forced (``aten``: torch.batch_norm behind
  our layer's Python; ``triton`` where it is installed);
* on CUDA also ``queued_s``: the time per call when calls follow one another without
  waiting (as in a training loop), where ``median_s`` waits for each call's end;
* the copy ``dst.copy_(x)`` of the same tensor, for the fraction of copy bandwidth under the
  traffic model of ``batchnorm bench`` (eval 2N, forward 3N, forward + backward 8N elements;
  12N with the residual, which is read in both passes and whose gradient is written);
* an end-to-end training step (forward, backward, SGD) of ResNet-50-like
  (:func:`batchnorm.example_models.resnet50_like`) at batch 64, 224x224, channels_last,
  bf16 autocast: torch.nn, ours converted, ours with BatchNormAct fused, each of ours also
  with the Triton backend forced;
* peak activation memory of 8 Conv -> BN -> LeakyReLU blocks: torch.nn against
  InPlaceBatchNormAct2d (``torch.cuda.max_memory_allocated``);
* the accuracy of every contender's float32 training forward + backward against float64 on
  inputs of mean 3 and 1e4 (on CPU, ATen's channels-last and (N, C) sums lose digits
  there: a dispatch rule must know whether the GPU's do).

Every contender's output is first checked against torch's (largest error recorded).
``quick`` runs small shapes on any device, so that the script itself is tested on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import batchnorm
from batchnorm import example_models, ops
from batchnorm.backends import Call
from batchnorm.lab.timing import time_interleaved

#: ResNet-50's BN (channels, height): the stem, and each stage's widest and narrowest.
RESNET50_BN = [(64, 112), (256, 56), (128, 28), (512, 28), (1024, 14), (2048, 7)]
BATCHES = (32, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("forward_train", "eval", "forward_backward", "bn_relu_residual")
#: Minimal traffic in elements of the input's size (see the module docstring).
TRAFFIC = {"eval": 2, "forward_train": 3, "forward_backward": 8, "bn_relu_residual": 12}
#: Seconds of timed calls per contender and case: CUDA events time each call exactly, and
#: the whole full run must fit a lent GPU session (about 300 cases).
BUDGET = {"full": 0.05, "quick": 0.02}
REPS = {"full": (10, 300), "quick": (2, 5)}


def _shapes(quick: bool) -> list[tuple[str, tuple[int, ...]]]:
    if quick:
        return [("(4,8,6,6)", (4, 8, 6, 6)), ("(16,8)", (16, 8))]
    shapes = [(f"({n},{c},{h},{h})", (n, c, h, h)) for n in BATCHES for c, h in RESNET50_BN]
    return shapes + [("(8192,4096)", (8192, 4096))]


def _seconds(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """One call's time: CUDA events on a GPU (the kernels' own time), else wall clock."""
    if device.type != "cuda":
        from batchnorm.lab.timing import wall_seconds

        return wall_seconds

    return _event_seconds


def _event_seconds(run: Callable[[], Any], calls: int = 1) -> float:
    """Seconds per call of ``calls`` calls of ``run`` in a row, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _layers(channels: int, rank: int, activation: str | None, device) -> dict:
    """torch.nn's layer and ours (float32 parameters, as under autocast), same state."""
    torch_cls = nn.BatchNorm1d if rank == 2 else nn.BatchNorm2d
    ours_cls = batchnorm.BatchNormAct1d if rank == 2 else batchnorm.BatchNormAct2d
    theirs = torch_cls(channels, device=device)
    ours = ours_cls(channels, activation=activation, device=device)
    ours.load_state_dict(theirs.state_dict())
    return {"torch": theirs, "ours": ours}


def _case(mode: str, shape, dtype, channels_last: bool, device, budget, reps) -> dict:
    """Times of every contender on one (mode, shape, dtype, layout) case."""
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    z, dy = torch.randn_like(x), torch.randn_like(x)
    fused = mode == "bn_relu_residual"
    layers = _layers(shape[1], x.dim(), "relu" if fused else None, device)
    backward = mode in ("forward_backward", "bn_relu_residual")
    training = mode != "eval"
    backends = [b for b in ops.available_backends(device.type) if b != "reference"]

    def runner(name: str, backend: str | None) -> Callable[[], Tensor]:
        layer = layers["torch" if name == "torch" else "ours"].train(training)

        def call() -> Tensor:
            xin = x.detach().requires_grad_(backward)
            if name == "torch":
                y = layer(xin)
                y = (y + z).relu() if fused else y
            elif fused:
                y = layer(xin, z)
            else:
                y = layer(xin)
            if backward:
                y.backward(dy)
                return xin.grad
            return y

        if backend is None:
            return call

        def forced() -> Tensor:
            with ops.use_backend(backend):
                return call()

        return forced

    with torch.no_grad():
        dst = torch.empty_like(x)
    runs = {"torch": runner("torch", None), "ours": runner("ours", None)}
    call = Call(x, training, "relu" if fused else "identity", 0.01, fused, False, True)
    runs |= {
        f"ours_{b}": runner("ours", b)
        for b in backends
        if ops.backend_named(b).supports(call)  # forced where it computes
    }
    expected = runs["torch"]().float()
    errors = {name: (run().float() - expected).abs().max().item() for name, run in runs.items()}
    runs["copy"] = lambda: dst.copy_(x)
    grad = torch.no_grad() if not backward else torch.enable_grad()
    with grad:
        times = time_interleaved(runs, budget=budget, bounds=reps, measure=_seconds(device))
        queued = _queued(runs, device)
    medians = {name: statistics.median(t) for name, t in times.items()}
    bytes_moved = TRAFFIC[mode] * x.numel() * x.element_size()
    copy_bytes = 2 * x.numel() * x.element_size()
    row = {
        "dispatch": ops.select(call).name,
        "median_s": medians,
        "max_error_vs_torch": errors,
        "speedup_vs_torch": _speedups(medians),
        "fraction_of_copy": {
            n: (bytes_moved / m) / (copy_bytes / medians["copy"])
            for n, m in medians.items()
            if n != "copy"
        },
    }
    if queued:
        row |= {"queued_s": queued, "queued_speedup_vs_torch": _speedups(queued)}
    return row


def _speedups(seconds: dict[str, float]) -> dict[str, float]:
    return {n: seconds["torch"] / t for n, t in seconds.items() if n != "copy"}


def _queued(runs: dict[str, Callable[[], Any]], device) -> dict[str, float]:
    """Seconds per call of each run when calls follow one another without waiting for the
    GPU (as in a training loop: the GPU's time when the CPU keeps ahead of it, the CPU's
    when it does not); median of 5 rounds of 10 calls (CUDA events). Empty off CUDA, where
    each call waits anyway."""
    if device.type != "cuda":
        return {}
    return {
        name: statistics.median(_event_seconds(run, 10) for _ in range(5))
        for name, run in runs.items()
    }


def _training_step(quick: bool, device, budget, reps) -> dict:
    """ResNet-50-like training steps under bf16 autocast, channels_last."""
    kwargs = {"width": 8, "classes": 10, "stages": (1, 1, 1, 1)} if quick else {}
    batch, size = (4, 32) if quick else (64, 224)
    torch.manual_seed(0)
    models = {
        "torch": example_models.resnet50_like(**kwargs),
        "ours": batchnorm.convert(example_models.resnet50_like(**kwargs)),
        "ours_fused": batchnorm.convert(example_models.resnet50_like(**kwargs, fused=True)),
    }
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    labels = torch.randint(0, 10 if quick else 1000, (batch,), device=device)
    forced = {name: None for name in models}
    if "triton" in ops.available_backends(device.type):
        forced |= {"ours_triton": "triton", "ours_fused_triton": "triton"}
    runs = {}
    for name, backend in forced.items():
        model = models[name.removesuffix("_triton")]
        model.to(device, memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, optimizer=optimizer, backend=backend) -> None:
            with (
                torch.autocast(device.type, dtype=torch.bfloat16),
                ops.use_backend(backend, lenient=True) if backend else contextlib.nullcontext(),
            ):
                loss = nn.functional.cross_entropy(model(x), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()

        runs[name] = step
    times = time_interleaved(runs, budget=budget * 10, bounds=reps, measure=_seconds(device))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "shape": [batch, 3, size, size],
        "median_s": medians,
        "speedup_vs_torch": _speedups(medians),
    }


def _inplace_memory(quick: bool, device) -> dict:
    """Peak memory of a forward + backward through 8 Conv -> BN -> LeakyReLU blocks."""
    channels, batch, size = (8, 4, 16) if quick else (128, 64, 56)

    def blocks(inplace: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(8):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
            if inplace:
                layers.append(batchnorm.InPlaceBatchNormAct2d(channels))
            else:
                layers += [nn.BatchNorm2d(channels), nn.LeakyReLU(0.01)]
        return nn.Sequential(*layers).to(device)

    peaks = {}
    for name, inplace in (("torch", False), ("ours_inplace", True)):
        model = blocks(inplace)
        x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        model(x).sum().backward()
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated() - start
    if not peaks:
        return {"measured": False, "reason": "peak memory is measured on CUDA only"}
    return {
        "measured": True,
        "peak_bytes": peaks,
        "saving": 1 - peaks["ours_inplace"] / peaks["torch"],
    }


def _accuracy(quick: bool, device) -> list[dict]:
    """Largest error of y and dx, relative to the exact tensor's largest magnitude, of each
    contender's float32 training forward + backward, against torch.nn in float64."""
    shapes = (
        [((256, 16), False), ((4, 8, 6, 6), True)]
        if quick
        else [((32768, 128), False), ((32, 128, 32, 32), True), ((32, 128, 32, 32), False)]
    )
    rows = []
    for shape, channels_last in shapes:
        for mean in (3.0, 1e4):
            g = torch.Generator().manual_seed(0)
            x64 = (torch.randn(shape, generator=g, dtype=torch.float64) + mean).to(device)
            dy64 = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
            if channels_last:
                x64 = x64.contiguous(memory_format=torch.channels_last)
            x64 = x64.float().double()  # both sides see the same float32 values
            exact = _train_grad(_layers(shape[1], x64.dim(), None, device)["torch"].double(),
                                x64, dy64)  # fmt: skip
            contenders = {"torch": None, "ours": None}
            contenders |= {f"ours_{b}": b for b in ops.available_backends(device.type)}
            errors = {}
            for name, backend in contenders.items():
                layers = _layers(shape[1], x64.dim(), None, device)
                layer = layers["torch" if name == "torch" else "ours"]
                with ops.use_backend(backend) if backend else contextlib.nullcontext():
                    got = _train_grad(layer, x64.float(), dy64.float())
                errors[name] = [((a.double() - b).abs().max() / b.abs().max()).item()
                                for a, b in zip(got, exact, strict=True)]  # fmt: skip
            rows.append({"shape": list(shape), "channels_last": channels_last, "mean": mean,
                         "relative_error_y_dx": errors})  # fmt: skip
    return rows


def _train_grad(layer: nn.Module, x: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().requires_grad_()
    y = layer.train()(x)
    y.backward(dy)
    return y.detach(), x.grad


def run(
    device: str = "cuda", quick: bool = False, on_part: Callable[[str, Any], None] | None = None
) -> dict:
    """Every case on ``device``; a dict ready for JSON. ``on_part(key, value)`` is called
    with each part as soon as it is measured (each case row under "cases"), so that a run
    cut short by a time limit still leaves what it measured."""
    dev = torch.device(device)
    level = "quick" if quick else "full"
    budget, reps = BUDGET[level], REPS[level]
    report = on_part or (lambda key, value: None)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else device,
        "torch": torch.__version__,
        "backends": ops.available_backends(dev.type),
        "level": level,
    }
    for key, value in results.items():
        report(key, value)
    # the headline parts first, then the cases, float16 last
    headline = {
        "accuracy": lambda: _accuracy(quick, dev),
        "training_step": lambda: _training_step(quick, dev, budget, reps),
        "inplace_memory": lambda: _inplace_memory(quick, dev),
    }
    for key, measure in headline.items():
        results[key] = measure()
        report(key, results[key])
    results["cases"] = []
    for dtype in DTYPES:
        for label, shape in _shapes(quick):
            for channels_last in (False, True) if len(shape) == 4 else (False,):
                for mode in MODES:
                    row = _case(mode, shape, dtype, channels_last, dev, budget, reps)
                    layout = "channels_last" if channels_last else "contiguous"
                    row = {"shape": label, "dtype": str(dtype), "layout": layout, "mode": mode,
                           **row}  # fmt: skip
                    results["cases"].append(row)
                    report("cases", row)
    return results


def summary(results: dict) -> str:
    """The results as the Markdown tables the performance page quotes: per dtype, layout and
    mode over the shapes, torch.nn's time / ours (one call at a time, and queued), the same
    for the Triton kernels forced, and the largest fraction of copy bandwidth; then the
    training step, the in-place memory and the accuracy probe."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in results["cases"]:
        groups.setdefault((row["dtype"], row["layout"], row["mode"]), []).append(row)

    def spread(values: list[float]) -> str:
        return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"

    lines = [
        "| dtype | layout | mode | ours: min / median / max | ours queued: median "
        "| Triton forced: min / max | of copy, max: ours / torch.nn |",
        "|---|---|---|---|---|---|---|",
    ]
    for (dtype, layout, mode), rows in groups.items():
        ours = [r["speedup_vs_torch"]["ours"] for r in rows]
        queued = [r["queued_speedup_vs_torch"]["ours"] for r in rows if "queued_s" in r]
        triton = [r["speedup_vs_torch"]["ours_triton"] for r in rows
                  if "ours_triton" in r["speedup_vs_torch"]]  # fmt: skip
        copy = [max(r["fraction_of_copy"][n] for r in rows) for n in ("ours", "torch")]
        queued_cell = f"{statistics.median(queued):.2f}" if queued else ""
        triton_cell = f"{min(triton):.2f} / {max(triton):.2f}" if triton else ""
        lines.append(
            f"| {dtype.removeprefix('torch.')} | {layout} | {mode} | {spread(ours)} "
            f"| {queued_cell} | {triton_cell} | {copy[0]:.0%} / {copy[1]:.0%} |"
        )
    step = results["training_step"]
    lines += ["", "| training step | ms | torch.nn / it |", "|---|---|---|"]
    for name, seconds in step["median_s"].items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {step['speedup_vs_torch'][name]:.2f} |")
    memory = results["inplace_memory"]
    if memory["measured"]:
        lines += ["", f"InPlaceBatchNormAct2d peak memory: {memory['saving']:.0%} below torch.nn's "
                  f"({memory['peak_bytes']['ours_inplace'] / 2**20:.0f} MiB against "
                  f"{memory['peak_bytes']['torch'] / 2**20:.0f} MiB)."]  # fmt: skip
    names = list(results["accuracy"][0]["relative_error_y_dx"])
    lines += ["", "| input | mean | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in results["accuracy"]:
        layout = "channels_last" if row["channels_last"] else "contiguous"
        errors = row["relative_error_y_dx"]
        cells = " | ".join(f"{errors[n][0]:.1e}, {errors[n][1]:.1e}" for n in names)
        lines.append(f"| {tuple(row['shape'])} {layout} | {row['mean']:g} | {cells} |")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace, out_folder: Path) -> int:
    """``batchnorm bench --device cuda``: the run, its JSON (``--out``, default
    cuda_bench[_quick].json in ``out_folder``) and its summary."""
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise SystemExit(f"batchnorm bench: --device {args.device!r}: {error}") from None
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(
            f"batchnorm bench: --device {args.device!r}: expected cpu or an available CUDA "
            f"device (torch.cuda.is_available() is {torch.cuda.is_available()})."
        )
    suffix = "_quick" if args.quick else ""
    out = Path(args.out or out_folder / f"cuda_bench{suffix}.json")
    results = run(args.device, quick=args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(summary(results))
    print(f"\nwritten to {out}")
    return 0
