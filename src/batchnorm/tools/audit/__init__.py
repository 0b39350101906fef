"""Audit the batch norm of a trained model on data: what is wrong, how we know, and the line
of code that fixes it.

:func:`audit` runs the model over the data and measures, for every batch-norm layer
(``torch.nn``'s, this package's, SyncBatchNorm, frozen ones):

* **stale running statistics**: the running mean/variance against the exact statistics
  of the data at the layer (as :func:`batchnorm.recalibrate` computes them), and, with
  labels, the metric the model gets with its running statistics and with recalibrated
  ones (on a deep copy);
* **noisy batch statistics**: how far each batch's mean and variance wander from the
  population's, as a number of effective values per channel;
* **mode traps**: BN in training mode inside an eval model, frozen weights whose
  statistics still update, ``track_running_stats=False`` in eval, momentum 0/None/1,
  statistics never updated;
* **wasted parameters and speed**: biases cancelled by the BN after them, the layers
  :func:`batchnorm.fold` removes with the eval speed-up measured, BN + activation pairs
  that ``BatchNormAct`` fuses;
* **numerical hazards**: NaN/Inf/non-positive ``running_var``, ``eps`` lost in float16,
  dead channels (``|weight| ≈ 0``), channels whose input never varies;
* **DDP without SyncBatchNorm** where the per-process batch gives noisy statistics.

The model is left exactly as it was — parameters, buffers and training modes, also when
the data or the model raises midway: the one pass that needs BN layers in training mode
runs on the model itself between a snapshot and its restoration; everything else runs on
copies. The result is an :class:`AuditReport` (printable, ``to_json``, ``to_html``).
"""

from __future__ import annotations

import copy
import math
import operator
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn import dims_of, flavour_of
from batchnorm.reference import batch_stats
from batchnorm.tools.affine import LAYERS, is_batchnorm_like
from batchnorm.tools.fold import _sequential_chains, _Tracer, fold
from batchnorm.tools.recalibrate import recalibrate

#: Severities, worst first.
SEVERITIES = ("error", "warning", "info")

# ------------------------------------------------------------------------- thresholds
#: Stale statistics: the root-mean-square over channels of |running_mean - mean| / sqrt(var
#: + eps). A trained model's momentum average stays within a few hundredths of the data's
#: (the demo's model: 0.02 on its training set, 0.04 on its test set); 0.2 shifts every
#: channel by a fifth of its spread, 0.5 by half, which changes what the next layer sees.
STALE_GAP_WARNING = 0.2
STALE_GAP_ERROR = 0.5
#: ... and of |log((running_var + eps) / (var + eps))|: the demo's model is at 0.04-0.1;
#: a factor 1.5 (log 0.41) rescales every channel by 20 %, a factor 3 by 42 % or 73 %.
STALE_LOG_VAR_WARNING = math.log(1.5)
STALE_LOG_VAR_ERROR = math.log(3.0)
#: Metric recovered by recalibration (accuracy as a fraction, or the loss's relative
#: decrease): the demo's model, trained normally, gains 0.3-0.6 points (info); from 1 point
#: recalibrating is worth doing, from 3 the model is clearly held back.
GAIN_WARNING = 0.01
GAIN_ERROR = 0.03
#: Noisy batch statistics, in effective values per channel and batch, m_eff = 1 / noise²,
#: where noise is the measured spread of (batch mean - mean) / std (m_eff = m for
#: independent values, fewer when values within a batch are correlated, as pixels are).
#: Below 32 the batch mean is off by more than 1/sqrt(32) = 0.18 standard deviations and
#: the variance by more than sqrt(2/31) = 25 % in a typical batch, so training normalizes
#: with statistics the running ones (used at inference) do not match; Wu & He (Group
#: Normalization, 2018, Fig. 1) see ResNet-50's ImageNet error with BN grow by about 11
#: points as the batch per device shrinks from 32 images to 2. Below 8 (0.35 std) the
#: training signal itself is mostly batch noise.
NOISY_VALUES_WARNING = 32
NOISY_VALUES_ERROR = 8
#: Batches needed to measure the spread of batch statistics at all.
MIN_NOISE_BATCHES = 4
#: Batches of this many samples or more make batch statistics almost noiseless, and lose
#: the regularizing noise of smaller ones (Hoffer et al., 2017): Ghost BN brings it back.
GHOST_BATCH_SIZE = 1024
#: Dead channel: |weight| below this fraction of the layer's median |weight| (or 0): the
#: channel outputs its bias, a constant, whatever the input.
DEAD_WEIGHT = 1e-3
#: Share of a layer's channels with (almost) constant input above which it is a warning; a
#: few dead ReLU units before a BN are common and cost only their channels.
CONSTANT_SHARE_WARNING = 0.25
#: float16/bfloat16 layers: eps must survive ``var + eps`` at var = 1, i.e. be at least
#: half a unit in the last place of 1 (float16 has 10 mantissa bits, bfloat16 7). The
#: value suggested instead (Keras' default for float16 is 1e-3).
MIN_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SAFE_EPS = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
#: How many of the worst channels a finding names.
WORST_CHANNELS = 3
#: Fold timing: repetitions (the fastest is reported) and the time one repetition lasts at
#: least (calls are repeated within it, so fast models are timed well above the clock's
#: resolution).
TIMING_REPEATS = 5
TIMING_MIN_SECONDS = 0.01
#: Batches taken from the data by default, and the batch size a tensor is cut into.
DEFAULT_NUM_BATCHES = 100
DEFAULT_BATCH_SIZE = 100


# ------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Finding:
    """One problem (or fact) found: its ``severity`` ("error", "warning", "info"), the
    ``check`` that found it, the ``layer`` (module name; None for the whole model), a
    ``message`` with the measured evidence, the ``fix`` as a line of code (the model is
    called ``model``, the data ``loader``) and the ``evidence`` as numbers."""

    severity: str
    check: str
    layer: str | None
    message: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerAudit:
    """What the audit measured at one batch-norm layer. Per-channel lists are None where
    the layer has no such statistics (``track_running_stats=False``, no data)."""

    name: str
    kind: str
    channels: int
    dtype: str
    eps: float
    momentum: float | None
    training: bool
    tracks_running_stats: bool
    batches: int = 0
    values_per_batch: int | None = None
    running_mean: list[float] | None = None
    running_var: list[float] | None = None
    mean: list[float] | None = None
    var: list[float] | None = None
    #: |running_mean - mean| / sqrt(var + eps) and log((running_var + eps) / (var + eps)).
    gap: list[float] | None = None
    log_var_ratio: list[float] | None = None
    gap_rms: float | None = None
    log_var_ratio_rms: float | None = None
    #: Spread of the batch statistics around the population's (standardized mean, log var).
    noise_mean: float | None = None
    noise_var: float | None = None
    effective_values: float | None = None


@dataclass
class AuditReport:
    """What :func:`audit` found: ``findings`` (worst first), the per-layer measurements
    ``layers``, the ``metric`` with running and recalibrated statistics (None without
    labels), the fold ``timing`` and the ``settings`` of the run.

    ``str(report)`` is a plain-text table; :meth:`print` a rich one; :meth:`to_json` and
    :meth:`to_html` write ``audit.json`` and a self-contained page with a plot per layer.
    """

    findings: list[Finding]
    layers: list[LayerAudit]
    metric: dict[str, Any] | None
    timing: dict[str, Any] | None
    settings: dict[str, Any]

    def select(
        self, check: str | None = None, layer: str | None = None, severity: str | None = None
    ) -> list[Finding]:
        """The findings of a ``check``, at a ``layer``, of a ``severity`` (None: any)."""
        return [
            f
            for f in self.findings
            if (check is None or f.check == check)
            and (layer is None or f.layer == layer)
            and (severity is None or f.severity == severity)
        ]

    @property
    def worst(self) -> str | None:
        """The worst severity found, or None when there is no finding."""
        return self.findings[0].severity if self.findings else None

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (non-finite floats become None)."""
        from batchnorm.tools.audit_report import json_ready

        return json_ready(
            {
                "settings": self.settings,
                "counts": self.counts(),
                "findings": [asdict(f) for f in self.findings],
                "metric": self.metric,
                "timing": self.timing,
                "layers": [asdict(layer) for layer in self.layers],
            }
        )

    def to_json(self, path: Any = None) -> str:
        """The report as strict JSON; written to ``path`` when given."""
        from batchnorm.tools.audit_report import write_json

        return write_json(self, path)

    def to_html(self, path: Any = None) -> str:
        """A self-contained HTML page (CSS inline, plots as base64 PNG; needs matplotlib);
        written to ``path`` when given."""
        from batchnorm.tools.audit_report import write_html

        return write_html(self, path)

    def print(self, console: Any = None) -> None:
        """Print the findings as a rich table (needs ``rich``, in the ``lab`` extra)."""
        from batchnorm.tools.audit_report import print_table

        print_table(self, console)

    def __str__(self) -> str:
        from batchnorm.tools.audit_report import render_text

        return render_text(self)


# ------------------------------------------------------------------------- data


@dataclass
class _Batch:
    inputs: Any  # a tensor, or a tuple of the model's positional arguments
    labels: Tensor | None

    @property
    def size(self) -> int:
        first = self.inputs if isinstance(self.inputs, Tensor) else self.inputs[0]
        return int(first.shape[0]) if first.dim() else 1


def _batches(
    data: Any, labels: Tensor | None, batch_size: int, num_batches: int | None
) -> list[_Batch]:
    """The audit's batches: a tensor cut into ``batch_size`` rows (with ``labels`` cut the
    same way), or up to ``num_batches`` items of an iterable yielding inputs or
    ``(inputs, labels, ...)``."""
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(
                f"audit: data must be a batch of samples (N, ...) with at least 2 dimensions, "
                f"got shape {tuple(data.shape)}."
            )
        if labels is not None and (not isinstance(labels, Tensor) or len(labels) != len(data)):
            raise ValueError(
                f"audit: labels must be a tensor with one label per sample of data "
                f"({len(data)}), got {type(labels).__name__} of length "
                f"{len(labels) if hasattr(labels, '__len__') else '?'}."
            )
        starts = list(range(0, len(data), batch_size))
        if len(starts) > 1 and len(data) - starts[-1] < 2:
            starts.pop()  # a last batch of 1 sample has no batch statistics: merge it
        ends = starts[1:] + [len(data)]
        if num_batches is not None:
            starts, ends = starts[:num_batches], ends[:num_batches]
        return [
            _Batch(data[a:b], None if labels is None else labels[a:b])
            for a, b in zip(starts, ends, strict=True)
        ]
    if labels is not None:
        raise ValueError(
            "audit: labels= goes with a tensor of inputs; an iterable of batches carries its "
            "labels itself, as (inputs, labels) pairs."
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"audit: data must be a tensor of inputs or an iterable of batches (a DataLoader, a "
            f"list of tensors or of (inputs, labels) pairs), got {type(data).__name__}."
        )
    out = []
    for item in data:
        if num_batches is not None and len(out) >= num_batches:
            break
        if isinstance(item, (list, tuple)):
            if not item:
                raise ValueError("audit: data yielded an empty batch.")
            y = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
            out.append(_Batch(item[0], y))
        else:
            out.append(_Batch(item, None))
    if not out:
        raise ValueError("audit: data yielded no batch.")
    return out


def _to(value: Any, device: torch.device) -> Any:
    """A fresh copy on ``device`` (in-place layers such as InPlace-ABN may overwrite their
    input, which must not reach the audit's batches)."""
    if isinstance(value, Tensor):
        return value.to(device).clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _call(model: nn.Module, batch: _Batch, device: torch.device) -> Any:
    inputs = _to(batch.inputs, device)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


# ------------------------------------------------------------------------- statistics


class _LayerStats:
    """Population moments (count, mean, M2 in float64, merged with Chan et al.'s update) and
    the mean and biased variance of every batch (every virtual batch for Ghost BN)."""

    def __init__(self, virtual_batch: int | None) -> None:
        self.virtual_batch = virtual_batch
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.batch_means: list[Tensor] = []
        self.batch_vars: list[Tensor] = []
        self.values: list[int] = []
        self.samples: list[int] = []
        self.dtype: torch.dtype | None = None
        self.rank: int | None = None

    def add(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] == 0:
            return
        x = x.detach()
        self.dtype, self.rank = x.dtype, x.dim()
        device = torch.device("cpu") if x.device.type == "mps" else x.device  # no float64
        x64 = x.to(device, torch.float64)
        n = x64.numel() // x64.shape[1]
        if n == 0:
            return
        mean, var = batch_stats(x64)
        if self.mean is None:
            self.mean, self.m2 = torch.zeros_like(mean), torch.zeros_like(var)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total
        pieces = [x64] if self.virtual_batch is None else list(x64.split(self.virtual_batch))
        for piece in pieces:
            if piece.shape[0] == 0:
                continue
            m, v = batch_stats(piece)
            self.batch_means.append(m.cpu())
            self.batch_vars.append(v.cpu())
            self.values.append(piece.numel() // piece.shape[1])
            self.samples.append(piece.shape[0])

    def population(self) -> tuple[Tensor, Tensor] | None:
        """Mean and unbiased variance (as torch stores running_var), float64 on the CPU."""
        if self.mean is None or self.count == 0:
            return None
        var = self.m2 / (self.count - 1) if self.count > 1 else torch.zeros_like(self.m2)
        return self.mean.cpu(), var.cpu()


def _stats_pass(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[_Batch],
    device: torch.device,
) -> tuple[dict[str, _LayerStats], dict[str, Tensor]]:
    """Run the batches with the BN layers that have running statistics in training mode and
    everything else in eval mode (as recalibrate does), recording each BN's input; return
    the statistics and the running means each layer's own updates reached (to measure a
    frozen layer's drift). The caller restores the model."""
    stats = {
        name: _LayerStats(getattr(m, "virtual_batch_size", None) if _is_ghost(m) else None)
        for name, m in layers.items()
    }
    handles = [
        m.register_forward_pre_hook(lambda _m, inputs, s=stats[name]: s.add(inputs[0]))
        for name, m in layers.items()
    ]
    try:
        model.eval()
        for m in layers.values():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.train()
        with torch.no_grad():
            for batch in batches:
                _call(model, batch, device)
    finally:
        for h in handles:
            h.remove()
    moved = {
        name: m.running_mean.detach().to("cpu", torch.float64).clone()
        for name, m in layers.items()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    }
    return stats, moved


def _is_ghost(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and isinstance(getattr(m, "virtual_batch_size", None), int)


def _is_renorm(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and hasattr(m, "clip_bounds")


def _is_sync(m: nn.Module) -> bool:
    return isinstance(m, nn.SyncBatchNorm) or type(m).__name__ == "SyncBatchNorm"


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)


# ------------------------------------------------------------------------- metric


def _metric(
    model: nn.Module, batches: list[_Batch], device: torch.device, loss_fn: Callable | None
) -> tuple[str, float] | None:
    """Accuracy (integer labels, outputs with one score per class in dim 1) or the mean of
    ``loss_fn`` over the labelled batches, in the model's current modes; None without
    labels or when accuracy does not apply."""
    labelled = [b for b in batches if b.labels is not None]
    if not labelled:
        return None
    total, weight = 0.0, 0
    with torch.no_grad():
        for batch in labelled:
            out = _call(model, batch, device)
            out = out[0] if isinstance(out, (tuple, list)) else out
            y = batch.labels.to(out.device)
            if loss_fn is not None:
                value = float(loss_fn(out, y))
            elif y.dtype.is_floating_point or y.is_complex() or out.dim() != y.dim() + 1:
                return None
            else:
                value = float((out.argmax(1) == y).double().mean())
            total += value * len(y)
            weight += len(y)
    return ("loss" if loss_fn is not None else "accuracy"), total / max(weight, 1)


# ------------------------------------------------------------------------- the graph


#: Activations BatchNormAct fuses: module types, functions and tensor methods.
_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.ELU: "elu"}
_ACT_FUNCTIONS = {
    torch.relu: "relu",
    torch.relu_: "relu",
    nn.functional.relu: "relu",
    nn.functional.leaky_relu: "leaky_relu",
    nn.functional.silu: "silu",
    nn.functional.elu: "elu",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class _Neighbours:
    """What feeds a BN (a layer whose output only it reads) and the activation after it."""

    before: str | None = None
    activation: str | None = None  # relu, leaky_relu, silu, elu
    activation_at: str | None = None  # the module or code that applies it
    activation_module: str | None = None  # its module name, when it is one
    negative_slope: float = 0.01  # of a leaky_relu
    residual: bool = False  # an addition between BN and activation


def _neighbours(model: nn.Module) -> tuple[dict[str, _Neighbours], str]:
    """Each BN's neighbours from the fx-traced data flow (fold's tracer), or from the
    order inside nn.Sequential when tracing fails; and which of the two was used."""
    modules = dict(model.named_modules())
    result: dict[str, _Neighbours] = {}
    try:
        graph = _Tracer().trace(model)
    except Exception:  # any tracing failure: fx raises many kinds
        for chain in _sequential_chains(model):
            for i, (name, m) in enumerate(chain):
                if not is_batchnorm_like(m):
                    continue
                n = result.setdefault(name, _Neighbours())
                if i > 0 and isinstance(chain[i - 1][1], LAYERS):
                    n.before = chain[i - 1][0]
                if i + 1 < len(chain):
                    after_name, after = chain[i + 1]
                    kind = _module_activation(after)
                    if kind:
                        n.activation, n.activation_at = kind, f"module {after_name}"
                        n.activation_module = after_name
                        n.negative_slope = getattr(after, "negative_slope", 0.01)
        return result, "sequential"
    fused_adds: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm_like(modules[node.target]):
            continue
        n = result.setdefault(str(node.target), _Neighbours())
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], LAYERS)
            and len(source.users) == 1
        ):
            n.before = str(source.target)
        user = next(iter(node.users)) if len(node.users) == 1 else None
        residual = False
        if (
            user is not None
            and user.op in ("call_function", "call_method")
            and (user.target in _ADDS or user.target in ("add", "add_", "__add__"))
            and len(user.users) == 1
        ):
            if user in fused_adds:  # one BN of a sum takes the other term as its residual
                continue
            fused_adds.add(user)
            user, residual = next(iter(user.users)), True
        kind = _node_activation(user, modules) if user is not None else None
        if kind:
            n.activation, n.residual = kind, residual
            n.activation_at = f"module {user.target}" if user.op == "call_module" else _code(user)
            n.activation_module = str(user.target) if user.op == "call_module" else None
            n.negative_slope = _negative_slope(user, modules)
    return result, "fx"


def _negative_slope(node: fx.Node, modules: dict[str, nn.Module]) -> float:
    if node.op == "call_module":
        return float(getattr(modules[node.target], "negative_slope", 0.01))
    if node.target is nn.functional.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return float(slope) if isinstance(slope, (int, float)) else 0.01
    return 0.01


def _module_activation(m: nn.Module) -> str | None:
    kind = _ACT_MODULES.get(type(m))
    if kind == "elu" and getattr(m, "alpha", 1.0) != 1.0:
        return None  # the fused elu has alpha 1
    return kind


def _node_activation(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _module_activation(modules[node.target])
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACT_METHODS.get(node.target)
    return None


def _code(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}() in forward"
    return f"{getattr(node.target, '__name__', node.target)}() in forward"


# ------------------------------------------------------------------------- fix lines


def _expr(name: str, root: str = "model") -> str:
    """Python that reaches module ``name`` from ``root``: model.blocks[0].bn1."""
    if not name:
        return root
    text = root
    for part in name.split("."):
        text += f"[{part}]" if part.isdigit() else f".{part}" if part.isidentifier() else ""
    if not all(p.isdigit() or p.isidentifier() for p in name.split(".")):
        return f'{root}.get_submodule("{name}")'
    return text


def _class_expr(cls: type) -> str:
    kind = flavour_of(cls)
    if kind is not None and kind[0] == "torch":
        return f"nn.{cls.__name__}"
    if cls.__module__.startswith("batchnorm."):
        return f"batchnorm.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------- the audit


def audit(
    model: nn.Module,
    data: Any,
    *,
    labels: Tensor | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_batches: int | None = DEFAULT_NUM_BATCHES,
    timing: bool = True,
) -> AuditReport:
    """Audit the batch-norm layers of ``model`` on ``data`` and return an
    :class:`AuditReport`; ``model`` is left exactly as it was (parameters, buffers and
    training modes, also when an exception is raised).

    ``data`` is a tensor of inputs, cut into batches of ``batch_size`` samples (with
    ``labels``, one per sample), or an iterable of batches (a DataLoader): each an input
    tensor, a tuple of the model's positional inputs, or an ``(inputs, labels)`` pair.
    At most ``num_batches`` batches are used (None: all). The noise of batch statistics is
    measured on these batches: give the batch size the model trains with (per process).

    With labels the model is evaluated in eval mode with its running statistics and with
    recalibrated ones (:func:`batchnorm.recalibrate` on a deep copy): the accuracy (integer
    labels, one score per class in dim 1 of the output) or, with ``loss_fn(output,
    labels)``, its mean. ``timing=False`` skips timing the folded model.

    Under ``torch.distributed`` with several processes every rank must call it, as
    :func:`batchnorm.recalibrate`; the statistics are those of this rank's data.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit: expected an nn.Module, got {type(model).__name__}.")
    for name, value in (("batch_size", batch_size), ("num_batches", num_batches)):
        if value is None and name == "num_batches":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"audit: {name} must be a positive int, got {value!r}.")
    wrapped = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
    inner = model.module if wrapped else model
    root = "model.module" if wrapped else "model"
    layers = {name: m for name, m in inner.named_modules() if is_batchnorm_like(m)}
    batches = _batches(data, labels, batch_size, num_batches)
    tensor = next(iter(inner.parameters()), None)
    if tensor is None:
        tensor = next(iter(inner.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    world = _world_size()
    settings = {
        "model": type(model).__name__,
        "batch_norm_layers": len(layers),
        "batches": len(batches),
        "samples": sum(b.size for b in batches),
        "batch_sizes": sorted({b.size for b in batches}),
        "labels": any(b.labels is not None for b in batches),
        "world_size": world,
        "wrapped": type(model).__name__ if wrapped else None,
        "torch": torch.__version__,
    }
    if not layers:
        finding = Finding(
            "info",
            "no-batch-norm",
            None,
            "the model has no batch-norm layer; nothing to audit",
            "",
            {},
        )
        return AuditReport([finding], [], None, None, settings)

    # 1. The state as found, then the one pass that changes it, then everything back.
    model_modes = [(m, m.training) for m in model.modules()]
    found_training = {name: m.training for name, m in layers.items()}
    saved = {k: v.detach().clone() for k, v in _tensors(model)}
    before = {name: _f64(m.running_mean) for name, m in layers.items()}
    try:
        stats, moved = _stats_pass(inner, layers, batches, device)
    finally:
        _restore(model, saved, model_modes)

    ctx = _Context(inner, root, layers, stats, found_training, model.training, world, batches)
    ctx.build_layer_audits()
    ctx.check_modes(moved, before)
    ctx.check_numerics()
    ctx.check_noise()
    # 2. Everything else on a copy (fx tracing too: it runs the model's Python code).
    try:
        work = copy.deepcopy(inner)
    except Exception as error:  # a model that cannot be copied: skip, and say so
        ctx.add(
            "info",
            "skipped",
            None,
            f"the model cannot be deep-copied ({type(error).__name__}: {error}), so the "
            f"metric with recalibrated statistics and the fold timing were not measured",
            "",
            {},
        )
        work = None
    ctx.check_wasted(work if work is not None else inner)
    if work is not None:
        ctx.measure_fold(work, device, timing)
        ctx.measure_recalibration(work, device, loss_fn)
    ctx.check_stale()
    ctx.check_ddp(wrapped)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    findings = sorted(ctx.findings, key=lambda f: order[f.severity])  # stable: check order
    return AuditReport(findings, ctx.audits, ctx.metric, ctx.timing, settings)


def _tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _restore(model: nn.Module, saved: dict[str, Tensor], modes: list) -> None:
    with torch.no_grad():
        for key, t in _tensors(model):
            if key in saved and t is not None:
                t.copy_(saved[key])
    for m, training in modes:
        m.train(training)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _worst(values: Tensor, k: int = WORST_CHANNELS) -> list[int]:
    """Indices of the ``k`` largest finite values."""
    finite = torch.where(values.isfinite(), values, torch.full_like(values, -math.inf))
    order = torch.argsort(finite, descending=True)[:k]
    return [int(i) for i in order if math.isfinite(float(finite[i]))]


def _channels(indices: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


def _rms(t: Tensor) -> float:
    return float(t.square().mean().sqrt()) if t.numel() else 0.0


class _Context:
    """The measurements shared by the checks, and the findings they add."""

    def __init__(
        self,
        model: nn.Module,
        root: str,
        layers: dict[str, nn.Module],
        stats: dict[str, _LayerStats],
        found_training: dict[str, bool],
        model_training: bool,
        world: int,
        batches: list[_Batch],
    ) -> None:
        self.model, self.root, self.layers, self.stats = model, root, layers, stats
        self.found_training, self.model_training = found_training, model_training
        self.world, self.batches = world, batches
        self.findings: list[Finding] = []
        self.audits: list[LayerAudit] = []
        self.by_name: dict[str, LayerAudit] = {}
        self.metric: dict[str, Any] | None = None
        self.timing: dict[str, Any] | None = None
        self.constant: dict[str, Tensor] = {}  # channels with (almost) constant input
        self.noisy: dict[str, str] = {}  # layer -> severity of its noise finding
        self.never_updated: set[str] = set()  # reported as such, not again as stale

    def add(
        self, severity: str, check: str, layer: str | None, message: str, fix: str, evidence: dict
    ) -> None:
        self.findings.append(Finding(severity, check, layer, message, fix, evidence))

    def expr(self, name: str) -> str:
        return _expr(name, self.root)

    # --------------------------------------------------------------- measurements

    def build_layer_audits(self) -> None:
        for name, m in self.layers.items():
            s = self.stats[name]
            rm, rv = _f64(getattr(m, "running_mean", None)), _f64(getattr(m, "running_var", None))
            tensor = rv if rv is not None else _f64(getattr(m, "weight", None))
            dtype = m.running_var.dtype if rv is not None else s.dtype
            channels = int(getattr(m, "num_features", 0) or (0 if tensor is None else len(tensor)))
            layer = LayerAudit(
                name=name,
                kind=type(m).__name__,
                channels=channels,
                dtype=str(dtype).removeprefix("torch.") if dtype is not None else "unknown",
                eps=float(m.eps),
                momentum=getattr(m, "momentum", None),
                training=self.found_training[name],
                tracks_running_stats=rm is not None and rv is not None,
                batches=len(s.values),
                values_per_batch=int(statistics.median(s.values)) if s.values else None,
            )
            if rm is not None and rv is not None:
                layer.running_mean, layer.running_var = rm.tolist(), rv.tolist()
            pop = s.population()
            if pop is not None:
                mean, var = pop
                layer.mean, layer.var = mean.tolist(), var.tolist()
                self.constant[name] = var <= m.eps
                if rm is not None and rv is not None and rm.shape == mean.shape:
                    gap = (rm - mean).abs() / (var + m.eps).sqrt()
                    ratio = ((rv + m.eps) / (var + m.eps)).log()
                    layer.gap, layer.log_var_ratio = gap.tolist(), ratio.tolist()
                    keep = ~self.constant[name]
                    layer.gap_rms = _rms(gap[keep])
                    layer.log_var_ratio_rms = _rms(ratio[keep])
                self._measure_noise(layer, m, s, mean, var)
            self.audits.append(layer)
            self.by_name[name] = layer

    def _measure_noise(
        self, layer: LayerAudit, m: nn.Module, s: _LayerStats, mean: Tensor, var: Tensor
    ) -> None:
        if len(s.batch_means) < MIN_NOISE_BATCHES:
            return
        keep = var > m.eps
        if not keep.any():
            return
        scale = (var + m.eps)[keep]
        means = torch.stack(s.batch_means)[:, keep]
        variances = torch.stack(s.batch_vars)[:, keep]
        z = (means - mean[keep]).square() / scale
        # Finite-population correction: batches drawn from these M values without
        # replacement spread by sqrt((M - m) / (M - 1)) less than from an infinite one.
        m_values = float(statistics.median(s.values))
        total = float(s.count)
        shrink = max((total - m_values) / max(total - 1, 1.0), 1e-12)
        layer.noise_mean = math.sqrt(float(z.mean()) / shrink)
        log_ratio = ((variances + m.eps) / scale).log()
        layer.noise_var = math.sqrt(float(log_ratio.square().mean()) / shrink)
        layer.effective_values = 1.0 / max(layer.noise_mean**2, 1e-12)

    # --------------------------------------------------------------- 3. mode traps

    def check_modes(self, moved: dict[str, Tensor], before: dict[str, Tensor | None]) -> None:
        if self.model_training:
            self.add(
                "info",
                "model-in-training-mode",
                None,
                "the model was in training mode; the audit evaluates it in eval mode, as it "
                "runs at inference",
                f"{self.root}.eval()",
                {},
            )
        else:
            for name, training in self.found_training.items():
                m = self.layers[name]
                if not training or not isinstance(m, _BatchNorm):
                    continue  # a frozen layer computes the same in either mode
                self.add(
                    "error",
                    "mixed-modes",
                    name,
                    f"{type(m).__name__} is in training mode inside a model in eval mode: it "
                    f"normalizes every inference batch with its own statistics and updates its "
                    f"running statistics at each call",
                    f"{self.root}.eval()",
                    {"training": True, "model_training": False},
                )
        trainable_elsewhere = any(p.requires_grad for p in self.model.parameters())
        for name, m in self.layers.items():
            if not isinstance(m, _BatchNorm):
                continue
            a = self.by_name[name]
            params = [p for p in (m.weight, m.bias) if p is not None]
            if (
                m.track_running_stats
                and params
                and not any(p.requires_grad for p in params)
                and trainable_elsewhere
                and name in moved
                and before[name] is not None
            ):
                var = _f64(m.running_var)
                drift = _rms((moved[name] - before[name]) / (var + m.eps).sqrt())
                self.add(
                    "warning",
                    "frozen-but-updating",
                    name,
                    f"its weight and bias are frozen (requires_grad=False) while the rest of "
                    f"the model trains, but in training mode it still normalizes with batch "
                    f"statistics and updates its running statistics: one training-mode pass "
                    f"over the {len(self.batches)} batches moved running_mean by {drift:.3g} "
                    f"std (rms over channels)",
                    f"{self.root}, _ = batchnorm.freeze({self.root})",
                    {"running_mean_drift_rms": drift, "batches": len(self.batches)},
                )
            if not m.track_running_stats or m.running_mean is None:
                noise = a.noise_mean
                measured = (
                    f"; measured: the batch mean wanders by {noise:.3g} std between batches of "
                    f"{a.values_per_batch} values"
                    if noise is not None
                    else ""
                )
                self.add(
                    "warning",
                    "batch-statistics-in-eval",
                    name,
                    f"track_running_stats=False: in eval mode too it normalizes each batch with "
                    f"that batch's statistics, so an output depends on the other samples of its "
                    f"batch (and a batch of one sample cannot be normalized){measured}",
                    self._tracking_fix(name, m),
                    {"noise_mean": noise, "values_per_batch": a.values_per_batch},
                )
                continue
            self._check_momentum(name, m, a)

    def _tracking_fix(self, name: str, m: nn.Module) -> str:
        expr = self.expr(name)
        kind = flavour_of(m)
        if kind is None or kind[0] not in ("torch", "batchnorm"):
            return (
                f"# rebuild {expr} with track_running_stats=True, then "
                f"batchnorm.recalibrate({self.root}, loader)"
            )
        options = "" if m.affine else ", affine=False"
        options += "" if m.eps == 1e-5 else f", eps={m.eps!r}"
        return (
            f"new = {_class_expr(type(m))}({m.num_features}{options}).train({expr}.training); "
            f"new.load_state_dict({expr}.state_dict(), strict=False); {expr} = new; "
            f"batchnorm.recalibrate({self.root}, loader)"
        )

    def _check_momentum(self, name: str, m: _BatchNorm, a: LayerAudit) -> None:
        expr, momentum = self.expr(name), m.momentum
        nbt = getattr(m, "num_batches_tracked", None)
        tracked = None if nbt is None else int(nbt)
        at_init = bool(
            (m.running_mean == 0).all() and (m.running_var == 1).all()
        )  # reset_running_stats()
        if tracked == 0 and at_init:
            self.never_updated.add(name)
            measured = (
                f" (measured: running_mean off by {a.gap_rms:.2f} std, running_var by a factor "
                f"x/÷{math.exp(a.log_var_ratio_rms):.3g}, rms over channels)"
                if a.gap_rms is not None and a.log_var_ratio_rms is not None
                else ""
            )
            self.add(
                "error",
                "never-updated",
                name,
                "num_batches_tracked is 0 and the running statistics are still mean 0, "
                f"variance 1: the layer never saw a training batch, so in eval mode it does "
                f"not normalize at all{measured}",
                f"batchnorm.recalibrate({self.root}, loader)",
                {"num_batches_tracked": 0},
            )
        elif tracked == 0 and momentum is None:
            self.add(
                "info",
                "never-updated",
                name,
                "momentum=None and num_batches_tracked is 0: the next training batch replaces "
                "the running statistics (the cumulative average restarts)",
                f"{expr}.momentum = 0.1  # an exponential average starts from the current ones",
                {"num_batches_tracked": 0},
            )
        if momentum is None:
            if tracked:
                self.add(
                    "info",
                    "momentum",
                    name,
                    f"momentum=None: the running statistics are the plain average of all "
                    f"{tracked} training batches since the start, early ones (taken with "
                    f"long-gone weights) weighing as much as the last",
                    f"{expr}.momentum = 0.1",
                    {"momentum": None, "num_batches_tracked": tracked},
                )
        elif not 0.0 <= momentum <= 1.0 or math.isnan(momentum):
            self.add(
                "error",
                "momentum",
                name,
                f"momentum={momentum!r} is outside [0, 1]: the running average diverges",
                f"{expr}.momentum = 0.1",
                {"momentum": momentum},
            )
        elif momentum == 0.0:
            self.add(
                "warning",
                "momentum",
                name,
                "momentum=0: training never updates the running statistics, so eval mode uses "
                "whatever they were set to",
                f"{expr}.momentum = 0.1",
                {"momentum": 0.0},
            )
        elif momentum == 1.0:
            self.add(
                "warning",
                "momentum",
                name,
                "momentum=1: the running statistics are those of the last training batch "
                "alone, with all its noise",
                f"{expr}.momentum = 0.1",
                {"momentum": 1.0},
            )

    # --------------------------------------------------------------- 5. numerics

    def check_numerics(self) -> None:
        for name, m in self.layers.items():
            self._check_running_values(name, m)
            self._check_eps(name, m)
            self._check_dead(name, m)
            self._check_constant(name, m)

    def _check_running_values(self, name: str, m: nn.Module) -> None:
        rm, rv = _f64(getattr(m, "running_mean", None)), _f64(getattr(m, "running_var", None))
        constant = self.constant.get(name)
        if rm is not None and rv is not None:
            nonfinite = (~rm.isfinite() | ~rv.isfinite()).nonzero().flatten().tolist()
            negative = (rv < 0).nonzero().flatten().tolist()
            zero = rv == 0
            if constant is not None:
                zero = zero & ~constant  # 0 is right for a channel whose input is constant
            zero_idx = zero.nonzero().flatten().tolist()
            bad = sorted(set(nonfinite) | set(negative) | set(zero_idx))
            if bad:
                parts = []
                if nonfinite:
                    parts.append(f"NaN/Inf in channel(s) {_channels(nonfinite)}")
                if negative:
                    parts.append(f"running_var < 0 in channel(s) {_channels(negative)}")
                if zero_idx:
                    parts.append(
                        f"running_var = 0 in channel(s) {_channels(zero_idx)} whose input "
                        f"varies (they are divided by sqrt(eps) = {math.sqrt(m.eps):.3g})"
                    )
                self.add(
                    "error",
                    "invalid-running-statistics",
                    name,
                    "; ".join(parts) + ": eval outputs of these channels are NaN, Inf or blown up",
                    f"batchnorm.recalibrate({self.root}, loader)",
                    {"nonfinite": nonfinite, "negative": negative, "zero": zero_idx},
                )

    def _check_eps(self, name: str, m: nn.Module) -> None:
        expr, rv = self.expr(name), getattr(m, "running_var", None)
        dtype = None
        for t in (getattr(m, "running_var", None), getattr(m, "weight", None)):
            if isinstance(t, Tensor):
                dtype = t.dtype
                break
        if dtype is None:
            dtype = self.stats[name].dtype
        if dtype in MIN_EPS and m.eps < MIN_EPS[dtype]:
            bits = torch.finfo(dtype)
            lost = None
            if rv is not None:
                low = m.running_var.detach().cpu()
                lost = int(((low + torch.tensor(m.eps, dtype=dtype)) == low).sum())
            subnormal = m.eps < bits.tiny
            kind = str(dtype).removeprefix("torch.")
            where = (
                f"; running_var + eps == running_var in {kind} for {lost} of {low.numel()} channels"
                if lost is not None
                else ""
            )
            self.add(
                "warning",
                "eps-too-small",
                name,
                f"eps={m.eps:g} in a {kind} layer is below half "
                f"a unit in the last place of 1 ({MIN_EPS[dtype]:.2g})"
                + (f" and below its smallest normal number ({bits.tiny:.2g})" if subnormal else "")
                + f": it is rounded away in var + eps unless the variance is tiny{where}, "
                f"so it no longer bounds 1/sqrt(var + eps)",
                f"{expr}.eps = {SAFE_EPS[dtype]:g}",
                {"eps": m.eps, "dtype": str(dtype), "channels_eps_lost": lost},
            )

    def _check_dead(self, name: str, m: nn.Module) -> None:
        expr = self.expr(name)
        weight = getattr(m, "weight", None)
        if isinstance(weight, Tensor) and weight.numel():
            w = _f64(weight).abs()
            median = float(w.median())
            dead = (w <= DEAD_WEIGHT * median) if median > 0 else (w == 0)
            dead_idx = dead.nonzero().flatten().tolist()
            if dead_idx:
                every = len(dead_idx) == w.numel()
                fix = (
                    f"with torch.no_grad(): {expr}.weight.fill_(1.0)  # re-initialize, then "
                    f"fine-tune"
                    if every
                    else f"with torch.no_grad(): w = {expr}.weight; w[w.abs() <= {DEAD_WEIGHT:g}"
                    f" * w.abs().median()] = {median:.3g}  # revive, then fine-tune; or prune them"
                )
                self.add(
                    "error" if every else "warning",
                    "dead-channels",
                    name,
                    f"{len(dead_idx)} of {w.numel()} channels have |weight| <= "
                    f"{DEAD_WEIGHT:g} x the median |weight| ({median:.3g}): max "
                    f"{float(w[dead].max()):.3g}; they output their bias, a constant, "
                    f"whatever the input (channels {_channels(dead_idx)})",
                    fix,
                    {"dead": dead_idx, "median_abs_weight": median},
                )

    def _check_constant(self, name: str, m: nn.Module) -> None:
        constant = self.constant.get(name)
        if constant is not None and constant.any():
            idx = constant.nonzero().flatten().tolist()
            share = len(idx) / constant.numel()
            var = self.by_name[name].var or []
            self.add(
                "warning" if share > CONSTANT_SHARE_WARNING else "info",
                "constant-input",
                name,
                f"{len(idx)} of {constant.numel()} channels receive an (almost) constant "
                f"input: variance <= eps ({m.eps:g}), max {max(var[i] for i in idx):.3g}; "
                f"they carry no information (dead ReLU units or zero weights before the "
                f"layer?) and any later change is scaled up by up to "
                f"1/sqrt(eps) = {1 / math.sqrt(m.eps):.0f} (channels {_channels(idx)})",
                f"keep = {self.expr(name)}.running_var > {self.expr(name)}.eps  # after "
                f"recalibrate: prune the others here and in the layer before",
                {"channels": idx, "share": share},
            )

    # --------------------------------------------------------------- 2. noise

    def check_noise(self) -> None:
        for name, m in self.layers.items():
            a = self.by_name[name]
            if not isinstance(m, _BatchNorm):
                continue  # frozen: never normalizes with batch statistics
            samples = self.stats[name].samples
            n = int(statistics.median(samples)) if samples else 0
            if a.effective_values is None:
                if self.stats[name].values and len(self.stats[name].values) < MIN_NOISE_BATCHES:
                    self.add(
                        "info",
                        "noisy-batch-statistics",
                        name,
                        f"only {len(self.stats[name].values)} batch(es): at least "
                        f"{MIN_NOISE_BATCHES} are needed to measure the noise of batch "
                        f"statistics",
                        "batchnorm.audit(model, loader, num_batches=None)  # more batches",
                        {"batches": len(self.stats[name].values)},
                    )
                continue
            sync = _is_sync(m) and self.world > 1
            m_eff = a.effective_values * (self.world if sync else 1)
            evidence = {
                "values_per_batch": a.values_per_batch,
                "samples_per_batch": n,
                "noise_mean": a.noise_mean,
                "noise_var": a.noise_var,
                "effective_values": m_eff,
                "threshold": NOISY_VALUES_WARNING,
            }
            if m_eff < NOISY_VALUES_WARNING:
                severity = "error" if m_eff < NOISY_VALUES_ERROR else "warning"
                if _is_ghost(m) or _is_renorm(m):
                    severity = "info"
                correlated = (
                    f" (values within a batch are correlated: {a.values_per_batch} values count "
                    f"as {m_eff:.0f})"
                    if a.values_per_batch and m_eff < 0.5 * a.values_per_batch
                    else ""
                )
                message = (
                    f"batches of {n} samples give {a.values_per_batch} values per channel"
                    f"{' (virtual batches of Ghost BN)' if _is_ghost(m) else ''}: measured, the "
                    f"batch mean wanders by {a.noise_mean:.3g} std and the batch variance by a "
                    f"factor x/÷{math.exp(a.noise_var):.3g} (rms) around the population's, as from "
                    f"{m_eff:.0f} independent values{correlated}, fewer than "
                    f"{NOISY_VALUES_WARNING} (noise above {NOISY_VALUES_WARNING**-0.5:.2f} std)"
                )
                if _is_ghost(m):
                    message += "; Ghost BN adds this noise on purpose"
                elif _is_renorm(m):
                    message += "; Batch Renorm corrects it towards the running statistics"
                elif self.world > 1 and not _is_sync(m):
                    message += (
                        f"; under DDP with {self.world} processes, SyncBatchNorm normalizes "
                        f"over all {self.world * n} samples"
                    )
                else:
                    dims = dims_of(m) or 2
                    message += (
                        f"; if you train with batches this small: freeze BN when fine-tuning "
                        f"(running statistics of the pretrained model, no batch noise), or "
                        f"train with batchnorm.BatchRenorm{dims}d (Ioffe 2017: corrects batch "
                        f"statistics towards the running ones), or use larger batches"
                    )
                fix = (
                    f"{self.root} = batchnorm.convert_sync_batchnorm({self.root})"
                    if self.world > 1 and not _is_sync(m)
                    else f"{self.root}, _ = batchnorm.freeze({self.root})"
                )
                if _is_ghost(m):
                    fix = f"{self.expr(name)}.virtual_batch_size = {max(n, 1) * 4}  # if too noisy"
                self.noisy[name] = severity
                self.add(severity, "noisy-batch-statistics", name, message, fix, evidence)
            elif n >= GHOST_BATCH_SIZE and not _is_ghost(m):
                dims = dims_of(m) or 2
                self.add(
                    "info",
                    "noisy-batch-statistics",
                    name,
                    f"batches of {n} samples: batch statistics are almost noiseless (the "
                    f"batch mean wanders by {a.noise_mean:.2g} std); large-batch training loses "
                    f"the regularizing noise of small batches, which Ghost BN restores "
                    f"(Hoffer et al. 2017)",
                    f"new = batchnorm.GhostBatchNorm{dims}d({a.channels}, virtual_batch_size="
                    f"128).train({self.expr(name)}.training); new.load_state_dict("
                    f"{self.expr(name)}.state_dict()); {self.expr(name)} = new",
                    evidence,
                )

    # --------------------------------------------------------------- 4. waste and speed

    def check_wasted(self, model: nn.Module) -> None:
        """Biases before BN and BN + activation pairs, from the data flow of ``model`` (a
        copy of the audited one, whose module names it shares)."""
        neighbours, method = _neighbours(model)
        for name, n in neighbours.items():
            m = self.layers[name]
            before = None if n.before is None else self.model.get_submodule(n.before)
            if (
                before is not None
                and isinstance(m, _BatchNorm)
                and getattr(before, "bias", None) is not None
                and (not isinstance(before, nn.Linear) or self.stats[name].rank == 2)
            ):
                bias = _f64(before.bias)
                layer_expr, bn_expr = self.expr(n.before), self.expr(name)
                definition = _definition_without_bias(before)
                if m.running_mean is not None:
                    fix = (
                        f"with torch.no_grad(): {bn_expr}.running_mean -= {layer_expr}.bias; "
                        f"{layer_expr}.bias = None  # same outputs; in the definition: "
                        f"{definition}"
                    )
                else:
                    fix = f"{layer_expr}.bias = None  # in the definition: {definition}"
                self.add(
                    "info",
                    "bias-before-batch-norm",
                    name,
                    f"{n.before} ({type(before).__name__}) has a bias of {bias.numel()} "
                    f"parameters (max |bias| {float(bias.abs().max()):.3g}) that this BN "
                    f"cancels: it subtracts the batch mean, bias included, and adds its own "
                    f"shift",
                    fix,
                    {"layer": n.before, "parameters": bias.numel(), "graph": method},
                )
            kind = flavour_of(m)
            fused = getattr(m, "activation", None) not in (None, "identity")
            if n.activation and kind is not None and not fused:
                family, dims = kind
                if family in ("torch", "batchnorm", "frozen") and dims is not None:
                    self._fusable(name, m, n, family, dims)

    def _fusable(self, name: str, m: nn.Module, n: _Neighbours, family: str, dims: int) -> None:
        frozen = family == "frozen"
        cls = f"batchnorm.{'FrozenBatchNorm' if frozen else 'BatchNormAct'}{dims}d"
        options = f', activation="{n.activation}"'
        if n.activation == "leaky_relu":
            options += f", negative_slope={n.negative_slope!r}"
        if m.eps != 1e-5:
            options += f", eps={m.eps!r}"
        if family != "frozen":
            if m.momentum != 0.1:
                options += f", momentum={m.momentum!r}"
            if not m.affine:
                options += ", affine=False"
            elif m.bias is None:
                options += ", bias=False"
        expr = self.expr(name)
        after = (
            f"{self.expr(n.activation_module)} = nn.Identity()"
            if n.activation_module and not n.residual
            else f"# and drop {n.activation_at}"
            + (" (pass the shortcut as the BN's residual argument)" if n.residual else "")
        )
        what = "the addition and " if n.residual else ""
        self.add(
            "info",
            "fusable-activation",
            name,
            f"{type(m).__name__} is followed by {what}{n.activation} ({n.activation_at}): "
            f"{cls.removeprefix('batchnorm.')} computes both in one pass over the data"
            + (", residual included" if n.residual else ""),
            f"new = {cls}({m.num_features}{options}).train({expr}.training); "
            f"new.load_state_dict({expr}.state_dict()); "
            f"{expr} = new; {after}",
            {"activation": n.activation, "residual": n.residual},
        )

    def measure_fold(self, work: nn.Module, device: torch.device, timing: bool) -> None:
        example = _to(self.batches[0].inputs, device)
        work.eval()
        try:
            folded, report = fold(work, example_inputs=example)
        except Exception as error:  # fold found the model unfoldable: say so, go on
            self.add(
                "info",
                "foldable",
                None,
                f"batchnorm.fold failed on this model ({type(error).__name__}: {error})",
                "",
                {},
            )
            return
        if not report.folded:
            return
        names = [f.name for f in report.folded]
        evidence: dict[str, Any] = {
            "folded": names,
            "skipped": {s.name: s.reason for s in report.skipped},
            "method": report.method,
        }
        measured = ""
        if timing:
            self.timing = _time_pair(work, folded, self.batches[0], device)
            t = self.timing
            evidence.update(t)
            measured = (
                f"; measured: {t['model_ms']:.3g} ms -> {t['folded_ms']:.3g} ms per batch of "
                f"{self.batches[0].size} in eval mode ({t['speedup']:.2f}x, best of "
                f"{t['repeats']} runs of {t['calls']} calls)"
            )
        total = len(report.folded) + len(report.skipped)
        self.add(
            "info",
            "foldable",
            None,
            f"batchnorm.fold removes {len(names)} of {total} batch-norm layers for inference "
            f"({_channels(names, 6)}){measured}",
            f"folded, report = batchnorm.fold({self.root}, example_inputs=x)",
            evidence,
        )

    # --------------------------------------------------------------- 1. stale statistics

    def measure_recalibration(
        self, work: nn.Module, device: torch.device, loss_fn: Callable | None
    ) -> None:
        work.eval()
        before = _metric(work, self.batches, device, loss_fn)
        if before is None:
            return
        if not any(
            isinstance(m, _BatchNorm) and m.running_mean is not None for m in self.layers.values()
        ):
            self.add(
                "info",
                "recalibration-gain",
                None,
                f"eval {before[0]} {before[1]:.4f}; recalibrate updates no layer of this model "
                f"(frozen, or without running statistics)",
                "",
                {"running": before[1]},
            )
            return
        inputs = (_to(b.inputs, device) for b in self.batches)
        try:
            recalibrate(work, inputs, progress=False)
            work.eval()
            after = _metric(work, self.batches, device, loss_fn)
        except Exception as error:  # e.g. a model of several inputs, which recalibrate
            self.add(  # cannot feed: report the metric without the comparison
                "info",
                "recalibration-gain",
                None,
                f"batchnorm.recalibrate failed on a copy of the model ({type(error).__name__}: "
                f"{error}); the gain from recalibrating was not measured",
                "",
                {"running": before[1]},
            )
            return
        assert after is not None
        name, running = before
        recalibrated = after[1]
        gain = recalibrated - running if name == "accuracy" else running - recalibrated
        relative = gain / abs(running) if name == "loss" and running else gain
        self.metric = {
            "name": name,
            "running": running,
            "recalibrated": recalibrated,
            "gain": gain,
            "relative_gain": relative,
            "samples": sum(b.size for b in self.batches if b.labels is not None),
        }

    def check_stale(self) -> None:
        gain = None if self.metric is None else self.metric["relative_gain"]
        flagged = []
        for name, m in self.layers.items():
            a = self.by_name[name]
            if a.gap is None or a.gap_rms is None or name in self.never_updated:
                continue
            gap, ratio = torch.tensor(a.gap), torch.tensor(a.log_var_ratio)
            keep = ~self.constant[name]
            gap = torch.where(keep, gap, torch.zeros_like(gap))
            ratio = torch.where(keep, ratio, torch.zeros_like(ratio))
            if a.gap_rms >= STALE_GAP_ERROR or a.log_var_ratio_rms >= STALE_LOG_VAR_ERROR:
                severity = "error"
            elif a.gap_rms >= STALE_GAP_WARNING or a.log_var_ratio_rms >= STALE_LOG_VAR_WARNING:
                severity = "warning"
            else:
                continue
            recalibrates = isinstance(m, _BatchNorm)
            if gain is not None and gain < GAIN_WARNING and recalibrates:
                severity = "info"  # measured: it does not matter for the metric
            worst_gap = _worst(gap)
            worst_ratio = _worst(ratio.abs())
            ratios = ", ".join(
                f"channel {i}: x{math.exp(float(ratio[i])):.3g}" for i in worst_ratio
            )
            gaps = ", ".join(f"channel {i}: {float(gap[i]):.2f}" for i in worst_gap)
            fix = (
                f"batchnorm.recalibrate({self.root}, loader)"
                if recalibrates
                else f"{self.root} = batchnorm.unfreeze({self.root})[0]; "
                f"batchnorm.recalibrate({self.root}, loader); "
                f"{self.root}, _ = batchnorm.freeze({self.root})"
            )
            cause = ""
            if isinstance(m, _BatchNorm) and m.momentum is None:
                cause = "; momentum=None (a plain average since the start) is a likely cause"
            self.add(
                severity,
                "stale-statistics",
                name,
                f"running statistics differ from the data's: running_mean is off by "
                f"{a.gap_rms:.2f} std (rms over channels; worst {gaps}) and running_var by a "
                f"factor x/÷{math.exp(a.log_var_ratio_rms):.3g} (rms; worst {ratios}){cause}",
                fix,
                {
                    "gap_rms": a.gap_rms,
                    "log_var_ratio_rms": a.log_var_ratio_rms,
                    "worst_gap_channels": worst_gap,
                    "worst_var_channels": worst_ratio,
                },
            )
            flagged.append(name)
        if self.metric is None:
            if not any(b.labels is not None for b in self.batches):
                self.add(
                    "info",
                    "recalibration-gain",
                    None,
                    "no labels: the metric with recalibrated statistics was not measured",
                    "batchnorm.audit(model, x, labels=y)  # or batches of (inputs, labels)",
                    {},
                )
            return
        metric = self.metric
        name = metric["name"]
        if gain >= GAIN_ERROR:
            severity = "error"
        elif gain >= GAIN_WARNING:
            severity = "warning"
        else:
            severity = "info"
        change = (
            f"{metric['gain'] * 100:+.2f} points"
            if name == "accuracy"
            else f"{-metric['gain']:+.4g} ({-metric['relative_gain'] * 100:+.1f} %)"
        )
        where = f"; stale: {_channels(flagged, 6)}" if flagged else ""
        self.add(
            severity,
            "recalibration-gain",
            None,
            f"eval {name} with the running statistics {metric['running']:.4f}, with "
            f"statistics recalibrated on these {metric['samples']} samples "
            f"{metric['recalibrated']:.4f}: {change}{where}",
            f"batchnorm.recalibrate({self.root}, loader)",
            dict(metric),
        )

    # --------------------------------------------------------------- 6. DDP

    def check_ddp(self, wrapped: bool) -> None:
        if self.world <= 1 and not wrapped:
            return
        plain = [n for n, m in self.layers.items() if isinstance(m, _BatchNorm) and not _is_sync(m)]
        if not plain:
            return
        noisy = [n for n in plain if self.noisy.get(n) in ("warning", "error")]
        n = statistics.median(b.size for b in self.batches)
        if noisy:
            severity = "error" if any(self.noisy[x] == "error" for x in noisy) else "warning"
            message = (
                f"{self.world} processes, each normalizing with its own batch of {n:g} "
                f"samples: {len(noisy)} of {len(plain)} batch-norm layers get noisy statistics "
                f"({_channels(noisy, 6)}); SyncBatchNorm normalizes over the "
                f"{self.world * n:g} samples of all processes (one all_reduce of 2C+3 values "
                f"per layer)"
            )
        else:
            severity = "info"
            message = (
                f"{self.world} processes without SyncBatchNorm: each of the {len(plain)} "
                f"batch-norm layers normalizes with its own batch of {n:g} samples, which is "
                f"enough here"
            )
        self.add(
            severity,
            "ddp-without-sync-batch-norm",
            None,
            message,
            f"{self.root} = batchnorm.convert_sync_batchnorm({self.root})  # before wrapping "
            f"in DDP",
            {"world_size": self.world, "samples_per_process": n, "noisy_layers": noisy},
        )


def _definition_without_bias(layer: nn.Module) -> str:
    text = layer.extra_repr()
    if "bias=True" in text:
        text = text.replace("bias=True", "bias=False")
    else:
        text += ", bias=False"
    return f"nn.{type(layer).__name__}({text})"


def _time_pair(
    model: nn.Module, folded: nn.Module, batch: _Batch, device: torch.device
) -> dict[str, Any]:
    """Milliseconds per call of ``model`` and ``folded`` on one batch, in eval mode: the best
    of TIMING_REPEATS runs of ``calls`` calls each, the two timed in alternation."""
    x = _to(batch.inputs, device)
    args = x if isinstance(x, tuple) else (x,)
    model.eval()
    folded.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(m: nn.Module, calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            m(*args)
        sync()
        return time.perf_counter() - start

    with torch.no_grad():
        run(model, 1)
        run(folded, 1)
        once = max(min(run(model, 1) for _ in range(3)), 1e-7)
        calls = max(1, min(1000, math.ceil(TIMING_MIN_SECONDS / once)))
        times: dict[str, list[float]] = {"model": [], "folded": []}
        for _ in range(TIMING_REPEATS):
            times["model"].append(run(model, calls) / calls)
            times["folded"].append(run(folded, calls) / calls)
    # The fastest run: the machine's other work only ever adds time (as timeit advises).
    t_model, t_folded = min(times["model"]), min(times["folded"])
    return {
        "model_ms": t_model * 1e3,
        "folded_ms": t_folded * 1e3,
        "speedup": t_model / max(t_folded, 1e-12),
        "repeats": TIMING_REPEATS,
        "calls": calls,
        "batch_size": batch.size,
        "device": str(device),
    }
