"""The C++ backend (batchnorm.backends.cpp_cpu): float32 and bfloat16 (N, C) and
channels-last calls, training and eval, in one C++ autograd node; serial loops for small
inputs, torch's threads for large ones; NCHW inference, and NCHW training up to 524,288
values (bfloat16 with a fused ReLU or leaky ReLU: any size); half-precision inference in
AVX-512.

The oracle is torch.nn's layer in float64 on the same float32-rounded inputs (bfloat16 and
float16: the float64 result rounded to the dtype, see the end of this file); every test
first checks that the dispatch really gives its calls to this backend (else it would test
ATen). The build, its cache and its fallback: test_cpp_cpu_build.py.
"""

import math

import pytest
import torch

import batchnorm
from batchnorm import ops
from batchnorm.backends import Call
from batchnorm.backends.cpp_cpu import ACTIVATION_CODES, TAKES, extension
from conftest import (
    TOLERANCES,
    assert_close,
    assert_within_rounding,
    float64_batch_norm,
    floats_to_round,
    random_input,
    same_values,
    zero_near_kink,
)

# The backend is optional: where no C++ compiler is found it is not built, and its calls run
# on ATen (test_cpp_cpu_build.py tests that fallback). These tests check the built kernels,
# so they skip there; test_cpp_cpu_build.py fails if a compiler is found and it did not
# build, so that this skip cannot hide a broken build on our machines and CI.
pytestmark = pytest.mark.skipif(extension() is None, reason="the C++ extension did not build")

TORCH_LAYERS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                5: torch.nn.BatchNorm3d}  # fmt: skip
OURS = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
        5: batchnorm.BatchNorm3d}  # fmt: skip
FUSED = {2: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d}
SHAPES = {
    "(100,128)": ((100, 128), False),
    "(2,3)": ((2, 3), False),
    "channels_last": ((8, 16, 3, 3), True),
    "channels_last_3d": ((2, 4, 3, 2, 2), True),
    "(N,C,1,1)": ((6, 5, 1, 1), False),
    # rows.cpp's parallel path: over 65,536 values, summed in 10 and 8 blocks of rows (not
    # a multiple of 8 rows: the loops' remainders)
    "(8203,40) threaded": ((8203, 40), False),
    "channels_last threaded": ((13, 24, 29, 31), True),
    # rows.cpp's prefetching loops (kPrefetchFrom; rows shorter than 1024 channels, not a
    # multiple of 16 floats, a cache line): the forward's and the backward's, over 4,194,304
    # values, and the backward's only, over 2,097,152
    "(32771,130) prefetched": ((32771, 130), False),
    "channels_last prefetched": ((3, 136, 73, 71), True),
    # NCHW in training or with a graph (rows.cpp's forward_planes, a channel at a time; up to
    # kPlanesUpTo values): planes shorter than kShortPlane (SiLU through a buffer, its
    # backward in blocks of planes) and longer, (N, C, L) and NCDHW, and over 65,536 values
    # (channels, or blocks of short planes, on torch's threads)
    "NCHW": ((8, 16, 3, 3), False),
    "(N,C,L)": ((4, 6, 7), False),
    "NCDHW": ((2, 4, 3, 2, 2), False),
    "NCHW threaded": ((3, 24, 33, 37), False),
    "NCHW short planes threaded": ((16, 600, 3, 3), False),
}


def _runs_here(x: torch.Tensor, training: bool = True, activation: str = "identity",
               graph: bool = False) -> None:  # fmt: skip
    stats = (None, None) if training else (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
    weight = torch.ones(x.shape[1], requires_grad=True) if graph else None
    call = Call(x, training, activation, 0.01, False, False, True, weight, None, *stats)
    assert ops.select(call).name == "cpp_cpu"


def _pair(shape, **options):
    ours = OURS[len(shape)](shape[1], **options)
    ref = TORCH_LAYERS[len(shape)](shape[1], dtype=torch.float64, **options)
    with torch.no_grad():
        if ours.weight is not None:
            g = torch.Generator().manual_seed(1)
            ours.weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
            ours.bias.copy_(torch.randn(shape[1], generator=g))
            ref.weight.copy_(ours.weight)
            ref.bias.copy_(ours.bias)
    return ours, ref


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize(
    "options",
    [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}],
    ids=["default", "no_affine", "cumulative", "untracked"],
)
def test_training_steps_match_torch_in_float64(name, options):
    shape, channels_last = SHAPES[name]
    ours, ref = _pair(shape, **options)
    for step in range(2):
        x = random_input(shape, channels_last=channels_last, seed=step, mean=3.0)
        _runs_here(x)
        xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
        y, yd = ours(xs), ref(xd)
        g = torch.randn(yd.shape, generator=torch.Generator().manual_seed(5), dtype=yd.dtype)
        y.backward(g.float())
        yd.backward(g)
        assert y.stride() == x.stride()  # the input's layout, as torch.nn
        assert_close(y, yd, torch.float32)
        assert_close(xs.grad, xd.grad, torch.float32)
        for mine, theirs in zip(ours.parameters(), ref.parameters(), strict=True):
            assert_close(mine.grad, theirs.grad, torch.float32)
    for name_ in ("running_mean", "running_var"):
        if getattr(ref, name_) is not None:
            assert_close(getattr(ours, name_), getattr(ref, name_), torch.float32)
            assert getattr(ours, name_)._version == getattr(ref, name_)._version
    assert ours.state_dict().keys() == ref.state_dict().keys()
    if ref.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)


@pytest.mark.parametrize("name", ["(100,128)", "channels_last", "(N,C,1,1)", "NCHW"])
def test_eval_matches_torch_in_float64_gradients_included(name):
    """Eval normalizes with the running statistics, which stay as they are; dx, dweight and
    dbias (fine-tuning with frozen statistics) match torch's."""
    shape, channels_last = SHAPES[name]
    ours, ref = _pair(shape)
    with torch.no_grad():
        ref.running_mean.copy_(ours.running_mean.uniform_(1, 3))
        ref.running_var.copy_(ours.running_var.uniform_(0.5, 2))
    ours.eval(), ref.eval()
    x = random_input(shape, channels_last=channels_last, mean=2.0)
    _runs_here(x, training=False)
    before = ours.running_mean.clone(), ours.running_var.clone()
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yd = ours(xs), ref(xd)
    g = torch.randn(yd.shape, dtype=yd.dtype)
    y.backward(g.float())
    yd.backward(g)
    assert y.stride() == x.stride()
    assert_close(y, yd, torch.float32)
    for mine, theirs in ((xs, xd), (ours.weight, ref.weight), (ours.bias, ref.bias)):
        assert_close(mine.grad, theirs.grad, torch.float32)
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    # the running mean changing after the forward (a training step) leaves backward alone
    xs.grad = None
    y = ours(xs)
    with torch.no_grad():
        ours.running_mean.add_(100)
    y.backward(g.float())
    assert_close(xs.grad, xd.grad, torch.float32)
    assert_close(ours.weight.grad, 2 * ref.weight.grad, torch.float32)


TORCH_ACTIVATIONS = {
    "relu": torch.relu,
    "leaky_relu": lambda v: torch.nn.functional.leaky_relu(v, 0.2),
    "silu": torch.nn.functional.silu,  # torch's op after the node
    "elu": torch.nn.functional.elu,
}


#: The residual: none, one that needs its gradient (which is dL/d(pre-activation), written
#: out), a constant one (ReLU and leaky ReLU then compute dL/d(pre-activation) again in
#: each backward pass, from x and the residual).
RESIDUALS = {
    "ids": ["plain", "residual", "constant residual"],
    "argvalues": [False, True, "constant"],
}


@pytest.mark.parametrize("activation", TORCH_ACTIVATIONS)
@pytest.mark.parametrize("residual", **RESIDUALS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize(
    "name", ["(100,128)", "channels_last", "NCHW", "NCHW threaded", "NCHW short planes threaded"]
)
def test_fused_epilogue_matches_torch_in_float64(name, training, residual, activation):
    """act(BN(x) + residual) (in one pass for ReLU and leaky ReLU, SiLU and ELU as torch's
    ops after it) against torch.nn's BN, the addition and torch's activation in float64:
    output and the gradients of x, weight, bias and (unless it is constant) residual."""
    shape, channels_last = SHAPES[name]
    ours = FUSED[len(shape)](shape[1], activation=activation, negative_slope=0.2)
    ref = TORCH_LAYERS[len(shape)](shape[1], dtype=torch.float64)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.normal_()
        ours.running_mean.uniform_(-1, 1), ours.running_var.uniform_(0.5, 2)
        for mine, theirs in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True):
            theirs.copy_(mine)
    ours.train(training), ref.train(training)
    x = random_input(shape, channels_last=channels_last, mean=0.5)
    z = random_input(shape, channels_last=channels_last, seed=3) if residual else None
    call = Call(x, training, activation, 0.2, residual, False, True, ours.weight, ours.bias,
                ours.running_mean, ours.running_var, z)  # fmt: skip
    assert ops.select(call).name == "cpp_cpu"
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    zs = zd = None
    if residual:
        zs, zd = (
            z.clone().requires_grad_(residual is True),
            z.double().requires_grad_(residual is True),
        )
    y = ours(xs, zs) if residual else ours(xs)
    pre = ref(xd) + zd if residual else ref(xd)
    yd = TORCH_ACTIVATIONS[activation](pre)
    g = torch.randn(yd.shape, generator=torch.Generator().manual_seed(7), dtype=yd.dtype)
    # dL/dy 0 within 4x the output's tolerance (test_fuzz's KINK_MARGIN) of ReLU's kink: on 8
    # of 300 seeds the large eval ReLU call had a pre-activation (2.7e-8 in one) that float32
    # rounded to the other side
    band = 4 * TOLERANCES[torch.float32]["atol"] * max(1.0, yd.abs().max().item())
    g = zero_near_kink(g, pre.detach(), activation, band, slope=0.2)
    y.backward(g.float())
    yd.backward(g)
    assert_close(y, yd, torch.float32)
    pairs = [(xs, xd), (ours.weight, ref.weight), (ours.bias, ref.bias)]
    for mine, theirs in pairs + ([(zs, zd)] if residual is True else []):
        assert_close(mine.grad, theirs.grad, torch.float32)
    assert_close(ours.running_mean, ref.running_mean, torch.float32)
    assert_close(ours.running_var, ref.running_var, torch.float32)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_fused_epilogue_of_a_large_input_matches_torch_in_float64(training, activation):
    """The prefetching loops with every stream they read: x, the residual and, in the
    backward of an activation, dy (SiLU's written out with dL/dresidual; ReLU's with a
    constant residual, computed again in each pass)."""
    residual = True if activation == "silu" else "constant"
    with ops.use_backend("cpp_cpu"):
        test_fused_epilogue_matches_torch_in_float64("channels_last prefetched", training,
                                                     residual, activation)  # fmt: skip


@pytest.mark.parametrize("shape", [(16, 4), (4, 4, 5)], ids=["rows", "planes"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_non_finite_inputs_give_torchs_results(training, shape):
    """An infinite and a NaN value: torch's outputs and input gradient, NaN where torch's
    are (training: the whole channel) and finite where torch's are (eval: dx = dy weight
    invstd does not read x; the 5,000-example fuzz run found x entering it as inf * 0)."""
    ours, ref = _pair(shape)
    ours.train(training), ref.train(training)
    x = random_input(shape)
    # channel 0's first value is the origin its sums are centred on: an infinite origin
    # gave a running mean of inf - inf = NaN where torch's is inf
    x[(0, 0) + (0,) * (x.dim() - 2)] = float("-inf")
    x[(3 % shape[0], 1) + (1,) * (x.dim() - 2)] = float("inf")
    x[(5 % shape[0], 2) + (2,) * (x.dim() - 2)] = float("nan")
    _runs_here(x, training)
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yd = ours(xs), ref(xd)
    g = torch.randn(yd.shape, dtype=yd.dtype)
    y.backward(g.float())
    yd.backward(g)
    pairs = [(y, yd), (xs.grad, xd.grad), (ours.running_mean, ref.running_mean)]
    for mine, theirs in pairs + [(ours.running_var, ref.running_var)]:
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("shape", [(300, 24), (5000, 24), (8, 24, 20, 21)],
                         ids=["serial", "threaded", "NCHW threaded"])  # fmt: skip
def test_same_results_on_any_number_of_threads(shape):
    """The sums run in blocks of rows whose number depends on the input's size only, added
    in order (NCHW: a channel's sums in one thread): one and two threads give the same
    bits."""
    x = random_input(shape, mean=3.0)
    _runs_here(x)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            layer, _ = _pair(shape)
            xs = x.clone().requires_grad_()
            y = layer(xs)
            y.backward(g)
            results.append((y, xs.grad, layer.weight.grad, layer.bias.grad, layer.running_var))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_first_row_far_from_the_mean():
    """The output and gradients stay within float32's tolerance where the first row, which
    the loops of the output and the backward centre on, lies 1e4 std from the mean; the
    statistics: test_batch_variance_keeps_float32s_digits."""
    x = random_input((200, 8))
    x[0] += 1e4
    _runs_here(x)
    ours, ref = _pair((200, 8))
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yd = ours(xs), ref(xd)
    g = torch.randn_like(yd)
    y.backward(g.float())
    yd.backward(g)
    assert_close(y, yd, torch.float32)
    assert_close(xs.grad, xd.grad, torch.float32)
    assert_close(ours.running_var, ref.running_var, torch.float32)


def _variance_error(x: torch.Tensor) -> float:
    """The batch variance's largest error relative to float64's, read in the running
    variance (momentum 1), whose float32 rounding is 6e-8 of it."""
    _runs_here(x)
    layer = OURS[x.dim()](x.shape[1], momentum=1.0, affine=False)
    layer(x)
    exact = x.double().transpose(0, 1).reshape(x.shape[1], -1).var(1)
    return ((layer.running_var.double() - exact).abs() / exact).max().item()


def _as_planes(x: torch.Tensor) -> torch.Tensor:
    """(4096, C) rows as NCHW (16, C, 16, 16) whose channels hold the same values in the
    same order (row t: plane t // 256, position t % 256), the order in which rows.cpp's
    PlaneShape::sampled_centre samples them."""
    return x.reshape(16, 256, x.shape[1]).permute(0, 2, 1).reshape(16, -1, 16, 16).contiguous()


def _sampled_rows(rows: int) -> list[int]:
    """The rows whose mean rows.cpp's sampled_centre takes for the float32 sums' centre."""
    samples = min(rows, 16)
    return [k * rows // samples + (k + 1) * 2654435761 % (rows // samples) for k in range(samples)]


@pytest.mark.parametrize("layout", ["rows", "planes"])
@pytest.mark.parametrize("far", ["first row", "every 256th row", "none"])
def test_batch_variance_keeps_float32s_digits(far, layout):
    """The statistics sum float32 terms around a mean of 16 sampled rows: within a few
    float32 roundings of float64's variance, also where the first row lies 1e3 std from the
    mean and where every 256th row does (float32 terms centred on the first row, as the
    backward's are, and kept, lost 4e-5 and 2.4e-6 of the variance there). The same values
    as NCHW planes (forward_planes: a channel at a time)."""
    x = random_input((4096, 64), mean=3.0, seed=6)
    if far == "first row":
        x[0] += 1e3
    elif far == "every 256th row":
        x[::256] += 1e3
    assert _variance_error(x if layout == "rows" else _as_planes(x)) < 3e-7


@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_batch_variance_keeps_its_digits_where_the_sampled_rows_are_far(layout):
    """Where the sampled rows themselves lie far from the mean (here 16 of 4096, 1e3 std
    away: the centre then lies 16 of the batch's std from its mean), the float32 terms
    would lose 1e-5 of the variance; the check sees it, and the sums are done again (rows:
    in float64 terms; planes: around the mean, in a second pass)."""
    x = random_input((4096, 64), mean=3.0, seed=7)
    x[_sampled_rows(4096)] += 1e3
    assert _variance_error(x if layout == "rows" else _as_planes(x)) < 3e-7


#: SiLU's loops: AVX-512's, where the CPU has it, on rows ((N, C) and channels_last) of
#: either dtype, with plain or (16 MiB or more, here 4,400 copies of the range) non-temporal
#: stores, and every backward's dL/d(pre-activation) of rows; GCC's vectorized ones on NCHW
#: planes (and everywhere on a CPU without AVX-512). (dtype, copies of the range, NCHW)
SILU_LOOPS = {"float32": (torch.float32, 1, False), "bfloat16": (torch.bfloat16, 1, False),
              "float32 streamed": (torch.float32, 4400, False),
              "float32 NCHW": (torch.float32, 1, True)}  # fmt: skip


@pytest.mark.parametrize("loops", SILU_LOOPS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_silu_over_its_whole_range(training, loops):
    """SiLU runs in the node's loops with rows.cpp's own exp (std::exp does not vectorize):
    pre-activations from -120 to 120 (beyond its clamps to [-87.34, 88.38] on either side),
    0, and inf, -inf and NaN, against torch's SiLU in float64: float32 to float32's
    accuracy, bfloat16 within its rounding (and the special values exactly)."""
    dtype, copies, planes = SILU_LOOPS[loops]
    values = torch.linspace(-120, 120, 4001)
    x = torch.cat([values, torch.tensor([0.0, float("inf"), float("-inf"), float("nan")])])
    x = x.repeat(2).view(2, -1).t().contiguous()  # (N, 2): two channels
    ours = batchnorm.BatchNormAct1d(2, activation="silu")
    ref = torch.nn.BatchNorm1d(2, dtype=torch.float64)
    ours.train(training), ref.train(training)
    if training:  # finite values only (a NaN or inf makes the batch statistics NaN), and a
        x = x[:4001]  # weight that scales the normalized values (std 1) back to -120..120
        with torch.no_grad():
            ours.weight.fill_(120 / 1.733), ref.weight.fill_(120 / 1.733)
    x = x.repeat(copies, 1).to(dtype)
    if planes:  # (1, 2, N): a plane of N values a channel
        x = x.t().contiguous()[None]
    _runs_here(x, training)
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yd = ours(xs), torch.nn.functional.silu(ref(xd))
    g = torch.randn(yd.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y.backward(g)
    yd.backward(g.double())
    for mine, theirs in ((y, yd), (xs.grad, xd.grad)):
        if dtype == torch.float32:
            torch.testing.assert_close(mine.double(), theirs, rtol=2e-6, atol=2e-5,
                                       equal_nan=True)  # fmt: skip
            continue
        finite = theirs.isfinite()
        assert_within_rounding(mine[finite], theirs[finite], dtype)
        torch.testing.assert_close(mine[~finite].double(), theirs[~finite], equal_nan=True)


def test_keeps_its_digits_where_the_mean_is_large():
    """Statistics summed around a centre near each channel's mean: at mean 1e4 and std 1 the
    output and dx stay within a float32 mean's rounding (ATen's one-pass float sums gave 3e-3 of
    the output's scale here)."""
    x = random_input((200, 8), mean=1e4)
    _runs_here(x)
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    y = batchnorm.functional.batch_norm(xs, None, None, training=True)
    yd = torch.nn.functional.batch_norm(xd, None, None, training=True)
    g = torch.randn_like(yd)
    y.backward(g.float())
    yd.backward(g)
    assert (y.double() - yd).abs().max() < 1e-3
    assert (xs.grad.double() - xd.grad).abs().max() / xd.grad.abs().max() < 1e-3


#: Float32 outputs of 16 MiB or more (rows.cpp's kStreamFrom: 4,194,304 values), which the
#: loops write with non-temporal stores, staged 64 values at a time (stream_rows; rows on
#: CPUs with AVX-512 from the registers instead, see LANES): rows longer than a block and not
#: a multiple of 8 floats (segments, stores not aligned to 32 bytes), rows shorter than a
#: block (several rows a block), and NCHW planes in eval, long (segments) and short (several
#: planes a block). The (262147,33) and channels_last
#: backwards, inputs of 32 MiB or more on rows under 4 KiB, sum their rows in pairs
#: (kPairsFrom; an odd count of rows in some blocks). (shape, channels_last, training)
STREAMED = {
    "(8209,1031) training": ((8209, 1031), False, True),
    "(262147,33) training": ((262147, 33), False, True),
    "channels_last eval": ((5, 300, 73, 79), True, False),
    "NCHW eval, long planes": ((3, 7, 613, 661), False, False),
    "NCHW eval, short planes": ((4099, 512, 2, 2), False, False),
}


@pytest.mark.parametrize("activation", ["identity", "silu"])
@pytest.mark.parametrize("name", STREAMED)
def test_outputs_streamed_past_the_caches_match_torch_in_float64(name, activation):
    """y, and in training (and channels_last eval) dx, dweight and dbias, against float64
    torch.nn (and its SiLU); NCHW eval runs without a graph, as the C++ backend takes it."""
    shape, channels_last, training = STREAMED[name]
    channels = shape[1]
    x = random_input(shape, channels_last=channels_last, mean=2.0)
    g = torch.Generator().manual_seed(6)
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    running = (torch.rand(channels, generator=g) + 1.5, torch.rand(channels, generator=g) + 0.5)
    stats = (None, None) if training else running
    _runs_here(x, training)
    act = torch.nn.functional.silu if activation == "silu" else None
    graph = training or channels_last
    leaves = [t.clone().requires_grad_(graph) for t in (x, weight, bias)]
    y = batchnorm.functional.batch_norm(leaves[0], *stats, leaves[1], leaves[2],
                                        training=training, activation=activation)  # fmt: skip
    dy = torch.randn(shape, generator=g).contiguous(memory_format=torch.preserve_format)
    expected, grads = float64_batch_norm(x, weight, bias, None, None if training else running,
                                         training, act, dy)  # fmt: skip
    assert_close(y.detach(), expected, torch.float32)
    if graph:
        y.backward(dy)
        for leaf, grad in zip(leaves, grads, strict=True):
            assert_close(leaf.grad, grad, torch.float32)


#: Float32 rows of 16 MiB or more, which hosts with AVX-512 normalize (and, in training, whose dx
#: they compute from dL/d(pre-activation) written out) in registers and write a cache line at
#: a time (rows.cpp's for_lanes: the values up to the first 64-byte boundary under a mask,
#: then whole lines, then the rest under a mask): rows that start off a line, 1027 channels
#: (4,108 bytes) a row at a time and 100 (400 bytes) a thread's rows as one run, their
#: constants from tables that repeat every 400 values (PeriodicTables), with the activations
#: those loops take and a residual whose gradient is asked for. (name: (shape, activation))
LANES = {
    "(4099,1027) leaky ReLU": ((4099, 1027), "leaky_relu"),
    "(41947,100) ReLU": ((41947, 100), "relu"),
}


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("name", LANES)
def test_rows_written_a_line_at_a_time_match_torch_in_float64(name, training):
    """y, and in training dx, dweight, dbias and dresidual, against float64 torch.nn; eval
    without a graph (inference), as the C++ backend takes it."""
    shape, activation = LANES[name]
    channels = shape[1]
    g = torch.Generator().manual_seed(8)
    x = random_input(shape, mean=2.0)
    z = torch.randn(shape, generator=g)
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    running = (torch.randn(channels, generator=g) + 2, torch.rand(channels, generator=g) + 0.5)
    _runs_here(x, training, activation)
    leaves = [t.clone().requires_grad_(training) for t in (x, weight, bias, z)]
    with torch.set_grad_enabled(training):
        y = batchnorm.functional.batch_norm(
            leaves[0], *(None, None) if training else running, leaves[1], leaves[2],
            training=training, activation=activation, negative_slope=0.2,
            residual=leaves[3])  # fmt: skip
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    act = TORCH_ACTIVATIONS[activation]
    expected, _ = float64_batch_norm(x, weight, bias, z, None if training else running,
                                     training, None, dy)  # fmt: skip
    band = 4 * TOLERANCES[torch.float32]["atol"] * max(1.0, expected.abs().max().item())
    dy = zero_near_kink(dy, expected, activation, band, slope=0.2)  # see the fused test's
    expected, grads = float64_batch_norm(x, weight, bias, z, None if training else running,
                                         training, act, dy)  # fmt: skip
    assert_close(y.detach(), expected, torch.float32)
    if training:
        y.backward(dy.float())
        for leaf, grad in zip(leaves, grads, strict=True):
            assert_close(leaf.grad, grad, torch.float32)


#: float32 NCHW inputs of 8 MiB or more whose planes are whole cache lines, which the node takes in
#: training (and eval with a graph) at any size (but with SiLU or a residual that needs its
#: gradient), writing y and dx with non-temporal stores a block of 64 values at a time (rows.cpp's
#: planes_streamed, write_plane): planes of 80 values (a block and part of one) and long planes of
#: few samples, each channel's statistics around a sampled centre.
STREAMED_PLANES = {"planes of 80": (821, 64, 80), "long planes": (3, 5, 560, 512)}


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("name", STREAMED_PLANES)
def test_nchw_planes_streamed_past_the_caches_match_torch_in_float64(name, training,
                                                                       activation):  # fmt: skip
    """y, dx, dweight and dbias against float64 torch.nn, with ReLU on a residual that
    needs no gradient (the node takes no other: see the dispatch test below); eval with a
    graph, which the node takes as it takes training."""
    shape = STREAMED_PLANES[name]
    channels = shape[1]
    g = torch.Generator().manual_seed(9)
    x = random_input(shape, mean=2.0)
    assert x.numel() * x.element_size() >= 16 << 20
    z = torch.randn(shape, generator=g) if activation == "relu" else None
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    running = (torch.randn(channels, generator=g) + 2, torch.rand(channels, generator=g) + 0.5)
    running = None if training else running
    _runs_here(x, training, activation, graph=True)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)] + [z]
    y = batchnorm.functional.batch_norm(leaves[0], *(running or (None, None)), leaves[1],
                                        leaves[2], training=training, activation=activation,
                                        residual=leaves[3])  # fmt: skip
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    expected, _ = float64_batch_norm(x, weight, bias, z, running, training, None, dy)
    band = 4 * TOLERANCES[torch.float32]["atol"] * max(1.0, expected.abs().max().item())
    dy = zero_near_kink(dy, expected, activation, band)  # see the fused test's
    act = TORCH_ACTIVATIONS.get(activation)
    expected, grads = float64_batch_norm(x, weight, bias, z, running, training, act, dy)
    assert_close(y.detach(), expected, torch.float32)
    y.backward(dy.float())
    for leaf, exact in zip(leaves[:3], grads[:3], strict=True):
        assert_close(leaf.grad, exact, torch.float32)


def test_large_float32_nchw_training_goes_to_the_node_where_its_planes_stream():
    """Past planes_up_to, float32 NCHW training (and eval with a graph) runs here where its
    output streams: 8 MiB or more (2,097,152 values) in planes of a multiple of 16 values,
    with any activation but SiLU, without a residual that needs its gradient (the Numba
    kernels compute those faster); not smaller inputs, other planes, nor bfloat16 without a
    fused ReLU."""
    weight = torch.ones(64, requires_grad=True)

    def chosen(x, activation="identity", training=True, residual=None):
        stats = (None, None) if training else (torch.zeros(64), torch.ones(64))
        call = Call(x, training, activation, 0.01, residual is not None, False, True, weight,
                    None, *stats, residual)  # fmt: skip
        return ops.select(call).name

    streamed = torch.zeros(32, 64, 1024)  # 8 MiB
    assert streamed.numel() > extension().planes_up_to
    assert chosen(streamed) == chosen(streamed, "relu") == "cpp_cpu"
    assert chosen(streamed, "leaky_relu") == chosen(streamed, training=False) == "cpp_cpu"
    residual = torch.zeros_like(streamed)
    assert chosen(streamed, "relu", residual=residual) == "cpp_cpu"
    assert "cpp_cpu" not in (
        chosen(streamed, "relu", residual=residual.requires_grad_()),
        chosen(streamed, residual=residual),
        chosen(streamed, "silu"), chosen(streamed.bfloat16()),
        chosen(torch.zeros(32, 64, 1032)),  # planes not whole lines
        chosen(torch.zeros(32, 64, 1008)),  # under 8 MiB
    )  # fmt: skip


@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_eval_keeps_its_digits_where_the_running_mean_is_large(activation):
    """In eval the loops subtract the running mean from x before they scale: x * scale +
    (bias - mean * scale), ATen's form, rounds x * scale at 1e5 here (float32 torch.nn's y
    is 2e-3 off, outputs of size 1). Against float64 torch.nn (and its SiLU), y and dx
    (through SiLU's derivative at the pre-activation)."""
    x = random_input((64, 16), seed=3) * 0.1 + 1e4
    _runs_here(x, training=False)
    ours = batchnorm.BatchNormAct1d(16, activation=activation).eval()
    ref = torch.nn.BatchNorm1d(16, dtype=torch.float64).eval()
    for layer in (ours, ref):
        layer.running_mean.fill_(1e4)
        layer.running_var.fill_(0.01)
    act = torch.nn.functional.silu if activation == "silu" else (lambda t: t)
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yd = ours(xs), act(ref(xd))
    g = torch.randn(yd.shape, generator=torch.Generator().manual_seed(4), dtype=yd.dtype)
    y.backward(g.float())
    yd.backward(g)
    assert (y.double() - yd).abs().max() < 1e-5
    assert (xs.grad.double() - xd.grad).abs().max() / xd.grad.abs().max() < 1e-5


@pytest.mark.parametrize("activation", ["identity", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("need", ["x", "weight", "x and bias"])
def test_computes_only_the_gradients_asked_for(need, training, activation):
    """Also SiLU's dL/d(pre-activation), which the backward of rows writes in the pass of
    the sums where that pass runs, else (eval, dx alone: a frozen layer) in its own."""
    shape = (32, 8)
    ours, ref = _pair(shape)
    if activation == "silu":
        fused = batchnorm.BatchNormAct1d(8, activation="silu")
        fused.load_state_dict(ours.state_dict())
        ours = fused
    act = torch.nn.functional.silu if activation == "silu" else (lambda t: t)
    x = random_input(shape)
    _runs_here(x, training, activation)
    xs, xd = x.clone(), x.double()
    xs.requires_grad_("x" in need)
    xd.requires_grad_("x" in need)
    for layer in (ours, ref):
        layer.train(training)
        layer.weight.requires_grad_("weight" in need)
        layer.bias.requires_grad_("bias" in need)
    ours(xs).square().sum().backward()
    act(ref(xd)).square().sum().backward()
    for mine, theirs in ((xs, xd), (ours.weight, ref.weight), (ours.bias, ref.bias)):
        assert (mine.grad is None) == (theirs.grad is None)
        if theirs.grad is not None:
            assert_close(mine.grad, theirs.grad, torch.float32)


def test_gradients_of_another_layout():
    """A gradient of other strides than the channels-last output's (a broadcast product's) is
    read in the input's layout."""
    ours, ref = _pair((8, 16, 3, 3))
    x = random_input((8, 16, 3, 3), channels_last=True, mean=2.0)
    _runs_here(x)
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    (ours(xs) * torch.arange(9.0).view(3, 3)).sum().backward()
    (ref(xd) * torch.arange(9.0, dtype=torch.float64).view(3, 3)).sum().backward()
    assert_close(xs.grad, xd.grad, torch.float32)
    assert_close(ours.weight.grad, ref.weight.grad, torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_second_derivatives_match_torch(training):
    """create_graph=True: the gradient is computed in differentiable torch ops, so a gradient
    penalty gets torch's second derivatives (not those of a constant), fused leaky ReLU and
    residual included."""
    ours, ref = _pair((16, 4))
    fused = batchnorm.BatchNormAct1d(4, activation="leaky_relu", negative_slope=0.2)
    fused.load_state_dict(ours.state_dict())
    ours = fused
    ours.train(training), ref.train(training)
    x = random_input((16, 4), mean=1.0)
    z = random_input((16, 4), seed=2)
    _runs_here(x, training)
    results = []
    for layer, xx in ((ours, x.clone()), (ref, x.double())):
        xx.requires_grad_()
        y = ours(xx, z) if layer is ours else TORCH_ACTIVATIONS["leaky_relu"](ref(xx) + z.double())
        (dx,) = torch.autograd.grad(y.pow(3).sum(), xx, create_graph=True)
        dx.square().sum().backward()
        results.append((dx, xx.grad, layer.weight.grad))
    for mine, theirs in zip(*results, strict=True):
        assert_close(mine, theirs, torch.float32, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_batched_gradients_match_torch():
    """is_grads_batched: torch.func batches the output gradient, which the node then
    computes in torch ops."""
    x = random_input((16, 4))
    _runs_here(x)
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    w = torch.ones(4, requires_grad=True)
    y = batchnorm.functional.batch_norm(xs, None, None, w, training=True)
    yd = torch.nn.functional.batch_norm(xd, None, None, w.double(), training=True)
    grads = torch.randn(3, 16, 4, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, xs, grads.float(), is_grads_batched=True)
    (want,) = torch.autograd.grad(yd, xd, grads, is_grads_batched=True)
    assert_close(got, want, torch.float32)


def test_calls_it_cannot_take_go_elsewhere():
    """Forward-mode AD, torch.jit.trace, other layouts, dtypes and options are not its."""
    x = random_input((16, 4))

    def chosen(x, training=True, activation="identity", **tensors):
        return ops.select(Call(x, training, activation, 0.01, False, **tensors)).name

    assert chosen(x) == "cpp_cpu"
    assert chosen(x.t().contiguous().t()) != "cpp_cpu"  # channels not innermost
    assert chosen(random_input((4, 3, 5)).transpose(0, 2)) != "cpp_cpu"  # neither layout
    assert chosen(random_input((4, 3, 5))) == "cpp_cpu"  # (N, C, L) contiguous
    large_planes = random_input((2, 3, extension().planes_up_to // 6 + 1))
    assert chosen(large_planes) != "cpp_cpu"  # NCHW training: up to planes_up_to values
    assert chosen(random_input((4, 3, 5)).transpose(1, 2).contiguous().transpose(1, 2)) == (
        "cpp_cpu"  # (N, C, L) with the channels innermost
    )
    assert chosen(x.double()) != "cpp_cpu"
    planes, stats = random_input((4, 3, 5)), (torch.zeros(3), torch.ones(3))
    with torch.no_grad():  # NCHW: large ones in eval without autograd only
        assert chosen(planes, False, running_mean=stats[0], running_var=stats[1]) == "cpp_cpu"
        assert chosen(large_planes, False, running_mean=stats[0],
                      running_var=stats[1]) == "cpp_cpu"  # fmt: skip
        assert chosen(random_input((4, 3, 1)), False, running_mean=stats[0],
                      running_var=stats[1]) == "cpp_cpu"  # (N, C, 1): rows  # fmt: skip
    assert chosen(planes.requires_grad_(), False, running_mean=stats[0],
                  running_var=stats[1]) == "cpp_cpu"  # fmt: skip
    assert chosen(large_planes.requires_grad_(), False, running_mean=stats[0],
                  running_var=stats[1]) != "cpp_cpu"  # fmt: skip
    assert chosen(x[:1]) != "cpp_cpu"  # training on one value a channel
    assert chosen(x, training=False) != "cpp_cpu"  # eval without running statistics
    assert chosen(x, activation="relu") == "cpp_cpu"
    z = torch.zeros(16, 4)
    assert ops.select(Call(x, True, "relu", 0.01, True, residual=z)).name == "cpp_cpu"
    assert ops.select(Call(x, True, "relu", 0.01, True, residual=z.t().contiguous().t())).name != (
        "cpp_cpu"  # a residual of other strides than the input's
    )
    assert chosen(x, weight=torch.ones(8)[::2]) != "cpp_cpu"  # a non-contiguous weight
    assert chosen(x, weight=torch.ones(4)._neg_view()) != "cpp_cpu"
    assert chosen(x, bias=torch.nn.Buffer(torch.ones(4))) == "cpp_cpu"
    stats = torch.zeros(4, requires_grad=True), torch.ones(4)
    assert chosen(x, running_mean=stats[0], running_var=stats[1]) != "cpp_cpu"
    big = torch.zeros(2_000_000 // 8, 8)  # every activation at any size, either dtype
    stats = torch.zeros(8), torch.ones(8)
    assert chosen(big, False, running_mean=stats[0], running_var=stats[1]) == "cpp_cpu"
    for activation in ("identity", "relu", "leaky_relu", "silu", "elu"):
        assert chosen(big, activation=activation) == "cpp_cpu"
        assert chosen(big.to(torch.bfloat16), activation=activation) == "cpp_cpu"
    with torch.autograd.forward_ad.dual_level():
        assert ops.select(Call(x, True, "identity", 0.01, False)).name != "cpp_cpu"
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        y = batchnorm.functional.batch_norm(dual, None, None, training=True)
        tangent = torch.autograd.forward_ad.unpack_dual(y).tangent
    assert tangent is not None and tangent.abs().max() < 1e-4  # a shift's tangent: none
    layer = batchnorm.BatchNorm1d(4)
    traced = torch.jit.trace(layer, x, check_trace=False)  # torch ops: a working trace
    torch.testing.assert_close(traced(x + 1), torch.nn.BatchNorm1d(4)(x + 1))


#: SHAPES' NCHW inputs. Planes of 9 and 12 values are short (SiLU: blocks of planes,
#: rows.cpp's kShortPlane), the threaded short ones in 22 blocks, the last one partial.
PLANES = {
    name: SHAPES[name][0]
    for name in ("NCHW", "NCDHW", "NCHW threaded", "NCHW short planes threaded")
}


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "silu", "elu"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name", PLANES)
def test_nchw_inference_matches_torch_in_float64(name, residual, activation):
    """NCHW inputs in eval mode without autograd (inference) run here a plane at a time
    (eval_planes), fused activation and residual included; with a graph to record, these
    small ones run in the node (forward_planes: test_fused_epilogue_matches_torch_in_float64
    and test_eval_matches_torch_in_float64_gradients_included check it)."""
    shape = PLANES[name]
    fused = batchnorm.BatchNormAct3d if len(shape) == 5 else batchnorm.BatchNormAct2d
    ours = fused(shape[1], activation=activation, negative_slope=0.2).eval()
    ref = TORCH_LAYERS[len(shape)](shape[1], dtype=torch.float64).eval()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.normal_()
        ours.running_mean.uniform_(1, 3), ours.running_var.uniform_(0.5, 2)
        for mine, theirs in zip(ours.state_dict().values(), ref.state_dict().values(), strict=True):
            theirs.copy_(mine)
    x = random_input(shape, mean=2.0)
    z = random_input(shape, seed=3) if residual else None
    call = Call(x, False, activation, 0.2, residual, False, True, ours.weight, ours.bias,
                ours.running_mean, ours.running_var, z)  # fmt: skip
    with torch.no_grad():
        assert ops.select(call).name == "cpp_cpu"
        y = ours(x, z) if residual else ours(x)
    pre = ref(x.double()) + z.double() if residual else ref(x.double())
    expected = TORCH_ACTIVATIONS[activation](pre) if activation != "identity" else pre
    assert y.stride() == x.stride()
    assert_close(y, expected, torch.float32)
    with torch.inference_mode():
        assert ops.select(call).name == "cpp_cpu"
    x.requires_grad_()
    with torch.no_grad():
        assert ops.select(call._replace(x=x)).name == "cpp_cpu"


def test_a_layers_calls_go_where_the_dispatch_sends_them(monkeypatch):
    """A layer's calls reach this backend by a shorter way than the dispatch
    (CppBackend.call_fields), which must send them where ops.select would: here by default,
    to a backend registered ahead of it or forced with use_backend, and those it does not
    take to the next backend, without asking it twice."""
    from batchnorm.backends import cpp_cpu
    from batchnorm.backends.reference import ReferenceBackend

    asked, computed = [], []  # its takes (through call_fields or supports), its computing
    kind_of, node_call = cpp_cpu._kind_of, cpp_cpu._node_call
    monkeypatch.setattr(cpp_cpu, "_kind_of", lambda *args: asked.append(1) or kind_of(*args))
    monkeypatch.setattr(cpp_cpu, "_node_call",
                        lambda *args: computed.append(1) or node_call(*args))  # fmt: skip

    class Front(ReferenceBackend):
        name = "front"
        calls = 0

        def forward_train(self, *args):
            Front.calls += 1
            return super().forward_train(*args)

    layer, x = batchnorm.BatchNorm1d(4), random_input((16, 4))
    expected = torch.nn.BatchNorm1d(4)(x)
    assert_close(layer(x), expected, torch.float32)
    assert computed == [1]
    with ops.use_backend("numba"):
        assert_close(layer(x), expected, torch.float32)
    assert computed == [1]
    ops.register_backend(Front())
    try:
        assert_close(layer(x), expected, torch.float32)
    finally:
        ops.unregister_backend("front")
    assert Front.calls == 1 and computed == [1]
    asked.clear()
    layer2d = batchnorm.BatchNorm2d(4)
    shape = (2, 4, 8, extension().planes_up_to // 64 + 1)  # NCHW training, too large here
    y = layer2d(random_input(shape))
    assert asked == [1] and computed == [1] and y.shape == shape


def test_what_takes_calls_usual_passes_the_python_checks():
    """A call whose tensors ``takes`` vouches for (USUAL or TAKES) skips the Python checks
    of functional._layer_call (``_usual_tensors``), so those must pass on every such call:
    inputs of four dtypes and five layouts, parameters and statistics of other dtypes,
    shapes and strides, given or not, a residual of another dtype, shape or layout, in
    training and eval, with and without a graph. Calls that no backend of ours computes
    but ATen and Numba do (float16 training, large NCHW training) are USUAL."""
    import itertools

    from batchnorm.backends.cpp_cpu import UNCHECKED, USUAL
    from batchnorm.functional import _usual_tensors

    base = random_input((6, 4, 3, 3))
    inputs = {
        "NCHW": base, "channels_last": base.to(memory_format=torch.channels_last),
        "(N, C)": base[:, :, 0, 0].contiguous(), "transposed": base.transpose(2, 3),
        "one value a channel": base[:1, :, :1, :1].contiguous(),
    }  # fmt: skip
    vectors = {
        "none": None, "float32": torch.ones(4), "float16": torch.ones(4, dtype=torch.float16),
        "float64": torch.ones(4, dtype=torch.float64), "5 values": torch.ones(5),
        "strided": torch.ones(8)[::2], "requiring grad": torch.ones(4, requires_grad=True),
    }  # fmt: skip
    kinds = {UNCHECKED: 0, USUAL: 0, TAKES: 0}
    cases = itertools.product(inputs.values(), (torch.float32, torch.bfloat16, torch.float16,
                                                torch.float64), vectors.values(),
                              vectors.values(), (True, False), (True, False),
                              ("none", "same", "other dtype", "other layout"))  # fmt: skip
    for x, dtype, weight, stat, training, graph, residual in cases:
        x = x.to(dtype)
        z = {"none": None, "same": x, "other dtype": x.double(),
             "other layout": x.contiguous() if not x.is_contiguous() else x.transpose(0, 1)
             .contiguous().transpose(0, 1)}[residual]  # fmt: skip
        with torch.set_grad_enabled(graph):
            kind = extension().takes(x, weight, weight, stat, stat, z, training, 0)
        kinds[kind] += 1
        if kind != UNCHECKED:
            call = Call(x, training, "identity", 0.01, z is not None, False, True, weight,
                        weight, stat, stat, z)  # fmt: skip
            assert _usual_tensors(call), (x.shape, x.stride(), dtype, weight, stat, training, z)
    assert min(kinds.values()) > 100, kinds
    ones = torch.ones(4)
    large = random_input((2, 4, 8, extension().planes_up_to // 64 + 1))
    for x in (base.half(), large):  # float16 training, large NCHW training
        assert extension().takes(x, ones, ones, ones, ones, None, True, 0) == USUAL
    assert extension().takes(base, ones, ones, ones, ones, None, True, 0) == TAKES


def test_inference_mode_and_no_grad_update_the_running_statistics():
    ours, ref = _pair((32, 8))
    x = random_input((32, 8), mean=2.0)
    _runs_here(x)
    with torch.inference_mode():
        ours(x)
        ref(x.double())
    with torch.no_grad():
        ours(x + 1)
        ref(x.double() + 1)
    assert_close(ours.running_mean, ref.running_mean, torch.float32)
    assert_close(ours.running_var, ref.running_var, torch.float32)


# bfloat16 inputs with float32 parameters and statistics (torch.autocast's convention): the
# loops load bfloat16, compute in float32 (float64 sums of float32 partial sums) and round
# their results (float16 in inference alike, at the end of this file).


def _takes_float16() -> bool:
    x = torch.zeros(2, 1, dtype=torch.float16)
    return extension().takes(x, None, None, torch.zeros(1), torch.ones(1), None, False, 0) == TAKES


#: float16 inputs run here in inference where the CPU has AVX-512 (F, BW, VL) only (see the
#: float16 tests at the end of this file): elsewhere there is nothing of ours to test, and
#: test_float16_loops_are_built_where_the_cpu_has_avx512 fails if they skip on a CPU that has
#: it
float16_loops = pytest.mark.skipif(
    not _takes_float16(), reason="no AVX-512 on this CPU: float16 runs on ATen and Numba"
)
#: Both half-precision dtypes, float16 where its loops are built.
HALF_DTYPES = [pytest.param(torch.bfloat16, id="bfloat16"),
               pytest.param(torch.float16, id="float16", marks=float16_loops)]  # fmt: skip


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_results_are_rounded_as_torch_rounds(dtype):
    """Stores round to nearest, ties to even, as torch's .to(dtype), NaN and infinities
    included (float16: overflow to infinity and subnormals too): eval of zeros with running
    mean -v, running variance 1 and eps 0 gives v rounded, in the rows' loops and in the
    NCHW planes' (every value a channel; planes of 2 values: eval_halves' masked last
    lanes)."""
    values = torch.from_numpy(floats_to_round(dtype))
    expected = values.to(dtype).float().numpy()
    channels = values.numel()
    stats = (-values, torch.ones(channels))
    for shape in ((1, channels), (1, channels, 2)):
        x = torch.zeros(shape, dtype=dtype)
        _runs_here(x, training=False)
        y = batchnorm.functional.batch_norm(x, *stats, training=False, eps=0.0)
        assert y.dtype == dtype
        for got in y.float().reshape(channels, -1).unbind(1):
            assert same_values(got.numpy(), expected).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_training_results_are_rounded_as_torch_rounds(dtype):
    """The half-precision training forward of rows rounds as torch's .to(dtype) too (its
    loops are eval's; bfloat16 by AVX512_BF16's conversion where there is one, the exact
    rounding on vectors with a subnormal): with weight 0 and bias v, every output of
    channel c is v[c] rounded, whatever x's statistics, in every row."""
    values = torch.from_numpy(floats_to_round(dtype))
    expected = values.to(dtype).float().numpy()
    g = torch.Generator().manual_seed(0)
    for first in range(0, values.numel(), 80_000):
        part = values[first : first + 80_000]
        x = torch.randn(3, part.numel(), generator=g).to(dtype)
        _runs_here(x)
        weight = torch.zeros(part.numel())
        y = batchnorm.functional.batch_norm(x, None, None, weight, part, training=True)
        assert y.dtype == dtype
        for got in y.float().unbind(0):
            assert same_values(got.numpy(), expected[first : first + 80_000]).all()


@float16_loops
def test_float16_integer_conversions_are_exact():
    """load(F16) and store<F16>, the conversions of the loops not written in AVX-512's
    instructions, are torch's. The dx of rows in eval with a graph and a fused ReLU (its
    derivative computed in the dx loop: load(F16) of dy, store<F16> of dx), where x = 0,
    the running statistics are the identity's and the bias 1 (every pre-activation is 1, or
    NaN with a weight that is not finite: ReLU passes the gradient there), is weight * dy:
    with weight 1 every float16 value of dy comes back as itself, and with dy 1 every value
    of floats_to_round as weight is rounded as .to(torch.float16)."""

    def dx(weight, dy):
        channels = weight.numel()
        x = torch.zeros(dy.shape, dtype=torch.float16, requires_grad=True)
        stats = (torch.zeros(channels), torch.ones(channels) - 1e-5)
        y = extension().rows_batch_norm(x, weight, torch.ones(channels), *stats, None, False,
                                        0.1, 1e-5, ACTIVATION_CODES["relu"], 0.0, None)  # fmt: skip
        (grad,) = torch.autograd.grad(y, x, dy)
        return grad.float().numpy()

    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert same_values(dx(torch.ones(every.numel()), every[None]), every.float().numpy()).all()
    values = torch.from_numpy(floats_to_round(torch.float16))
    for part in values.split(200_000):
        got = dx(part, torch.ones(2, part.numel(), dtype=torch.float16))
        assert same_values(got, part.to(torch.float16).float().numpy()[None]).all()


@pytest.mark.parametrize("channels", [40, 260])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_training_dx_passes_the_gradient_where_the_pre_activation_is_nan(
    dtype, activation, channels
):
    """A fused ReLU passes dy where the pre-activation is NaN (leaky ReLU: dy times its
    slope), as torch's ReLU after its batch norm does: a NaN bias makes every pre-activation
    of its channel NaN while the statistics, and so dx, stay finite. The half-precision
    rows' training dx computes the derivative on AVX-512's lanes (dx_halves): rows of 40
    channels as one run of values, with the scale and shift that the derivative reads on
    PeriodicTables (kHalfRunsBelow); rows of 260 a row at a time, 16 full lanes and a masked
    one."""
    x = random_input((64, channels), seed=1, mean=3.0).to(dtype)
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    bias[::3] = float("nan")
    dy = torch.randn(x.shape, generator=g).to(dtype)
    _runs_here(x, True, activation, graph=True)
    xs = x.clone().requires_grad_()
    y = batchnorm.functional.batch_norm(xs, None, None, weight, bias, True,
                                        activation=activation, negative_slope=0.2)  # fmt: skip
    y.backward(dy)
    _, (exact_dx, *_) = _float64(x, weight, bias, None, True, activation, None, dy)
    assert y.float()[:, ::3].isnan().all() and exact_dx.isfinite().all()
    assert_within_rounding(xs.grad, exact_dx, dtype)


def _float64(x, weight, bias, z, training, activation, running, dy):
    """float64_batch_norm with the activation named as in the layers."""
    act = TORCH_ACTIVATIONS[activation] if activation != "identity" else None
    return float64_batch_norm(x, weight, bias, z, running, training, act, dy)


BFLOAT16_SHAPES = ["(100,128)", "channels_last", "(8203,40) threaded", "channels_last threaded",
                   "NCHW", "NCHW threaded"]  # fmt: skip
#: Over the forward's and the backward's prefetch thresholds in bfloat16 (16 and 8 MiB of
#: input: twice as many values as in float32).
BFLOAT16_LARGE = {"(64543,130) prefetched": ((64543, 130), False)}
#: NCHW training above the extension's planes_up_to (524,288 values), which the node takes
#: in bfloat16 with a fused ReLU or leaky ReLU and no residual (rows.cpp's planes_fused).
LARGE_PLANES = (2, 4, 8, 8200)
BFLOAT16_LARGE["NCHW above planes_up_to"] = (LARGE_PLANES, False)


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "silu", "elu"])
@pytest.mark.parametrize("residual", **RESIDUALS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("name", BFLOAT16_SHAPES)
def test_bfloat16_is_within_rounding_of_float64(name, training, residual, activation):
    """Output, dx and dresidual within twice the rounding of the float64 result to
    bfloat16; dweight and dbias (float32) to float32's tolerance: the fused activations'
    dL/d(pre-activation) is kept in float32. ELU is torch's op after the node, as in
    torch.nn's BN followed by F.elu: its output and gradient are rounded to bfloat16 once
    more (the parameters' gradients summed from the rounded one)."""
    shape, channels_last = SHAPES.get(name) or BFLOAT16_LARGE[name]
    _half_step_is_within_rounding(shape, channels_last, torch.bfloat16, training, residual,
                                  activation)  # fmt: skip


#: float16 training runs here on (N, C) and channels_last inputs of any size, and
#: on NCHW batches of 8 or more planes of up to float16_planes_up_to (196) values: below and
#: above the threads' 65,536 (and past 16 MiB: STREAMED_HALVES). The NCHW ones
#: end their channels' sums with groups of fewer than 8 planes (9: 8 + 1; 14: 8 + 4 + 2);
#: the threaded one's channels of 2,016 values take their statistics around a sampled centre.
FLOAT16_TRAINING_SHAPES = {
    "(100,128)": ((100, 128), False),
    "channels_last": ((8, 16, 3, 3), True),
    "NCHW": ((9, 6, 5, 5), False),
    "(4099,60) threaded": ((4099, 60), False),
    "channels_last threaded": ((11, 24, 29, 31), True),
    "NCHW threaded": ((14, 40, 12, 12), False),
}


@float16_loops
@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "silu", "elu"])
@pytest.mark.parametrize("residual", **RESIDUALS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("name", FLOAT16_TRAINING_SHAPES)
def test_float16_training_is_within_rounding_of_float64(name, training, residual, activation):
    """As the bfloat16 test above, in float16 (the statistics and sums of rows read float16
    16 channels at a time through F16C, the channels past them on masked lanes: (4099,60)
    and channels_last (11,24,29,31) take both, and their output and dx, as rows under 256
    values wide, a thread's rows as one run of values (rows.cpp's kHalfRunsBelow); the
    output and dx rounded by F16C, or store<F16> in eval; the statistics and sums of NCHW
    planes read float32 copies of each channel that F16C converts, their output and dx come
    from AVX-512's loops, or through the copies: SiLU's output, a ReLU's or an eval's dx);
    eval here with a graph."""
    shape, channels_last = FLOAT16_TRAINING_SHAPES[name]
    _half_step_is_within_rounding(shape, channels_last, torch.float16, training, residual,
                                  activation)  # fmt: skip


def _half_step_is_within_rounding(shape, channels_last, dtype, training, residual, activation):
    x = random_input(shape, channels_last=channels_last, seed=1, mean=3.0).to(dtype)
    channels = shape[1]
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    z = random_input(shape, channels_last=channels_last, seed=3).to(dtype)
    z = z if residual else None
    dy = torch.randn(shape, generator=g).to(dtype)  # of mean 0 (see test_numba_half)
    dy = dy.to(memory_format=torch.channels_last) if channels_last else dy
    running = None if training else (torch.randn(channels, generator=g) + 3,
                                     torch.rand(channels, generator=g) + 0.5)  # fmt: skip
    _runs_here(x, training, activation, graph=True)
    leaves = [t.clone().requires_grad_(t is not z or residual is True) if t is not None else None
              for t in (x, weight, bias, z)]  # fmt: skip
    y = batchnorm.functional.batch_norm(
        leaves[0], *(running or (None, None)), leaves[1], leaves[2], training,
        activation=activation, negative_slope=0.2, residual=leaves[3],
    )  # fmt: skip
    y.backward(dy)
    assert y.dtype == dtype and y.stride() == x.stride()
    assert leaves[0].grad.dtype == dtype and leaves[1].grad.dtype == torch.float32
    exact_y, exact_grads = _float64(x, weight, bias, z, training, activation, running, dy)
    roundings = 2 if activation == "elu" else 1
    assert_within_rounding(y, exact_y, dtype, roundings)
    got = [t.grad for t in leaves if t is not None and t.requires_grad]
    for i, (grad, exact) in enumerate(zip(got, exact_grads[: len(got)], strict=True)):
        if i not in (1, 2):
            assert_within_rounding(grad, exact, dtype, roundings)
        elif activation == "elu":  # sums of the rounded gradient: the dtype's relative error
            roundoff = torch.finfo(dtype).eps / 2  # bfloat16 2^-8, float16 2^-11
            assert_close(grad, exact, torch.float32, rtol=0, atol=roundoff * exact.abs().max())
        else:
            assert_close(grad, exact, torch.float32)


@pytest.mark.parametrize("activation", ["identity", "relu", "silu"])
def test_bfloat16_large_input_is_within_rounding_of_float64(activation):
    """The prefetching loops of each pass: plain, ReLU's (dy and a constant residual among
    the streams) and SiLU's (dL/d(pre-activation) in float32 among them)."""
    residual = "constant" if activation == "relu" else False
    test_bfloat16_is_within_rounding_of_float64("(64543,130) prefetched", True, residual,
                                                activation)  # fmt: skip


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_bfloat16_large_nchw_fused_training_is_within_rounding_of_float64(activation):
    """bfloat16 NCHW training above planes_up_to with a fused ReLU or leaky ReLU: the node's
    planes (channel by channel), dL/d(pre-activation) computed again in both passes."""
    assert math.prod(LARGE_PLANES) > extension().planes_up_to
    test_bfloat16_is_within_rounding_of_float64("NCHW above planes_up_to", True, False,
                                                activation)  # fmt: skip


def test_bfloat16_large_nchw_training_goes_to_the_node_only_fused():
    """Above planes_up_to, NCHW training runs here in bfloat16 with ReLU or leaky ReLU and no
    residual only: not plain, SiLU, with a residual, in float32, nor eval with a graph."""
    x = random_input(LARGE_PLANES).to(torch.bfloat16)
    weight = torch.ones(LARGE_PLANES[1], requires_grad=True)

    def chosen(x, activation, training=True, residual=None):
        call = Call(x, training, activation, 0.01, residual is not None, False, True, weight,
                    None, None if training else torch.zeros(4),
                    None if training else torch.ones(4), residual)  # fmt: skip
        return ops.select(call).name

    assert chosen(x, "relu") == chosen(x, "leaky_relu") == "cpp_cpu"
    assert "cpp_cpu" not in (
        chosen(x, "identity"), chosen(x, "silu"), chosen(x, "relu", residual=torch.zeros_like(x)),
        chosen(x.float(), "relu"), chosen(x, "relu", training=False),
    )  # fmt: skip


@pytest.mark.parametrize("activation", ["identity", "silu"])
@pytest.mark.parametrize("name", ["NCHW threaded", "NCHW short planes threaded"])
def test_bfloat16_nchw_inference_is_within_rounding_of_float64(name, activation):
    _check_half_inference(torch.bfloat16, PLANES[name], False, True, activation)


def _check_half_inference(dtype, shape, channels_last, residual, activation):
    """Eval without autograd of a half-precision input here: within twice the rounding of
    the float64 result to dtype (ELU, torch's op after the node, rounds once more), the
    input's layout kept."""
    x = random_input(shape, channels_last=channels_last, seed=1, mean=3.0).to(dtype)
    z = random_input(shape, channels_last=channels_last, seed=3).to(dtype) if residual else None
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    running = torch.randn(shape[1], generator=g) + 3, torch.rand(shape[1], generator=g) + 0.5
    call = Call(x, False, activation, 0.2, residual, False, True, weight, bias, *running, z)
    assert ops.select(call).name == "cpp_cpu"
    y = batchnorm.functional.batch_norm(x, *running, weight, bias, False, activation=activation,
                                        negative_slope=0.2, residual=z)  # fmt: skip
    exact = _float64(x, weight, bias, z, False, activation, running, torch.zeros(shape))[0]
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_within_rounding(y, exact, dtype, 2 if activation == "elu" else 1)


def test_bfloat16_calls_it_cannot_take_go_elsewhere():
    """bfloat16 inputs with float32 parameters, statistics, and a residual of their dtype;
    not bfloat16 parameters (a model cast with .bfloat16(): the Numba kernels), nor
    float16 inputs in training but small rows (see the next test)."""
    x = random_input((64, 8, 4, 4), channels_last=True).to(torch.bfloat16)
    ones = torch.ones(8)

    def chosen(x, **tensors):
        return ops.select(Call(x, True, "relu", 0.01, "residual" in tensors, **tensors)).name

    assert chosen(x, weight=ones) == "cpp_cpu"
    assert chosen(x, weight=ones.bfloat16()) != "cpp_cpu"
    assert chosen(x, residual=torch.zeros_like(x)) == "cpp_cpu"
    assert chosen(x, residual=torch.zeros_like(x, dtype=torch.float32)) != "cpp_cpu"
    long_planes = random_input((8, 8, 16, 16)).half()  # planes over float16_planes_up_to
    assert chosen(long_planes, weight=ones) != "cpp_cpu"
    assert chosen(x.contiguous()) == "cpp_cpu"  # NCHW training (small: forward_planes)


@float16_loops
def test_float16_training_runs_here_on_rows_and_short_planes_only():
    """float16 in training: (N, C) and channels_last inputs of any size and width; NCHW
    batches of 8 or more planes of up to float16_planes_up_to values (and up to
    planes_up_to values in all); the others go to the Numba kernels and ATen."""
    ext = extension()
    plane = ext.float16_planes_up_to

    def chosen(x):
        return ops.select(Call(x, True, "identity", 0.01, False)).name

    def zeros(*shape):
        return torch.zeros(shape, dtype=torch.float16)

    small = random_input((64, 8, 4, 4), channels_last=True).half()
    assert chosen(small) == "cpp_cpu"
    assert chosen(zeros(1 << 17, 24)) == "cpp_cpu"  # 3,145,728 values, not whole lanes
    assert chosen(zeros(1 << 17, 64)) == "cpp_cpu"  # 8,388,608 values of whole lanes
    large = torch.zeros(64, 256, 28, 28, dtype=torch.float16)
    assert chosen(large.contiguous(memory_format=torch.channels_last)) == "cpp_cpu"
    assert chosen(large) != "cpp_cpu"  # NCHW, planes of 784 values
    assert chosen(small.contiguous()) == "cpp_cpu"  # NCHW, planes of 16 values
    assert chosen(zeros(8, 4, plane)) == "cpp_cpu"
    assert chosen(zeros(8, 4, plane + 1)) != "cpp_cpu"
    assert chosen(zeros(7, 4, plane)) != "cpp_cpu"  # a batch of fewer than 8 planes
    channels = ext.planes_up_to // (8 * plane)
    assert chosen(zeros(8, channels, plane)) == "cpp_cpu"
    assert chosen(zeros(8, channels + 1, plane)) != "cpp_cpu"  # over planes_up_to values


def test_bfloat16_statistics_keep_their_digits_with_a_far_first_row():
    """With the first row 100 standard deviations from the mean (the row the output's loops
    centre on; the statistics centre on sampled rows), the batch variance (the running
    variance's update) is still within a bfloat16 ulp of float64's, and the output within
    rounding."""
    x = random_input((4096, 8), mean=3.0, seed=5)
    x[0] += 100 * x.std(0)
    x = x.to(torch.bfloat16)
    _runs_here(x)
    ours = batchnorm.BatchNorm1d(8, momentum=1.0)
    ref = torch.nn.BatchNorm1d(8, momentum=1.0, dtype=torch.float64)
    y = ours(x)
    exact = ref(x.double())
    assert_within_rounding(y, exact.detach(), torch.bfloat16)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=2**-9, atol=0)
    torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, rtol=1e-6, atol=0)


def test_bfloat16_second_derivatives_match_torch():
    """create_graph=True on a bfloat16 input: the reference's differentiable backward."""
    x = random_input((16, 4), mean=1.0).to(torch.bfloat16)
    _runs_here(x)
    results = []
    for xx in (x.clone(), x.double()):
        xx.requires_grad_()
        weight = torch.linspace(0.5, 1.5, 4, dtype=torch.float64 if xx.dtype != x.dtype else None)
        y = batchnorm.functional.batch_norm(xx, None, None, weight, training=True)
        (dx,) = torch.autograd.grad(y.float().pow(3).sum(), xx, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.float().square().sum(), xx)
        results.append((dx, ddx))
    for mine, theirs in zip(*results, strict=True):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(mine.double(), theirs, rtol=0, atol=0.05 * scale)


# float16 and bfloat16 inputs in inference (eval without a graph; float32 parameters and
# statistics): loaded to float32 and rounded back in AVX-512's instructions (rows.cpp's
# eval_halves). Where the CPU lacks AVX-512 (F, BW, VL), float16 stays on ATen and the Numba
# kernels (its tests skip) and bfloat16 on the C++ backend's other loops.


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":")[-1].split())


def test_float16_loops_are_built_where_the_cpu_has_avx512():
    """The float16 tests below skip only where the CPU lacks AVX-512 (F, BW, VL), never on
    a machine that has it (a build without them would hide behind that skip)."""
    if not {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags():
        # no loops to expect there (-march=native leaves them out): nothing to check; our
        # machines and CI have AVX-512, so this runs there
        pytest.skip("this CPU lacks AVX-512 (F, BW, VL), or its flags are unknown")
    assert _takes_float16()


#: Rows and planes, serial and on torch's threads, of widths that are and are not a multiple
#: of the 16 lanes (7x7 planes: three full vectors and one lane more).
HALF_INFERENCE_SHAPES = {
    "(100,128)": ((100, 128), False),
    "(2,3)": ((2, 3), False),
    "channels_last": ((8, 16, 3, 3), True),
    "channels_last threaded": ((13, 24, 29, 31), True),
    "(8203,40) threaded": ((8203, 40), False),
    "NCHW 7x7": ((4, 6, 7, 7), False),
    "NCDHW": ((2, 4, 3, 2, 2), False),
    "NCHW threaded": ((3, 24, 33, 37), False),
}


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "silu", "elu"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name", HALF_INFERENCE_SHAPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inference_is_within_rounding_of_float64(dtype, name, residual, activation):
    _check_half_inference(dtype, *HALF_INFERENCE_SHAPES[name], residual, activation)


@pytest.mark.parametrize("name", ["(100,128)", "NCHW 7x7"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inference_keeps_its_digits_where_the_running_mean_is_large(dtype, name):
    """The running mean folds into the shift (rows.cpp's eval_halves): at a mean of 1000
    and a spread of 1, where float16 inputs are 0.5 apart (bfloat16 ones 4), still within
    rounding."""
    shape, _ = HALF_INFERENCE_SHAPES[name]
    x = random_input(shape, seed=1, mean=1000.0).to(dtype)
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    running = x.double().transpose(0, 1).reshape(shape[1], -1).mean(1).float(), torch.ones(shape[1])
    _runs_here(x, training=False)
    y = batchnorm.functional.batch_norm(x, *running, weight, bias, False)
    exact = _float64(x, weight, bias, None, False, "identity", running, torch.zeros(shape))[0]
    assert_within_rounding(y, exact, dtype)


#: Half-precision outputs (and training dx) of 16 MiB or more (rows.cpp's kStreamFrom:
#: 8,388,608 values), which the loops write with non-temporal stores where each row or
#: plane is whole lanes of 16 values (streams_lanes): rows of 1024 with a ReLU and a
#: residual (dx through the activation's derivative), channels_last rows of 256 (dx from
#: dy) and NCHW planes of 401,408 values in eval. (shape, channels_last, activation,
#: residual)
STREAMED_HALVES = {
    "(8192,1024) ReLU residual": ((8192, 1024), False, "relu", True),
    "channels_last (42,256,28,28)": ((42, 256, 28, 28), True, "identity", False),
    "NCHW (3,7,512,784) eval": ((3, 7, 512, 784), False, "silu", False),
}


@pytest.mark.parametrize("name", STREAMED_HALVES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_outputs_streamed_past_the_caches_are_within_rounding_of_float64(dtype, name):
    """Training steps (eval without a graph for NCHW): y, dx and the residual's gradient
    within rounding of float64's, dweight and dbias to float32's tolerance."""
    shape, channels_last, activation, residual = STREAMED_HALVES[name]
    assert math.prod(shape) * 2 >= 16 << 20
    if channels_last or len(shape) == 2:
        _half_step_is_within_rounding(shape, channels_last, dtype, True, residual, activation)
    else:
        _check_half_inference(dtype, shape, channels_last, residual, activation)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_rows_of_other_widths_past_16_mib_are_within_rounding_of_float64(dtype):
    """Rows of 1030 values past 16 MiB, which stay on plain stores (streams_lanes), with a
    leaky ReLU and a residual."""
    _half_step_is_within_rounding((8200, 1030), False, dtype, True, True, "leaky_relu")


@pytest.mark.parametrize("shape", [(3, 21), (3, 21, 5)], ids=["rows", "planes"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_non_finite_inputs_give_torchs_results(dtype, shape):
    """NaN, infinities and zeros through each activation of the loops, as torch's (ReLU and
    leaky ReLU keep NaN), in the full vectors and the last lanes."""
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.5, 2.0])
    x = specials.repeat(shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1) // 7 + 1)
    x = x[: torch.Size(shape).numel()].reshape(shape).to(dtype)
    stats = torch.zeros(shape[1]), torch.ones(shape[1])
    _runs_here(x, training=False)
    for activation in ("identity", "relu", "leaky_relu"):
        y = batchnorm.functional.batch_norm(x, *stats, training=False, eps=0.0,
                                            activation=activation, negative_slope=0.2)  # fmt: skip
        reference = torch.nn.functional.batch_norm(x.double(), *(t.double() for t in stats),
                                                   eps=0.0)  # fmt: skip
        if activation != "identity":
            reference = TORCH_ACTIVATIONS[activation](reference)
        expected = reference.to(dtype)
        assert same_values(y.float().numpy(), expected.float().numpy()).all()


@pytest.mark.parametrize("channels", [64, 40], ids=["pairs of lanes", "lanes"])
def test_bfloat16_training_keeps_non_finite_values_in_their_channels(channels):
    """bfloat16 rows in training with a NaN and infinities: torch's NaN in those channels
    only (their statistics are NaN or infinite), the others within bfloat16's rounding of
    float64, and torch's running statistics. A channel whose first-pass mean is not finite
    sends every channel's statistics to the float64 terms (rows.cpp's batch_statistics), so
    this checks that way after each first pass of bfloat16 rows: on pairs of lanes (a
    multiple of 32 channels) and on the generic loop's."""
    x = random_input((40, channels), mean=3.0)
    x[3, 1], x[7, 2], x[11, 33] = float("nan"), float("inf"), -float("inf")
    x = x.to(torch.bfloat16)
    _runs_here(x)
    ours, ref = _pair(x.shape)
    y, exact = ours(x), ref(x.double())
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.isnan(), exact.isnan())
    non_finite = [1, 2, 33]
    assert exact[:, non_finite].isnan().all()
    finite = [c for c in range(channels) if c not in non_finite]
    assert_within_rounding(y[:, finite], exact[:, finite], torch.bfloat16)
    for mine, theirs in [
        (ours.running_mean, ref.running_mean),
        (ours.running_var, ref.running_var),
    ]:
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5, equal_nan=True)


@float16_loops
def test_float16_calls_it_cannot_take_go_elsewhere():
    """float16 inputs in eval without a graph, and channels_last ones (small rows) in
    training or with a graph too; NCHW ones of long planes (over float16_planes_up_to
    values) in training or with a graph to record, and any with float16 parameters (a model
    cast with .half()), go to ATen or Numba."""
    x = random_input((8, 8, 16, 16)).to(torch.float16)
    ones = torch.ones(8)

    def chosen(x, training=False, **tensors):
        stats = {"running_mean": torch.zeros(8), "running_var": torch.ones(8)}
        running = {} if training else stats
        call = Call(x, training, "identity", 0.01, False, **running, **tensors)
        return ops.select(call).name

    for layout in (x, x.to(memory_format=torch.channels_last)):
        rows = layout.is_contiguous(memory_format=torch.channels_last)
        assert chosen(layout, weight=ones) == "cpp_cpu"
        assert (chosen(layout, training=True, weight=ones) == "cpp_cpu") == rows
        assert (chosen(layout, weight=ones.requires_grad_()) == "cpp_cpu") == rows
        assert (chosen(layout.requires_grad_()) == "cpp_cpu") == rows
        with torch.no_grad():
            assert chosen(layout, weight=ones) == "cpp_cpu"
        assert chosen(layout.detach(), weight=ones.detach().half()) != "cpp_cpu"
        ones = ones.detach()
