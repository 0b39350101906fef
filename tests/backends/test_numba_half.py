"""The Numba kernels on bfloat16 and float16 inputs with float32 parameters (torch.autocast's
convention): the conversions bit for bit against torch's, the kernels against the float64
oracle (no worse than twice the rounding of the exact result to the input's dtype)."""

import math
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

import batchnorm.functional as BF
from batchnorm import BatchNorm1d, ops
from batchnorm.backends import Call
from batchnorm.backends import aten as aten_backend
from batchnorm.backends.cpp_cpu import CppBackend
from batchnorm.backends.numba_cpu import channels_first, halves, jit
from conftest import (
    assert_close,
    assert_within_rounding,
    float64_batch_norm,
    floats_to_round,
    half_bits_as_float,
    random_input,
    same_values,
)

HALF = {"bf16": torch.bfloat16, "f16": torch.float16}
_STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.int16}


@njit
def _load_all(bits, out):
    for i in range(bits.shape[0]):
        out[i] = halves._ld(bits[i])


@njit
def _store_all(values, out):
    for i in range(values.shape[0]):
        out[i] = halves._st(values[i], out)


@njit
def _f16_by_integers(bits, values, loaded, stored):
    """The integer-only float16 conversions (those of CPUs without F16C)."""
    for i in range(bits.shape[0]):
        loaded[i] = halves._f16_load(bits[i])
    for i in range(values.shape[0]):
        stored[i] = halves._f16_store(values[i])


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_loads_and_stores_are_torchs_conversions(dtype):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(_STORAGE[dtype])
    loaded = np.empty(bits.shape, np.float32)
    _load_all(bits, loaded)
    assert same_values(loaded, half_bits_as_float(bits, dtype)).all()
    values = floats_to_round(dtype)
    stored = np.empty(values.shape, _STORAGE[dtype])
    _store_all(values, stored)
    expected = torch.from_numpy(values).to(dtype).view(torch.int16).numpy()
    assert same_values(half_bits_as_float(stored, dtype), half_bits_as_float(expected, dtype)).all()


def test_float16_by_integers_matches_torch():
    """The fallback where the CPU has no float16 instructions, whichever this one has."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    values = floats_to_round(torch.float16)
    loaded, stored = np.empty(bits.shape, np.float32), np.empty(values.shape, np.int16)
    _f16_by_integers(bits, values, loaded, stored)
    assert same_values(loaded, half_bits_as_float(bits, torch.float16)).all()
    expected = torch.from_numpy(values).to(torch.float16).view(torch.int16).numpy()
    as_float16 = [half_bits_as_float(bits, torch.float16) for bits in (stored, expected)]
    assert same_values(*as_float16).all()


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((300, 24), False), ((6, 16, 9, 7), False), ((6, 16, 9, 7), True), ((8, 4, 48, 48), True),
     ((8, 4, 48, 48), False)],
    ids=["NC", "NCHW", "NHWC", "NHWC-parallel", "NCHW-parallel"],
)  # fmt: skip
def test_half_kernels_are_within_rounding_of_float64(shape, channels_last, activation, training,
                                                     dtype):  # fmt: skip
    x = random_input(shape, torch.float32, channels_last, seed=1, mean=3.0).to(dtype)
    channels = shape[1]
    g = torch.Generator().manual_seed(2)
    w, b = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    z = random_input(shape, torch.float32, channels_last, seed=3).to(dtype)
    # a gradient of mean 0 per channel (one with a large mean makes dweight depend on the
    # rounding of the saved float32 mean, in torch's kernels as in ours)
    dy = torch.randn(shape, generator=g).to(dtype)
    rm = rv = None
    if not training:
        rm, rv = torch.randn(channels, generator=g), torch.rand(channels, generator=g) + 0.5
    # The residual on the serial shapes only: the parallel kernels run the same loops, their
    # residual specializations are tested in float32 (test_numba_cpu), and compiling them
    # for both halves too cost the suite about a minute.
    for residual in (None, z) if x.numel() < jit.SERIAL_BELOW else (None,):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None
                  for t in (x, w, b, residual)]  # fmt: skip
        with ops.use_backend("numba"):
            y = BF.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training,
                              activation=activation, residual=leaves[3])  # fmt: skip
            y.backward(dy)
        assert y.dtype == dtype and leaves[1].grad.dtype == torch.float32
        act = {"relu": torch.relu, "silu": F.silu, None: None}[activation]
        running = None if rm is None else (rm, rv)
        exact_y, exact_grads = float64_batch_norm(x, w, b, residual, running, training, act, dy)
        assert_within_rounding(y, exact_y, dtype)
        got = [t.grad for t in leaves if t is not None]
        for i, (grad, exact) in enumerate(zip(got, exact_grads, strict=True)):
            if i in (1, 2):  # weight and bias: float32, as the project's float32 results
                assert_close(grad, exact, torch.float32)
            else:
                assert_within_rounding(grad, exact, dtype)


def test_bfloat16_channel_by_channel_keeps_silus_gradient_in_float32():
    """An NCHW input over channels_first.BEYOND_CACHE bytes, of long rows, runs channel by
    channel, and SiLU's dL/d(pre-activation) is kept for the channel's dx in float32, not
    rounded."""
    shape = (1, 8, 1600, 1024)
    assert 2 * math.prod(shape) > channels_first.BEYOND_CACHE
    assert 2 * shape[2] * shape[3] >= channels_first.LONG_ROW_BYTES
    test_half_kernels_are_within_rounding_of_float64(shape, False, "silu", True,
                                                     torch.bfloat16)  # fmt: skip


@pytest.mark.auto_dispatch
@pytest.mark.usefixtures("cpp_declines_nchw_training")
def test_large_half_inputs_dispatch_to_the_kernels():
    """Training on a large enough bfloat16/float16 input (as torch.autocast("cpu") gives a
    BatchNorm after a convolution) goes to the Numba kernels, not to ATen."""
    for dtype in HALF.values():
        x = torch.randn(16, 8, 32, 32, dtype=dtype)
        assert (
            ops.dispatch.select(Call(x, True, "identity", 0.01, False, False, True)).name == "numba"
        )


@pytest.mark.auto_dispatch
def test_half_inputs_of_rows_go_to_aten_below_their_threshold_on_more_threads():
    """Half-precision (N, C) and channels-last training inputs below
    ATEN_BELOW_NUMEL_HALF_ROWS_THREADED values go to ATen with more than one thread, larger
    ones to the Numba kernels, behind the C++ backend, which comes first where it is built
    (bfloat16, and float16 where the CPU has AVX-512, at any size: test_cpp_cpu.py); on one
    thread the kernels take them from ATEN_BELOW_NUMEL values."""
    below = aten_backend.ATEN_BELOW_NUMEL_HALF_ROWS_THREADED
    behind_cpp = ops.available_backends().index("cpp_cpu") + 1  # the backends before: declined

    def chosen(x):
        call = Call(x, True, "relu", 0.01, False, False, True)
        return ops.dispatch.select(call, declined=behind_cpp).name

    def aten_prefers(x):
        return aten_backend.AtenBackend().preferred(Call(x, True, "identity", 0.01, False))

    rows = torch.zeros(below // 256, 256, dtype=torch.float16)  # just below
    channels_last = torch.zeros(8, 256, 12, 12, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert chosen(rows) == "aten"
        assert chosen(channels_last) == "aten"
        assert chosen(torch.zeros(below // 256 + 1, 256, dtype=torch.float16)) == "numba"
        assert aten_prefers(rows.bfloat16())
        assert not aten_prefers(torch.zeros(below // 256 + 1, 256, dtype=torch.bfloat16))
        assert not aten_prefers(torch.zeros(below // 256, 256))  # float32: the kernels
        torch.set_num_threads(1)
        assert chosen(rows) == "numba"
        assert chosen(channels_last) == "numba"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.auto_dispatch
@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
@pytest.mark.usefixtures("cpp_declines_nchw_training")
def test_half_nchw_training_steps_go_to_aten_below_their_threshold_on_more_threads(dtype):
    """Plain BN on a half-precision NCHW input below ATEN_BELOW_NUMEL_HALF_PLANES_GRAPH
    values whose call autograd records goes to ATen with more than one thread; without
    autograd, with an activation or residual, larger, or on one thread, to the kernels."""
    below = aten_backend.ATEN_BELOW_NUMEL_HALF_PLANES_GRAPH
    x = torch.zeros(8, 64, 24, 24, dtype=dtype)  # 294,912 values
    assert x.numel() < below
    larger = torch.zeros(8, 64, 38, 38, dtype=dtype).requires_grad_()
    assert larger.numel() >= below

    def chosen(x, activation="identity", residual=False):
        return ops.dispatch.select(Call(x, True, activation, 0.01, residual, False, True)).name

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            assert chosen(x.requires_grad_()) == "numba"
        assert chosen(x) == "aten"
        weight = torch.ones(64, requires_grad=True)  # a graph for the weight's gradient only
        assert ops.dispatch.select(Call(x.detach(), True, "identity", 0.01, False, False,
                                        True, weight)).name == "aten"  # fmt: skip
        assert chosen(x.detach()) == "numba"
        assert chosen(x, "relu") == "numba"
        assert chosen(x, residual=True) == "numba"
        assert chosen(larger) == "numba"
        torch.set_num_threads(1)
        assert chosen(x) == "numba"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.auto_dispatch
def test_large_bfloat16_eval_runs_on_the_kernels():
    """Where the C++ backend does not take them (it takes bfloat16 (N, C), channels-last
    and NCHW eval calls where it is built), plain eval goes to ATen, but for bfloat16
    inputs of BFLOAT16_EVAL_FROM values or more, whose conversions ours do faster; a layer's
    eval shortcut follows the rule and its output is within rounding of float64."""
    large = aten_backend.BFLOAT16_EVAL_FROM

    def chosen(x):
        return ops.dispatch.select(Call(x, False, "identity", 0.01, False, False, True)).name

    assert chosen(torch.zeros(large // 1024, 1024, dtype=torch.bfloat16)) == "numba"
    assert chosen(torch.zeros(large // 1024 - 1, 1024, dtype=torch.bfloat16)) == "aten"
    assert chosen(torch.zeros(large // 1024, 1024, dtype=torch.float16)) == "aten"
    assert chosen(torch.zeros(large // 1024, 1024)) == "aten"
    layer = BatchNorm1d(1024).eval()
    with torch.no_grad():
        layer.running_mean.normal_(3.0)
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = random_input((large // 1024, 1024), torch.float32, False, seed=4, mean=3.0)
    with (
        patch.object(torch, "batch_norm", side_effect=AssertionError("ATen was called")),
        patch.object(CppBackend, "supports", return_value=False),
    ):
        y = layer(x.to(torch.bfloat16))
    exact = F.batch_norm(x.to(torch.bfloat16).double(), layer.running_mean.double(),
                         layer.running_var.double(), layer.weight.double(),
                         layer.bias.double())  # fmt: skip
    assert_within_rounding(y, exact, torch.bfloat16)
