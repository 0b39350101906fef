"""Differential fuzzing of batch norm against an independent float64 oracle: calls of
batchnorm.functional.batch_norm and of the layers (whose usual calls take a path of their
own, see functional._layer_call).

The oracle is torch.nn.functional.batch_norm run in float64 on contiguous float64 copies of
the inputs, followed by the residual and the activation as float64 torch ops (never our own
reference module), differentiated by torch's autograd. Hypothesis draws

* the shape: rank 2 to 5, on both sides of ATEN_BELOW_NUMEL (about 10 to 150k values);
* the memory layout of every tensor argument (input, weight, bias, running_mean, running_var,
  residual and the output gradient): contiguous, channels_last, permuted, expand()ed
  (stride 0), a column of a larger tensor, a step slice ``t[::2]``, size-1 dims with odd
  strides;
* the dtype, every option of the call, and the backend (default dispatch or a forced one);
* the caller: the function, or a layer (``BatchNorm{1,2,3}d``, ``BatchNormAct{1,2,3}d``)
  holding the drawn tensors as its parameters and running statistics, where a layer can
  have them (a bias without a weight it cannot);
* the data: channel means 0, 1e2 or 1e4 with scales 1e-2 to 1e2, and a mode that puts a few
  NaN/+Inf/-Inf into the input.

It compares the output, the running statistics after the update and every gradient.

A failure prints the falsifying ``Case(...)``; ``check(Case(...))`` reruns it. The number of
examples is ``BATCHNORM_FUZZ_EXAMPLES`` (``make fuzz`` runs 5000), else DEFAULT_EXAMPLES.
The plain tests at the end are regression tests of the bugs the fuzzer found.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import batchnorm
import batchnorm.functional as BF
from batchnorm import ops
from batchnorm.backends import Call
from batchnorm.backends.aten import ATEN_BELOW_NUMEL
from batchnorm.nn.base import DIMS_OF_INPUT_RANK
from conftest import zero_near_kink

#: Examples of the default (CI) run: ~15 s of one core once Numba's cache is warm, and
#: ~30 s more while it finds failures (shrinking them).
DEFAULT_EXAMPLES = 300
EXAMPLES = int(os.environ.get("BATCHNORM_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))

# ---------------------------------------------------------------------------------------
# Tolerances, in units of eps, the input dtype's machine epsilon (2^-23 ~ 1.2e-7 for float32,
# 2^-52 ~ 2.2e-16 for float64). The oracle sees exactly our (rounded) input values and is
# accurate to a few float64 ulps (see `oracle`), so the comparison sees our rounding errors.
# A stable implementation commits two kinds of error in a normalized value
# xhat = (x - mean) * invstd:
#
# * the batch mean's. float32 statistics accumulate in float64 sums of float32 terms
#   x - c centred near the mean, so the mean is off by its final rounding, at most half an
#   ulp: 0.5 eps |mean| (x - mean is then exact), and by the terms' float32 rounding, a few
#   ulps of their size E|x - mean| (the running mean adds ROUNDING_ULPS of it: a mean 28
#   times smaller than its std, the C++ backend's float32 terms were 1.7x over a bound
#   without it). Amplified by |weight| * invstd, the first is ~5e-4 in float32 for a
#   channel of mean 1e4 and std 1, whatever the algorithm: MEAN_ULPS allows twice it. A
#   mean off by several ulps of |mean| (a float32 accumulation around 0) or an
#   E[x^2] - E[x]^2 variance does worse, and fails.
# * a dozen roundings of the size of the result, and sums of up to a few thousand terms in
#   the dtype (for random-sign data ~ sqrt(n) eps of the sum of |terms|, far below this
#   bound; our kernels merge partial sums in float64): ROUNDING_ULPS of each result's scale
#   (the output's: max |weight * xhat| + max |bias| + max |residual|; a per-channel sum's:
#   the sum of the |terms|).
# * float64 has no wider type to accumulate in: a sum of M terms, and the mean, may carry up
#   to M ulps of rounding (Higham's bound for recursive summation; torch's sum of an
#   expand()ed float64 tensor reaches ~M/2, blocked and pairwise sums far less), so float64
#   bounds of sums and of the batch mean add FLOAT64_ULPS_PER_TERM * M ulps. A float64 bug
#   that hides below them would show in float32, which runs the same code.
# * ATen's float32 kernels add a channel's terms in long chains: the (N, C) and
#   channels-last kernel row by row, the NCHW kernel a plane in a few vector lanes (~M/16
#   ulps of the sum of |terms| where the terms are equal: see backends.aten.ATEN_MAX_ROWS).
#   The default dispatch sends such sums to the kernels and keeps the bound above; a forced
#   "aten" backend, torch's own numbers, gets Higham's bound for them,
#   FLOAT64_ULPS_PER_TERM * M ulps as float64.
#
# Gradients inherit the forward's error through xhat and, for curved activations, through
# act'(pre): |act''| <= CURVATURE times the output's error. relu and leaky_relu are linear
# on each side of their kink; where a float pre-activation could fall on the other side,
# the drawn output gradient is 0 so that both sides agree (see _grad_output).
#
# float32: ROUNDING_ULPS = 16 is 2e-6 of a result's scale; the bounds add up to ~1e-5 to
# 1e-4 of a gradient's. The stable backends stay below a tenth of every bound (measured on
# thousands of examples); ATen's float32 kernel fails on large channel means.
MEAN_ULPS = {torch.float32: 1.0, torch.float64: 8.0}
FLOAT64_ULPS_PER_TERM = 1.0
ROUNDING_ULPS = {torch.float32: 16.0, torch.float64: 64.0}
#: max |act''(pre)|: silu's is 0.5 (at 0), elu's (alpha 1) is exp(pre) <= 1 below 0.
CURVATURE = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.0, "silu": 0.5, "elu": 1.0}
#: Where |pre| is below this many output tolerances, relu's and leaky_relu's derivative
#: is ambiguous: the output gradient is 0 there.
KINK_MARGIN = 4.0

ACTIVATIONS = (None, "identity", "relu", "leaky_relu", "silu", "elu")
BACKENDS = (None, "reference", "numba", "aten")  # None: the default dispatch
TENSORS = ("input", "residual", "grad_output")
VECTORS = ("weight", "bias", "running_mean", "running_var")


# ---------------------------------------------------------------------------------------
# A drawn case: everything discrete; the values come from `seed`.


@dataclass(frozen=True)
class Layout:
    """How a tensor is laid out in memory (the values do not depend on it, except for
    "expand", whose tensor repeats its first slice along ``dim``)."""

    kind: str = "contiguous"  # contiguous channels_last permuted step column expand
    dim: int = 0  # step, expand: along which dimension
    perm: tuple[int, ...] = ()  # permuted: the order of the dimensions in memory
    offset: int = 0  # step: t[offset::2]; column: which of 3 columns
    odd: tuple[int, ...] = ()  # strides given to the size-1 dimensions, in order


@dataclass(frozen=True)
class Case:
    """One call of batch_norm: its options, the backend, how the data is made (``seed``)
    and the layout of each tensor argument. (A forced "aten" backend computes only torch's
    convention: with ``unbiased=False`` the call takes the default dispatch.)"""

    dtype: torch.dtype
    shape: tuple[int, ...]
    training: bool = True
    weight: bool = True
    bias: bool = True
    running: bool = True
    momentum: float = 0.1
    eps: float = 1e-5
    activation: str | None = None
    negative_slope: float = 0.01
    residual: bool = False
    unbiased: bool = True
    backend: str | None = None
    offset: float = 0.0  # channel means are about +-offset
    std: float = 1.0  # channel standard deviations are about std
    nonfinite: int = 0  # this many NaN/+Inf/-Inf values in the input
    grads: tuple[str, ...] = ("input", "weight", "bias", "residual")  # requires_grad
    seed: int = 0
    layouts: tuple[tuple[str, Layout], ...] = ()  # (name, Layout); absent: contiguous
    layer: bool = False  # called through a layer that holds the tensors (see _layer_for)

    def layout(self, name: str) -> Layout:
        return dict(self.layouts).get(name, Layout())


@st.composite
def tensor_layouts(draw, shape, expand=True):
    rank = len(shape)
    kinds = ["contiguous", "permuted", "step", "column"]
    kinds += ["channels_last"] if rank in (4, 5) else []
    kinds += ["expand"] if expand else []
    kind = draw(st.sampled_from(kinds))
    dim = draw(st.integers(0, rank - 1)) if kind in ("step", "expand") else 0
    perm = tuple(draw(st.permutations(range(rank)))) if kind == "permuted" else ()
    offset = draw(st.integers(0, 1 if kind == "step" else 2)) if kind in ("step", "column") else 0
    ones = sum(1 for s in shape if s == 1)
    odd = ()
    if ones and draw(st.booleans()):
        odd = tuple(draw(st.sampled_from([0, 3, 7, 1001])) for _ in range(ones))
    return Layout(kind, dim, perm, offset, odd)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rank = draw(st.integers(2, 5))
    channels = draw(st.one_of(st.integers(1, 8), st.sampled_from([16, 17, 64, 130])))
    spatial = tuple(draw(st.integers(1, 9)) for _ in range(rank - 2))
    numel = draw(
        st.one_of(
            st.integers(2, 2_000),
            st.integers(2_000, ATEN_BELOW_NUMEL - 1),
            st.sampled_from([ATEN_BELOW_NUMEL - 1, ATEN_BELOW_NUMEL]),
            st.integers(ATEN_BELOW_NUMEL, 150_000),
        )
    )
    training = draw(st.booleans())
    size = math.prod(spatial)
    n = max(1, round(numel / (channels * size)))
    if training and n * size < 2:  # batch statistics need 2 values per channel
        n = 2
    shape = (n, channels, *spatial)
    activation = draw(st.sampled_from(ACTIVATIONS))
    residual = draw(st.booleans())
    weight, bias = draw(st.booleans()), draw(st.booleans())
    present = {"input": True, "weight": weight, "bias": bias, "residual": residual}
    grads = tuple(k for k, v in present.items() if v and draw(st.sampled_from([True, False])))
    layouts = [(name, draw(tensor_layouts(shape))) for name in TENSORS]
    for name in VECTORS:  # an expand()ed running statistic cannot be updated in place
        layouts.append((name, draw(tensor_layouts((channels,), not name.startswith("run")))))
    return Case(
        dtype=dtype,
        shape=shape,
        training=training,
        weight=weight,
        bias=bias,
        running=draw(st.booleans()) if training else True,
        momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.5])),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        activation=activation,
        negative_slope=draw(st.sampled_from([0.01, 0.2, 0.0, 1.0]))
        if activation == "leaky_relu"
        else 0.01,
        residual=residual,
        unbiased=draw(st.sampled_from([True, False])),
        backend=draw(st.sampled_from(BACKENDS)),
        offset=draw(st.sampled_from([0.0, 1e2, 1e4])),
        std=draw(st.sampled_from([1.0, 1e-2, 1e2])),
        nonfinite=draw(st.sampled_from([0, 0, 0, 1, 3])),
        grads=grads,
        seed=draw(st.integers(0, 2**31 - 1)),
        layouts=tuple((name, layout) for name, layout in layouts if layout != Layout()),
        layer=draw(st.booleans()) and (weight or not bias),  # a layer's bias needs a weight
    )


# ---------------------------------------------------------------------------------------
# Making the tensors.


def _lay_out(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A tensor equal to ``values`` laid out as ``layout`` says; unused memory is NaN."""
    shape, rank = values.shape, values.dim()
    if layout.kind == "contiguous":
        t = values.clone()
    elif layout.kind == "channels_last":
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        t = values.contiguous(memory_format=fmt)
    elif layout.kind == "permuted":
        inverse = [layout.perm.index(d) for d in range(rank)]
        t = values.permute(layout.perm).contiguous().permute(inverse)
    elif layout.kind == "step":  # t = base[offset::2] along dim
        d = layout.dim
        big = list(shape)
        big[d] = 2 * shape[d] + layout.offset
        base = torch.full(big, math.nan, dtype=values.dtype)
        t = base[(slice(None),) * d + (slice(layout.offset, None, 2),)]
        t.copy_(values)
    elif layout.kind == "column":  # t = base[..., j] of a (*shape, 3) tensor
        base = torch.full((*shape, 3), math.nan, dtype=values.dtype)
        t = base[..., layout.offset]
        t.copy_(values)
    elif layout.kind == "expand":
        t = values.narrow(layout.dim, 0, 1).expand(shape)
    else:
        raise ValueError(layout.kind)
    if layout.odd:  # a size-1 dimension's stride is never used: give it an odd one
        odd, strides = iter(layout.odd), list(t.stride())
        for d, size in enumerate(shape):
            if size == 1:
                strides[d] = next(odd)
        t = t.as_strided(shape, strides, t.storage_offset())
    return t


def _values(case: Case) -> dict[str, torch.Tensor]:
    """The drawn values of every argument but the output gradient, contiguous, in dtype."""
    g = torch.Generator().manual_seed(case.seed)
    shape, channels = case.shape, case.shape[1]
    f64 = {"generator": g, "dtype": torch.float64}
    per_channel = (1, channels) + (1,) * (len(shape) - 2)
    sign = torch.randint(0, 2, (channels,), generator=g).double() * 2 - 1
    mean = case.offset * sign * (1 + 0.5 * torch.rand(channels, **f64))
    std = case.std * (0.5 + 1.5 * torch.rand(channels, **f64))
    x = torch.randn(shape, **f64) * std.view(per_channel) + mean.view(per_channel)
    if case.nonfinite:
        flat = x.view(-1)
        where = torch.randint(0, flat.numel(), (case.nonfinite,), generator=g)
        kinds = torch.randint(0, 3, (case.nonfinite,), generator=g)
        flat[where] = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype)[kinds]
    values = {"input": x}
    if case.weight:
        values["weight"] = torch.rand(channels, **f64) * 4 - 2
    if case.bias:
        values["bias"] = torch.randn(channels, **f64) * 2
    if case.running:
        if case.training:
            values["running_mean"] = torch.randn(channels, **f64) * (case.offset + 1)
            values["running_var"] = torch.rand(channels, **f64) + 0.5
        else:  # statistics of data like this batch's
            values["running_mean"] = mean + 0.3 * std * torch.randn(channels, **f64)
            values["running_var"] = std**2 * (0.5 + 1.5 * torch.rand(channels, **f64))
    if case.residual:
        values["residual"] = torch.randn(shape, **f64)
    return {name: v.to(case.dtype) for name, v in values.items()}


def _arguments(case: Case) -> dict[str, torch.Tensor]:
    """The arguments, laid out as drawn, with requires_grad as drawn."""
    args = {name: _lay_out(v, case.layout(name)) for name, v in _values(case).items()}
    for name in case.grads:
        if name in args:
            args[name].requires_grad_()
    return args


def _grad_output(case: Case, pre: torch.Tensor, band: float) -> torch.Tensor:
    """dL/dy, laid out as drawn. Where relu's or leaky_relu's kink is within ``band`` of
    the float64 pre-activation, the rounded one may lie on the other side: dL/dy is 0 there.
    (An expand()ed gradient that would need such zeros is made contiguous instead.)"""
    g = torch.Generator().manual_seed(case.seed + 1)
    dy = torch.randn(case.shape, generator=g, dtype=torch.float64)
    layout = case.layout("grad_output")
    if layout.kind == "expand":
        dy = dy.narrow(layout.dim, 0, 1).expand(case.shape).contiguous()
    kink_free = zero_near_kink(dy, pre, case.activation, band, case.negative_slope)
    if kink_free is not dy and layout.kind == "expand":
        layout = Layout(odd=layout.odd)
    return _lay_out(kink_free.to(case.dtype), layout)


# ---------------------------------------------------------------------------------------
# The oracle: torch.nn.functional in float64 (or, for the finiteness pattern of NaN/Inf
# inputs, in the input's dtype).


def _act(pre, activation, negative_slope):
    if activation in (None, "identity"):
        return pre
    if activation == "relu":
        return F.relu(pre)
    if activation == "leaky_relu":
        return F.leaky_relu(pre, negative_slope)
    if activation == "silu":
        return F.silu(pre)
    return F.elu(pre)


def _reduce_dims(x):
    return [0, *range(2, x.dim())]


def _bcast(v, x):
    return v.view(1, -1, *[1] * (x.dim() - 2))


def _canonical(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached copy with the standard contiguous strides. (``t.contiguous()`` keeps the
    strides of size-1 dimensions, and torch 2.13's CPU batch-norm backward miscomputes
    some of those: the oracle must never see them.)"""
    return t.detach().to(dtype).clone(memory_format=torch.contiguous_format)


def oracle(case: Case, args: dict, dtype: torch.dtype, dy=None, shift: bool = True) -> dict:
    """torch.nn.functional's result in ``dtype``: "y", "pre" (before the activation),
    "running_mean", "running_var"; with ``dy`` also the gradient of every tensor argument
    (keyed by its name) and "dpre" = dL/dpre.

    ``shift``: batch norm is invariant to a per-channel shift c of the input (and of the
    running mean), and ATen's float64 kernel loses a few ulps of the channel mean, i.e.
    ~eps64 * mean / std of the result. The float64 oracle therefore normalizes x - c with c
    the channel's mean (training; rounded to the input dtype, so that x - c is exact for
    float32 inputs) or running mean (eval), and adds c back to the running mean."""
    t = {n: _canonical(a, dtype) for n, a in args.items()}
    for name in ("input", "weight", "bias", "residual"):
        if name in t:
            t[name].requires_grad_()
    x, rm, rv = t["input"], t.get("running_mean"), t.get("running_var")
    old_rv = None if rv is None else rv.clone()
    c = torch.zeros(x.shape[1], dtype=dtype)
    if shift and case.training:
        finite = torch.where(x.isfinite(), x, math.nan).detach()
        c = _nan_to_zero(finite.nanmean(_reduce_dims(x))).to(case.dtype).to(dtype)
    elif shift:
        c = rm.clone()
    with torch.enable_grad():
        shifted_rm = None if rm is None else rm - c
        pre = F.batch_norm(x - _bcast(c, x), shifted_rm, rv, t.get("weight"), t.get("bias"),
                           case.training, case.momentum, case.eps)  # fmt: skip
        if case.residual:
            pre = pre + t["residual"]
        y = _act(pre, case.activation, case.negative_slope)
    if rm is not None:
        rm = shifted_rm + c
        if case.training and not case.unbiased:  # stores the biased batch variance
            var = torch.var(x.detach(), _reduce_dims(x), correction=0)
            rv = (1 - case.momentum) * old_rv + case.momentum * var
    out = {"y": y.detach(), "pre": pre.detach(), "running_mean": rm, "running_var": rv}
    if dy is not None:
        names = [n for n in ("input", "weight", "bias", "residual") if n in t]
        grads = torch.autograd.grad(y, [t[n] for n in names] + [pre], _canonical(dy, dtype))
        out.update(zip([*names, "dpre"], grads, strict=True))
    return out


# ---------------------------------------------------------------------------------------
# Comparison.


def _nan_to_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t.isfinite(), t, torch.zeros_like(t))


def _max(t: torch.Tensor | None) -> float:
    """max |t| over its finite values (0 for None or none)."""
    if t is None or not t.numel():
        return 0.0
    return _nan_to_zero(t.detach().double()).abs().max().item()


def _channel_max(t: torch.Tensor) -> torch.Tensor:
    """max |t| per channel (dim 1) over its finite values."""
    a = _nan_to_zero(t.detach().double()).abs().transpose(0, 1)
    return a.reshape(a.shape[0], -1).amax(1)


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """sum |t| per channel over its finite values."""
    return _nan_to_zero(t.detach().double()).abs().sum(_reduce_dims(t))


def _aten_plain_sums(case: Case) -> bool:
    """Whether the call runs on ATen's float32 kernels, which sum in long chains (forced
    "aten", which takes torch's convention only)."""
    return case.backend == "aten" and case.unbiased and case.dtype == torch.float32


def tolerances(case: Case, args: dict, ref: dict, dy: torch.Tensor | None) -> dict[str, float]:
    """The absolute tolerance of every compared result (see the constants at the top), from
    the float64 oracle's values. Per-channel bounds are reduced to their maximum."""
    eps = torch.finfo(case.dtype).eps
    x = args["input"].detach().double()
    channels, count = x.shape[1], x.numel() // x.shape[1]
    mean_ulps, ulps = MEAN_ULPS[case.dtype], ROUNDING_ULPS[case.dtype]
    sum_ulps = ulps  # of a per-channel sum
    if case.dtype == torch.float64 or _aten_plain_sums(case):
        sum_ulps += FLOAT64_ULPS_PER_TERM * count
        mean_ulps += FLOAT64_ULPS_PER_TERM * count if case.training else 0.0
    w = args["weight"].detach().double().abs() if case.weight else torch.ones(channels).double()
    if case.training:
        finite = torch.where(x.isfinite(), x, math.nan)
        mean = finite.nanmean(_reduce_dims(x))
        var = (finite - _bcast(mean, x)).pow(2).nanmean(_reduce_dims(x))
        spread = _max((finite - _bcast(mean, x)).abs().nanmean(_reduce_dims(x)))  # E|x - mean|
    else:
        spread = 0.0  # eval: the running mean is not updated
        mean = args["running_mean"].detach().double()
        var = args["running_var"].detach().double()
    mean, invstd = _nan_to_zero(mean), _nan_to_zero(torch.rsqrt(var + case.eps))
    xhat = (x - _bcast(mean, x)) * _bcast(invstd, x)
    xhat_max = _channel_max(xhat)
    # error of xhat per channel, of the pre-activation, of dL/dpre
    xhat_err = eps * (mean_ulps * invstd * mean.abs() + ulps * (1 + xhat_max))
    scale = (w * xhat_max).max().item() + _max(args.get("bias")) + _max(args.get("residual"))
    y_err = eps * (mean_ulps * (w * invstd * mean.abs()).max().item() + ulps * scale)
    tol = {"y": y_err}
    if case.running:
        old_mean, old_var = _max(args["running_mean"]), _max(args["running_var"])
        tol["running_mean"] = eps * (ulps * (old_mean + _max(mean) + spread)
                                     + mean_ulps * _max(mean))  # fmt: skip
        # var (unbiased: <= 2 var) is a sum, centred on a mean that an online algorithm
        # (Welford's) holds to mean_ulps: a relative error of 2 mean_ulps eps |mean| invstd
        centering = (2 * _nan_to_zero(var) * mean_ulps * mean.abs() * invstd).max().item()
        tol["running_var"] = eps * (ulps * old_var + 2 * sum_ulps * _max(var) + 2 * centering)
    if dy is None:
        return tol
    dpre = ref["dpre"]
    dpre_err = eps * ulps * _max(dpre)
    dpre_err += CURVATURE[case.activation or "identity"] * _max(dy) * y_err
    sum_dpre = _channel_sum(dpre)
    db_err = eps * sum_ulps * sum_dpre + count * dpre_err
    dw_err = eps * sum_ulps * _channel_sum(dpre * xhat) + xhat_err * sum_dpre
    dw_err += count * dpre_err * xhat_max
    dx_err = eps * ulps * _max(dpre) + dpre_err  # eval: dx = weight * invstd * dpre
    if case.training:  # dx = weight * invstd * (dpre - dbias / M - xhat * dweight / M)
        db, dw = _channel_sum(dpre), _channel_sum(dpre * xhat)  # bounds of |dbias|, |dweight|
        dx_err = dx_err + (db_err + xhat_max * dw_err + xhat_err * dw) / count
        dx_err = dx_err + eps * sum_ulps * (db + xhat_max * dw) / count
    tol.update(
        input=(w * invstd * dx_err).max().item(),
        weight=dw_err.max().item(),
        bias=db_err.max().item(),
        residual=dpre_err,
    )
    return tol


_MISMATCHES: dict[str, type[AssertionError]] = {}


def _mismatch(name: str) -> type[AssertionError]:
    """An AssertionError subclass per compared result, so that hypothesis reports (and
    shrinks) a wrong gradient and a wrong output as distinct failures."""
    if name not in _MISMATCHES:
        title = "".join(part.title() for part in name.split("_"))
        _MISMATCHES[name] = type(f"{title}Mismatch", (AssertionError,), {})
    return _MISMATCHES[name]


def compare(name: str, actual, expected, atol: float, pattern=None, case=None) -> None:
    """``actual`` against the float64 ``expected`` within ``atol``; where torch's own result
    in the input dtype (``pattern``) is NaN or +-Inf, ``actual`` must be the same."""
    expected = expected.double()
    if pattern is not None:
        expected = torch.where(pattern.isfinite(), expected, pattern.double())
    where = f"{name} (backend {case.backend if case else None}, atol {atol:.3g})"
    try:
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)}"
        torch.testing.assert_close(actual.detach().double(), expected, rtol=0, atol=atol,
                                   equal_nan=True, msg=lambda m: f"{where}: {m}")  # fmt: skip
    except AssertionError as error:
        raise _mismatch(name)(str(error)) from None


def _grad_names(case: Case, args: dict) -> list[str]:
    return [name for name in case.grads if name in args]


def _layer_for(case: Case, args: dict) -> torch.nn.Module:
    """A layer of our package that computes the case's call with the drawn tensors
    themselves as its parameters and running statistics (their layouts, their
    requires_grad: put into the module's dicts, since a layer would make a Parameter of a
    copy)."""
    options = dict(eps=case.eps, momentum=case.momentum, affine=case.weight,
                   track_running_stats=case.running,
                   unbiased_running_var=case.unbiased)  # fmt: skip
    if case.weight and not case.bias:
        options["bias"] = False
    kind = "BatchNorm"
    if case.activation is not None:
        kind = "BatchNormAct"
        options.update(activation=case.activation, negative_slope=case.negative_slope)
    dims = DIMS_OF_INPUT_RANK[len(case.shape)]
    layer = getattr(batchnorm, f"{kind}{dims}d")(case.shape[1], **options)
    for name in ("weight", "bias"):
        if name in args:
            layer._parameters[name] = args[name]
    for name in ("running_mean", "running_var"):
        if name in args:
            setattr(layer, name, args[name])
    return layer.train(case.training)


def run(case: Case, args: dict, dy: torch.Tensor | None):
    """batchnorm.functional.batch_norm, or a layer (``case.layer``), on the drawn arguments:
    (output, gradients)."""
    with nullcontext() if case.backend is None else ops.use_backend(case.backend, lenient=True):
        if case.layer:
            y = _layer_for(case, args)(args["input"], args.get("residual"))
        else:
            y = BF.batch_norm(
                args["input"], args.get("running_mean"), args.get("running_var"),
                args.get("weight"), args.get("bias"), case.training, case.momentum, case.eps,
                activation=case.activation, negative_slope=case.negative_slope,
                residual=args.get("residual"), unbiased_running_var=case.unbiased,
            )  # fmt: skip
        if dy is None:
            return y, ()
        return y, torch.autograd.grad(y, [args[n] for n in _grad_names(case, args)], dy)


def check(case: Case) -> None:
    """Run one case through batchnorm.functional.batch_norm or a layer and compare with the
    oracle."""
    args = _arguments(case)
    ref = oracle(case, args, torch.float64)
    dy = None
    if _grad_names(case, args):
        dy = _grad_output(case, ref["pre"], KINK_MARGIN * tolerances(case, args, ref, None)["y"])
        ref = oracle(case, args, torch.float64, dy)
    tol = tolerances(case, args, ref, dy)
    # With NaN/Inf inputs, torch's own result in the input dtype says where they belong.
    pattern = oracle(case, args, case.dtype, dy, shift=False) if case.nonfinite else {}
    y, grads = run(case, args, dy)
    assert y.dtype == case.dtype, y.dtype
    compare("output", y, ref["y"], tol["y"], pattern.get("y"), case)
    for name in ("running_mean", "running_var"):
        if name in args:
            compare(name, args[name], ref[name], tol[name], pattern.get(name), case)
    if case.nonfinite and case.activation == "elu":
        return  # torch's own elu gradient at NaN is 1 in its scalar loop, NaN in its SIMD one
    for name, grad in zip(_grad_names(case, args), grads, strict=True):
        compare(f"grad_{name}", grad, ref[name], tol[name], pattern.get(name), case)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no "explain": slow, and noise
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_matches_float64_oracle(case):
    check(case)


# ---------------------------------------------------------------------------------------
# Regression tests: what the fuzzer found, each reduced to a few lines. The expected values
# come from torch.nn.functional in float64 on contiguous copies.

FLOAT32_EPS = torch.finfo(torch.float32).eps


def _expected(x, running_mean, running_var, weight, bias, training, activation=None, dy=None):
    """torch.nn.functional's output (and dL/dx, dL/dweight, dL/dbias for ``dy``), float64."""
    x64, w64, b64, rm, rv = (
        None if t is None else _canonical(t, torch.float64)
        for t in (x, weight, bias, running_mean, running_var)
    )
    for t in (x64, w64, b64):
        if t is not None:
            t.requires_grad_()
    y = _act(F.batch_norm(x64, rm, rv, w64, b64, training), activation, 0.01)
    if dy is None:
        return y.detach()
    inputs = [t for t in (x64, w64, b64) if t is not None]
    return (y.detach(), *torch.autograd.grad(y, inputs, _canonical(dy, torch.float64)))


def _assert_close(actual, expected, rtol=1e-5):
    """Within rtol of the expected tensor's largest magnitude (these bugs are gross)."""
    atol = rtol * max(1.0, _max(expected))
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol,
                               equal_nan=True)  # fmt: skip


def _column(v: torch.Tensor) -> torch.Tensor:
    """v as the column of a 2-D tensor: w[:, 0], stride 2."""
    return torch.stack([v, torch.full_like(v, math.nan)], 1)[:, 0]


NON_CONTIGUOUS = {
    "expand": lambda v: v[:1].expand(v.shape[0]),  # stride 0
    "column": _column,
    "step": lambda v: torch.stack([v, torch.full_like(v, math.nan)], 1).flatten()[::2],
}


def test_expanded_weight_on_the_numba_path():
    """Bug 1 as reported: x = randn(4096, 64), weight = tensor([2.]).expand(64) gave
    max |ours - torch| ~ 6e9 (the kernel read freed memory)."""
    torch.manual_seed(0)
    x = torch.randn(4096, 64, requires_grad=True)
    leaf = torch.tensor([2.0], requires_grad=True)
    weight = leaf.expand(64)
    dy = torch.randn(4096, 64)
    y = BF.batch_norm(x, None, None, weight, None, training=True)
    dx, dleaf = torch.autograd.grad(y, [x, leaf], dy)
    y64, dx64, dw64 = _expected(x, None, None, weight, None, True, dy=dy)
    _assert_close(y, y64)
    _assert_close(dx, dx64)
    _assert_close(dleaf, dw64.sum().view(1))


@pytest.mark.parametrize("kind", sorted(NON_CONTIGUOUS))
@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_weight_and_bias_on_the_numba_path(kind, which, training):
    """Bug 1: any non-contiguous weight or bias (stride 0, a column, a step slice), in
    training and in eval, forward and backward."""
    torch.manual_seed(0)
    x = (torch.randn(512, 8, 4, 4) * 3 + 1).requires_grad_()
    params = {"weight": torch.rand(8) + 0.5, "bias": torch.randn(8)}
    params[which] = NON_CONTIGUOUS[kind](params[which])
    weight, bias = (params[n].requires_grad_() for n in ("weight", "bias"))
    rm, rv = torch.randn(8), torch.rand(8) + 0.5
    dy = torch.randn_like(x)
    with ops.use_backend("numba"):
        y = BF.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training, activation="relu")
        grads = torch.autograd.grad(y, [x, weight, bias], dy)
    expected = _expected(x, rm, rv, weight, bias, training, "relu", dy)
    for actual, wanted in zip((y, *grads), expected, strict=True):
        _assert_close(actual, wanted)


@pytest.mark.parametrize("shape", [(64, 8), (8, 4, 3, 3)], ids=["NC", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_weight_on_the_aten_path(shape, training):
    """Bug 2: ATen's CPU backward (torch 2.13) with a non-contiguous weight gives a wrong
    (or NaN) dx for (N, C) and channels-last inputs."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = _column(torch.rand(shape[1]) + 0.5).requires_grad_()
    rm, rv = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    dy = torch.randn_like(x)
    y = BF.batch_norm(x, rm.clone(), rv.clone(), weight, None, training)  # small: ATen
    dx, dw = torch.autograd.grad(y, [x, weight], dy)
    y64, dx64, dw64 = _expected(x, rm, rv, weight, None, training, dy=dy)
    _assert_close(y, y64)
    _assert_close(dx, dx64)
    _assert_close(dw, dw64)


def _odd_size1_strides(t: torch.Tensor) -> torch.Tensor:
    """t (N, C, L, 1) stored as (N, L, C): ``t[..., 0].transpose(1, 2).contiguous()
    .transpose(1, 2).unsqueeze(-1)``, strides (L*C, 1, C, 1) for (4, 8, 5, 1)."""
    return t[..., 0].transpose(1, 2).contiguous().transpose(1, 2).unsqueeze(-1)


@pytest.mark.parametrize("odd", ["grad_output", "input"])
@pytest.mark.parametrize("training", [True, False])
def test_size1_dims_with_odd_strides_on_the_aten_path(odd, training):
    """Bug 2: an output gradient with size-1 dims and odd strides, e.g.
    ``dy.transpose(1, 2).unsqueeze(-1)`` with strides (40, 1, 8, 1), gave a wrong dx and
    dbias through ATen; the same layout of the input does too."""
    torch.manual_seed(0)
    x, dy = torch.randn(4, 8, 5, 1), torch.randn(4, 8, 5, 1)
    if odd == "grad_output":
        dy = _odd_size1_strides(dy)
        assert dy.stride() == (40, 1, 8, 1)
    else:
        x = _odd_size1_strides(x)
    x.requires_grad_()
    weight, bias = (torch.rand(8) + 0.5).requires_grad_(), torch.randn(8, requires_grad=True)
    rm, rv = torch.randn(8), torch.rand(8) + 0.5
    y = BF.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training)
    grads = torch.autograd.grad(y, [x, weight, bias], dy)
    expected = _expected(x, rm, rv, weight, bias, training, dy=dy)
    for actual, wanted in zip((y, *grads), expected, strict=True):
        _assert_close(actual, wanted)


@pytest.mark.usefixtures("cpp_declines_nchw_training")
@pytest.mark.parametrize("training", [True, False])
def test_expanded_output_gradient_of_many_planes_on_the_aten_path(training):
    """Found by the fuzzer (20,000 examples): given an output gradient expanded along the
    batch (stride 0, as ``y.sum().backward()`` gives), ATen's backward of an NCHW input
    adds a channel's plane sums in one chain. (477, 2, 2), which the dispatch gives ATen
    (small planes): dbias up to 44 float32 ulps of the sum of its terms' magnitudes off,
    above the fuzzer's 16; given the output's layout, below 1."""
    shape = (477, 2, 2)
    assert ops.select(Call(torch.empty(shape), training, "identity", 0.01, False)).name == "aten"
    worst = 0.0
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g)
        dy = torch.randn((1, *shape[1:]), generator=g).expand(shape)
        bias = torch.randn(2, generator=g, requires_grad=True)
        y = BF.batch_norm(x, torch.zeros(2), torch.ones(2), None, bias, training)
        (dbias,) = torch.autograd.grad(y, [bias], dy)
        exact, magnitude = dy.double().sum((0, 2)), dy.double().abs().sum((0, 2))
        ulps = (dbias.double() - exact).abs() / (magnitude * torch.finfo(torch.float32).eps)
        worst = max(worst, ulps.max().item())
    assert worst < 2


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(64, 8), (8, 4, 3, 3)], ids=["NC", "channels_last"])
def test_non_contiguous_running_stats_in_eval_on_the_aten_path(which, shape):
    """Found by the fuzzer (not in the first list): in eval mode, ATen's CPU backward
    (torch 2.13) reads a non-contiguous running_var (dx, dweight) or running_mean (dweight)
    as if it were contiguous: garbage up to 1e28, or NaN."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.rand(shape[1]) + 0.5).requires_grad_()
    stats = {"running_mean": torch.randn(shape[1]), "running_var": torch.rand(shape[1]) + 0.5}
    stats[which] = _column(stats[which])
    dy = torch.randn_like(x)
    y = BF.batch_norm(x, stats["running_mean"], stats["running_var"], weight)
    dx, dw = torch.autograd.grad(y, [x, weight], dy)
    y64, dx64, dw64 = _expected(x, stats["running_mean"], stats["running_var"], weight, None,
                                False, dy=dy)  # fmt: skip
    _assert_close(y, y64)
    _assert_close(dx, dx64)
    _assert_close(dw, dw64)


@pytest.mark.parametrize(
    "shape,mean,std", [((200, 8), 1e4, 1.0), ((200, 8), 1e6, 1.0), ((21845, 3), 14761.0, 0.55)]
)
def test_small_float32_input_with_a_large_mean_is_normalized_stably(shape, mean, std):
    """Bug 2: float32 batches below 65,536 values go to ATen, whose float32 statistics
    lose digits: (200, 8) of mean 1e4 or 1e6 is off by 1.2-2x an ulp of the mean per
    normalized value, and (21845, 3) of mean 14761, std 0.55 by 1.7 (its mean is off by
    0.66 std; ours: 8e-4). The bound is the fuzzer's: an ulp of the mean times invstd, plus
    16 ulps of the result (ours stays below half the first term, the rounding of the mean)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).float()
    y = BF.batch_norm(x, None, None, training=True)
    expected = F.batch_norm(x.double() - mean, None, None, training=True)  # exact shift
    invstd = x.double().var(0, correction=0).rsqrt().max().item()
    bound = FLOAT32_EPS * (MEAN_ULPS[torch.float32] * mean * invstd + 16 * 5)
    assert (y.double() - expected).abs().max().item() <= bound


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "shape,memory_format",
    [((2040, 1), None), ((4, 3, 24, 24), torch.channels_last), ((1, 2, 64, 64), None),
     ((2, 2, 128, 128), None)],
    ids=["NC", "channels_last", "NCHW", "NCHW-65536"],
)  # fmt: skip
def test_long_sums_of_equal_terms_stay_accurate(shape, memory_format, training):
    """Found by ``make fuzz``: an input and an output gradient constant along the batch
    (expand()ed), (2040, 1) in eval. ATen's (N, C) kernel added the 2040 equal terms of
    dweight and dbias one by one in float32, 240 ulps of their magnitudes off; the bound is
    16 (ROUNDING_ULPS). Its NCHW kernel does the same on large planes: 32-129 ulps on planes
    of 4096-16384 values. The default dispatch gives such long sums to the kernels (see
    backends.aten.ATEN_MAX_ROWS). In training x is constant per channel here, so only
    dbias has terms."""
    g = torch.Generator().manual_seed(0)
    channels = shape[1]
    layout = (channels, *([1] * (len(shape) - 2)))
    x = torch.randn(layout, generator=g).expand(shape)
    dy = torch.randn(layout, generator=g).expand(shape)
    x, dy = (t.contiguous(memory_format=memory_format or torch.contiguous_format) for t in (x, dy))
    weight = (torch.rand(channels, generator=g) + 0.5).requires_grad_()
    bias = torch.randn(channels, generator=g).requires_grad_()
    rm, rv = torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5
    y = BF.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training=training)
    dw, db = torch.autograd.grad(y, [weight, bias], dy)
    x64, dy64 = x.double(), dy.double()
    dims = [d for d in range(x.dim()) if d != 1]
    if training:
        mean, var = x64.mean(dims), x64.var(dims, correction=0)
    else:
        mean, var = rm.double(), rv.double()
    view = (1, channels, *([1] * (len(shape) - 2)))
    xhat = (x64 - mean.view(view)) * (var.view(view) + 1e-5).rsqrt()
    for got, terms in ((dw, dy64 * xhat), (db, dy64)):
        bound = ROUNDING_ULPS[torch.float32] * FLOAT32_EPS * terms.abs().sum(dims)
        assert ((got.double() - terms.sum(dims)).abs() <= bound).all()


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0, 0.0, None])
@pytest.mark.parametrize("shape", [(64, 8), (8, 8, 3, 3)], ids=["NC", "channels_last"])
def test_shifted_aten_path_keeps_the_running_mean_and_backward(momentum, shape):
    """The ATen path shifts float32 (N, C) and channels-last inputs and gives the running
    mean the shift's share of the update: the running statistics of training steps equal
    torch's in float64, and backward passes ATen's version check of the running mean it
    saved, also for a layer called twice before backward; the running statistics count
    one in-place change a call, as torch.nn's."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 0.5 + 300
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    ours = (batchnorm.BatchNorm1d if x.dim() == 2 else batchnorm.BatchNorm2d)(8, momentum=momentum)
    torch_layer = (torch.nn.BatchNorm1d if x.dim() == 2 else torch.nn.BatchNorm2d)(
        8, momentum=momentum, dtype=torch.float64
    )
    for step in range(2):
        xs = (x + step).float().requires_grad_()
        ours(xs).square().sum().backward()
        torch_layer(x + step)
        assert xs.grad is not None and torch.isfinite(xs.grad).all()
    # a layer called twice before backward (shared weights), as torch.nn allows
    xs = x.float().requires_grad_()
    (ours(xs) + ours(2 * xs)).square().sum().backward()
    torch_layer(x), torch_layer(2 * x)
    with torch.no_grad():  # no graph: the running mean is updated in place
        ours(x.float() - 1), torch_layer(x - 1)
    for name in ("running_mean", "running_var"):  # within the input's float32 rounding
        torch.testing.assert_close(
            getattr(ours, name).double(), getattr(torch_layer, name), rtol=1e-4, atol=1e-4
        )
        # one in-place change a call, as torch.nn's (what autograd's checks count)
        assert getattr(ours, name)._version == getattr(torch_layer, name)._version


BACKEND_NAMES = [None, *ops.available_backends()]


def _backend(name):
    return nullcontext() if name is None else ops.use_backend(name, lenient=True)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_eval_backward_at_a_non_finite_input(backend, value):
    """Bug 3: in eval mode dx = dy * weight * invstd does not depend on x; torch's is finite
    at a NaN/Inf input, ours was NaN (0 * inf in the Numba kernels)."""
    x = torch.randn(6, 3, 5)
    x[2, 1, 3] = value
    x.requires_grad_()
    weight, rm, rv = torch.rand(3) + 0.5, torch.randn(3), torch.rand(3) + 0.5
    dy = torch.randn(6, 3, 5)
    with _backend(backend):
        y = BF.batch_norm(x, rm, rv, weight, unbiased_running_var=backend is not None)
        (dx,) = torch.autograd.grad(y, [x], dy)
    _, expected = _expected(x, rm, rv, weight, None, False, dy=dy)[:2]
    assert expected.isfinite().all()
    _assert_close(dx, expected)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_a_constant_channel_normalizes_to_zero(backend):
    """Found by a 20,000-example fuzz run (2026-12-06): a float32 batch constant along the
    batch ((25, 5), values of size 100; here 64 channels), whose variance is 0 and invstd
    1/sqrt(eps) = 316. The reference backend rounded its float64 sum to float32 before
    dividing by the count: a mean an ulp off the channel's value, so x - mean = 1.5e-5 and
    y = 4.8e-3 instead of 0 (and dx 1.5x the fuzzer's bound off). Float64 sums divided
    before rounding give the value itself, as every other backend does."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 64, generator=g) * 100).expand(25, 64).clone().requires_grad_()
    dy = torch.randn(25, 64, generator=g)
    with _backend(backend):
        y = BF.batch_norm(x, None, None, training=True)
        (dx,) = torch.autograd.grad(y, [x], dy)
    assert torch.equal(y, torch.zeros_like(y))
    _assert_close(dx, _expected(x, None, None, None, None, True, dy=dy)[1])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_inf_in_a_training_batch_gives_an_infinite_running_mean(backend):
    """Bug 3: an +Inf in the batch makes the channel's mean +inf: torch's running_mean
    becomes inf (and its running_var NaN); ours became NaN."""
    x = torch.randn(64, 3)
    x[5, 1] = math.inf
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_torch, rv_torch = rm.clone(), rv.clone()
    with _backend(backend):
        BF.batch_norm(x, rm, rv, training=True)
    F.batch_norm(x, rm_torch, rv_torch, training=True)
    assert rm[1].item() == math.inf and rv[1].isnan()
    _assert_close(rm, rm_torch.double())
    _assert_close(rv, rv_torch.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
def test_activation_gradient_at_a_nan_input_matches_torch(backend, activation, dtype):
    """Found by the fuzzer: at a NaN pre-activation torch's relu passes the gradient through
    (its test ``x <= 0`` is false for NaN) and leaky_relu passes it times the slope (``x >
    0`` is false); ours gave 0 (relu) or NaN (the Numba kernels' 0 * NaN in eval), also in
    the dbias of a training channel that an Inf made all-NaN. Again by a 20,000-example run
    (2026-12-06): the C++ backend's relu gave 0, which float64 inputs (not its dtype) had
    not reached, and so did the Triton kernels' (in float32 in the interpreter's child).
    (torch's elu is not consistent there: 1 in its scalar loop, NaN in its vectorized
    one.)"""
    x = torch.randn(6, 3, dtype=dtype)
    x[2, 1] = math.nan
    x.requires_grad_()
    bias = torch.zeros(3, dtype=dtype, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    dy = torch.ones(6, 3, dtype=dtype)
    for training in (False, True):
        with _backend(backend):
            y = BF.batch_norm(x, rm, rv, None, bias, training, 0.0, activation=activation)
            grads = torch.autograd.grad(y, [x, bias], dy)
        expected = _expected(x, rm, rv, None, bias, training, activation, dy)[1:]
        for actual, wanted in zip(grads, expected, strict=True):
            _assert_close(actual, wanted)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("activation,slope", [("silu", 0.01), ("leaky_relu", 0.0)])
def test_activation_of_minus_inf_matches_torch(backend, activation, slope):
    """Found by the fuzzer: torch's silu(-inf) and leaky_relu(-inf, 0) are NaN (-inf * 0);
    the Numba kernels gave -inf and 0."""
    x = torch.tensor([[-math.inf, math.inf, math.nan, 1.0]]).repeat(2, 1)
    rm, rv = torch.zeros(4), torch.ones(4)
    with _backend(backend):
        y = BF.batch_norm(x, rm, rv, activation=activation, negative_slope=slope,
                          unbiased_running_var=backend is not None)  # fmt: skip
    expected = _act(F.batch_norm(x.double(), rm.double(), rv.double()), activation, slope)
    _assert_close(y, expected)


def test_float32_channel_sums_of_the_elu_fallback_are_accurate():
    """Found by the fuzzer: the Numba backend hands elu to the reference backend, whose
    float32 dbias/dweight are torch sums over dims (0, 2, ...): their rounding error grows
    with N (6e-6 relative here, 50 ulps; torch's own: 3e-8). The fuzzer's bound is 16 ulps
    of the sum of |terms|."""
    torch.manual_seed(0)
    x = torch.randn(32768, 4, 3)
    weight, bias = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    y = BF.batch_norm(x, None, None, weight, bias, training=True, activation="elu")
    grads = torch.autograd.grad(y.sum(), [weight, bias])
    _, _, dw64, db64 = _expected(x, None, None, weight, bias, True, "elu", torch.ones_like(x))
    for actual, wanted in zip(grads, (dw64, db64), strict=True):
        torch.testing.assert_close(actual.double(), wanted, rtol=16 * FLOAT32_EPS, atol=0)


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_non_positive_eps_in_training_raises(eps):
    """Bug 4: torch raises (ValueError in torch 2.13) for eps <= 0 in training; we
    accepted it (eps = 0 divides by zero on a constant channel)."""
    x = torch.randn(8, 3)
    with pytest.raises((ValueError, RuntimeError)):
        F.batch_norm(x, None, None, training=True, eps=eps)
    with pytest.raises((ValueError, RuntimeError)):
        BF.batch_norm(x, None, None, training=True, eps=eps)


def test_negative_eps_in_eval_raises():
    """Found by the fuzzer's neighbour of bug 4: torch raises for eps < 0 in eval too."""
    x, rm, rv = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
    with pytest.raises((ValueError, RuntimeError)):
        F.batch_norm(x, rm, rv, training=False, eps=-1.0)
    with pytest.raises((ValueError, RuntimeError)):
        BF.batch_norm(x, rm, rv, training=False, eps=-1.0)


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_one_running_statistic_without_the_other_raises(given):
    """Bug 4: running_mean without running_var (or the reverse) was silently not updated;
    torch raises."""
    x = torch.randn(8, 3)
    stats = {"running_mean": None, "running_var": None, given: torch.ones(3)}
    with pytest.raises((ValueError, RuntimeError)):
        F.batch_norm(x, stats["running_mean"], stats["running_var"], training=True)
    with pytest.raises((ValueError, RuntimeError)):
        BF.batch_norm(x, stats["running_mean"], stats["running_var"], training=True)


def test_residual_of_another_dtype_raises():
    """Bug 4: a float64 residual with a float32 input was not checked (torch has no
    residual to compare with: we require a clear error)."""
    x, residual = torch.randn(8, 3), torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises((TypeError, ValueError), match="residual"):
        BF.batch_norm(x, None, None, training=True, residual=residual)
