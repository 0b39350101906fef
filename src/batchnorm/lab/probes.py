"""Probes: hooks that watch a model while :func:`batchnorm.lab.fit.fit` trains it.

They work on any ``nn.Module`` (ours or ``torch.nn``'s, CPU or CUDA) and name layers by
their path in the model (``model.get_submodule(path)``). The loop calls

* :meth:`Probe.after_step` after every optimizer step,
* :meth:`Probe.before_eval` / :meth:`Probe.after_eval` around every evaluation on the test
  set (the model is in eval mode there).

Recorded values stay on the model's device until :meth:`Probe.result`, so a probe adds no
host-device synchronisation to the training steps. Loss and accuracy curves are recorded by
the loop itself (:class:`batchnorm.lab.fit.History`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: The percentiles Ioffe & Szegedy (2015, Figure 1) plot for a sigmoid's input.
IOFFE_QUANTILES = (0.15, 0.50, 0.85)


class Probe:
    """Base class: a no-op for every event of the training loop."""

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model``."""

    def detach(self) -> None:
        """Remove the hooks (the recorded values stay): those a subclass keeps in
        ``self._handles``."""
        handles = getattr(self, "_handles", [])
        while handles:
            handles.pop().remove()

    def before_step(self, step: int, x: Tensor, y: Tensor) -> None:
        """Called before optimizer step number ``step`` (1-based) with its mini-batch."""

    def after_step(self, step: int) -> None:
        """Called after optimizer step number ``step`` (1-based)."""

    def before_eval(self, step: int) -> None:
        """Called before the evaluation that follows step ``step`` (0: before training)."""

    def after_eval(self, step: int) -> None:
        """Called after that evaluation."""

    def result(self) -> dict[str, Any]:
        """What was recorded, as plain Python lists (JSON-ready)."""
        return {}


def _resolve(model: nn.Module, layers: Mapping[str, str]) -> dict[str, nn.Module]:
    modules = {}
    for label, path in layers.items():
        try:
            modules[label] = model.get_submodule(path)
        except AttributeError:
            names = [name for name, _ in model.named_modules() if name]
            raise ValueError(
                f"probe layer {label!r}: the model has no submodule {path!r}; its submodules "
                f"are {names}."
            ) from None
    return modules


class ActivationQuantiles(Probe):
    """Quantiles of the values entering (``of="input"``) or leaving (``of="output"``) chosen
    layers, measured on the test set at every evaluation.

    ``layers`` maps a label to a module path, e.g. ``{"sigmoid input": "8"}``: the input
    of a nonlinearity is its pre-activation. With ``per_unit=False`` the quantiles pool all
    units of the layer; with ``per_unit=True`` they are taken per unit (feature), as Ioffe &
    Szegedy (2015) do for "a typical sigmoid".

    ``result()``: ``{"quantiles": [...], "steps": [...], "layers": {label: values}}`` where
    ``values[i][j]`` is quantile j at evaluation i (a list over units when ``per_unit``).
    """

    def __init__(
        self,
        layers: Mapping[str, str],
        quantiles: Sequence[float] = IOFFE_QUANTILES,
        of: str = "input",
        per_unit: bool = False,
    ) -> None:
        if of not in ("input", "output"):
            raise ValueError(f"ActivationQuantiles: of must be 'input' or 'output', got {of!r}.")
        if not quantiles or not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"ActivationQuantiles: quantiles must lie in [0, 1], got {quantiles}.")
        self.layers = dict(layers)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.of = of
        self.per_unit = per_unit
        self.steps: list[int] = []
        self.values: dict[str, list[np.ndarray]] = {label: [] for label in self.layers}
        self._handles: list[RemovableHandle] = []
        self._buffers: dict[str, list[Tensor]] | None = None  # set while recording

    def attach(self, model: nn.Module) -> None:
        for label, module in _resolve(model, self.layers).items():
            if self.of == "input":
                hook = module.register_forward_pre_hook(self._input_hook(label))
            else:
                hook = module.register_forward_hook(self._output_hook(label))
            self._handles.append(hook)

    def _record(self, label: str, value: Tensor) -> None:
        if self._buffers is not None:
            # (N, C, *) -> (N * *, C): one row per sample (and position), one column per unit.
            flat = value.detach().transpose(0, 1).reshape(value.shape[1], -1).T
            self._buffers[label].append(flat)

    def _input_hook(self, label: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._record(label, args[0])

        return hook

    def _output_hook(self, label: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._record(label, output)

        return hook

    def before_eval(self, step: int) -> None:
        self._buffers = {label: [] for label in self.layers}

    def after_eval(self, step: int) -> None:
        buffers, self._buffers = self._buffers, None
        if buffers is None or not any(buffers.values()):
            return
        self.steps.append(step)
        for label, chunks in buffers.items():
            values = torch.cat(chunks).float().cpu().numpy()
            # numpy's quantile has no input-size limit (torch.quantile stops at 2**24).
            q = np.quantile(values if self.per_unit else values.ravel(), self.quantiles, axis=0)
            self.values[label].append(q)

    def result(self) -> dict[str, Any]:
        return {
            "quantiles": list(self.quantiles),
            "of": self.of,
            "per_unit": self.per_unit,
            "steps": list(self.steps),
            "layers": {label: [q.tolist() for q in v] for label, v in self.values.items()},
        }


class GradientNorms(Probe):
    """The L2 norm of each layer's parameter gradient (all its parameters together), at
    every optimizer step.

    ``layers`` maps a label to a module path; by default every module that owns parameters,
    labelled ``"<path> <ClassName>"`` (e.g. ``"0 Linear"``). The norms are taken with
    ``Tensor.register_post_accumulate_grad_hook``, right after backward fills each gradient.

    ``result()``: ``{"steps": [...], "layers": {label: [norm at each step]}}``.
    """

    def __init__(self, layers: Mapping[str, str] | None = None) -> None:
        self.layers = None if layers is None else dict(layers)
        self.steps: list[int] = []
        self._rows: list[Tensor] = []
        self._labels: list[str] = []
        self._sums: list[Tensor | None] = []
        self._handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        if self.layers is None:
            self.layers = {
                f"{path} {type(m).__name__}": path
                for path, m in model.named_modules()
                if any(True for _ in m.parameters(recurse=False))
            }
        modules = _resolve(model, self.layers)
        self._labels = list(modules)
        self._sums = [None] * len(self._labels)
        for index, module in enumerate(modules.values()):
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    self._handles.append(
                        param.register_post_accumulate_grad_hook(self._grad_hook(index))
                    )

    def _grad_hook(self, index: int):
        def hook(param: Tensor) -> None:
            squares = param.grad.detach().float().square().sum()
            total = self._sums[index]
            self._sums[index] = squares if total is None else total + squares

        return hook

    def after_step(self, step: int) -> None:
        sums = [s if s is not None else torch.zeros(()) for s in self._sums]
        device = next((s.device for s in self._sums if s is not None), None)
        self._rows.append(torch.stack([s.to(device) for s in sums]).sqrt())
        self.steps.append(step)
        self._sums = [None] * len(self._labels)

    def result(self) -> dict[str, Any]:
        table = torch.stack(self._rows).cpu().T.tolist() if self._rows else []
        return {
            "steps": list(self.steps),
            "layers": {label: table[i] if table else [] for i, label in enumerate(self._labels)},
        }
