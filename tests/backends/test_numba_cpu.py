"""The Numba CPU kernels: layouts, strides, fused epilogues, splitting, stability, dispatch.

The oracle is torch.nn.functional in float64 (batch_norm followed by torch's activation),
run on the same float32-rounded inputs; the kernels run through the public functional API
with the "numba" backend forced.
"""

import os
import signal
import time

import numba
import pytest
import torch
import torch.nn.functional as F

import batchnorm
import batchnorm.functional as BF
from batchnorm import ops, reference
from batchnorm.backends import numba_cpu as cpu
from batchnorm.backends.layout import dense_in_layout, in_layout, layout_of
from batchnorm.backends.numba_cpu import channels_first, jit
from batchnorm.backends.numba_cpu.channels_last import SHORT_ROW
from conftest import assert_close, random_input

TORCH_ACTIVATIONS = {
    None: lambda v, slope: v,
    "relu": lambda v, slope: torch.relu(v),
    "leaky_relu": lambda v, slope: F.leaky_relu(v, slope),
    "silu": lambda v, slope: F.silu(v),
}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# A shape whose kernels run in parallel (at least jit.SERIAL_BELOW values) but stay quick.
PARALLEL_SHAPE = (8, 4, 48, 48)


@pytest.fixture(autouse=True)
def numba_backend(request):
    """Force the numba backend, except in tests marked ``auto_dispatch``."""
    if request.node.get_closest_marker("auto_dispatch"):
        yield
        return
    with ops.use_backend("numba"):
        yield


def oracle(x, w, b, z, training, activation=None, slope=0.01, dy=None, rm=None, rv=None):
    """y and (dx, dw, db, dz) from torch in float64 through autograd."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, z)]
    x64, w64, b64, z64 = leaves
    rm = rm.double() if rm is not None else None
    rv = rv.double() if rv is not None else None
    y = F.batch_norm(x64, rm, rv, w64, b64, training=training)
    if z64 is not None:
        y = y + z64
    y = TORCH_ACTIVATIONS[activation](y, slope)
    grads = None
    if dy is not None:
        inputs = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(y, inputs, dy.double()))
        grads = [next(got) if t is not None else None for t in leaves]
    return y.detach(), grads


def ours(x, w, b, z, training, activation=None, slope=0.01, dy=None, rm=None, rv=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, z)]
    x_, w_, b_, z_ = leaves
    y = BF.batch_norm(x_, rm, rv, w_, b_, training, 0.1, 1e-5, activation=activation,
                      negative_slope=slope, residual=z_)  # fmt: skip
    grads = None
    if dy is not None:
        y.backward(dy)
        grads = [t.grad if t is not None else None for t in leaves]
    return y.detach(), grads


def check(x, *, dtype=None, training=True, activation=None, slope=0.01, residual=False,
          dy=None, affine=True, seed=0):  # fmt: skip
    """Values and gradients of the numba path against the float64 oracle."""
    dtype = dtype or x.dtype
    c = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if affine else None
    z = random_input(tuple(x.shape), dtype, seed=seed + 1) if residual else None
    dy = random_input(tuple(x.shape), dtype, seed=seed + 2) if dy is None else dy
    rm = rv = None
    if not training:
        rm = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
        rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    y, grads = ours(x, w, b, z, training, activation, slope, dy, rm, rv)
    y_ref, grads_ref = oracle(x, w, b, z, training, activation, slope, dy, rm, rv)
    assert_close(y, y_ref, dtype)
    for got, expected in zip(grads, grads_ref, strict=True):
        if expected is not None:
            assert_close(got, expected, dtype)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((16, 5), False), ((4, 5, 7), False), ((3, 5, 4, 6), False), ((3, 5, 4, 6), True),
     ((2, 5, 3, 4, 3), True), ((3, 5, 1, 1), False)],
    ids=["NC", "NCL", "NCHW", "NHWC", "NDHWC", "NC11"],
)  # fmt: skip
def test_layouts_match_torch(shape, channels_last, training, dtype):
    x = random_input(shape, dtype, channels_last, seed=3, mean=2.0)
    y = check(x, training=training)
    if channels_last:
        assert y.is_contiguous(memory_format=CHANNELS_LAST[len(shape)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((4, 6, 5, 7), False), ((4, 6, 5, 7), True), (PARALLEL_SHAPE, False),
     (PARALLEL_SHAPE, True), ((20000, 6), False), ((258, SHORT_ROW), False),
     ((258, SHORT_ROW + 1), False)],
    ids=["NCHW", "NHWC", "NCHW-parallel", "NHWC-parallel", "NC-parallel", "NC-rows-by-four",
         "NC-rows-by-one"],
)  # fmt: skip
@pytest.mark.parametrize("mean", [2.0, 1e4])
def test_training_statistics_of_every_variant(shape, channels_last, dtype, mean):
    """The batch mean, biased variance and invstd that training writes (the running update
    and backward use them), serial and parallel, rows of channels-last inputs summed four
    at a time or one at a time (blocks of 256 rows and of 2: 258 rows), against float64."""
    x = random_input(shape, torch.float32, channels_last, seed=11, mean=mean).to(dtype)
    channels = shape[1]
    _, mean, var, invstd = cpu.NumbaBackend().forward_train(
        x, torch.ones(channels), torch.zeros(channels), None, 1e-5, "identity", 0.01
    )
    exact_mean, exact_var = reference.batch_stats(x.double())
    assert mean.dtype == var.dtype == invstd.dtype == torch.float32
    assert_close(mean, exact_mean, torch.float32)
    assert_close(var, exact_var, torch.float32)
    assert_close(invstd, reference.invstd_of(exact_var, 1e-5), torch.float32)


def test_transposed_ncl_input_runs_channels_last():
    x = random_input((4, 6, 9)).transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L), C last
    assert dense_in_layout(x)[0] == "cl"
    assert dense_in_layout(x)[1] is x  # dense already: no copy
    check(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 6, 5, 5),
        lambda: torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(2, 6, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d),
        lambda: torch.randn(4, 6),
        lambda: torch.randn(6, 4).t(),
        lambda: torch.randn(4, 6, 1, 1),
        lambda: torch.randn(1, 6, 1, 5).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(4, 6, 9).transpose(1, 2).contiguous().transpose(1, 2),
        lambda: torch.randn(4, 6, 10, 10)[:, :, ::2, 1:6],
        lambda: torch.randn(4, 12, 5, 5)[:, ::2],
    ],
)
def test_dense_in_layout_is_layout_of_then_in_layout(make):
    """The fast path of dense_in_layout decides as layout_of and in_layout do."""
    x = make()
    layout, dense = dense_in_layout(x)
    assert layout == layout_of(x)
    expected = in_layout(x, layout)
    assert torch.equal(dense, expected) and dense.stride() == expected.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_activation_and_residual(training, channels_last, activation, dtype):
    x = random_input((4, 6, 5, 3), dtype, channels_last, seed=4)
    for residual in (False, True):
        check(x, training=training, activation=activation, slope=0.2, residual=residual)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
def test_fused_activation_on_the_parallel_path(activation):
    for channels_last in (False, True):
        x = random_input(PARALLEL_SHAPE, torch.float32, channels_last, seed=5)
        check(x, activation=activation, slope=0.1, residual=True)


def test_strided_inputs_and_gradients_in_other_layouts():
    base = random_input((6, 4, 10, 8), torch.float64, seed=6)
    strided = base[:, :, ::2, 1:7]  # neither layout: copied once
    nhwc = random_input((6, 4, 5, 6), torch.float64, True, seed=7)
    nchw = random_input((6, 4, 5, 6), torch.float64, seed=8)
    check(strided, dy=nhwc, residual=True, activation="relu")
    check(nhwc, dy=nchw, activation="silu")  # x channels-last, dy contiguous
    check(nchw, dy=nhwc[..., :6], activation="leaky_relu")  # and the other way round
    check(nchw.transpose(2, 3), dy=nchw.transpose(2, 3).contiguous())  # permuted spatial dims


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_small_channel_count_splits_the_batch(channels_last):
    """C = 2 and many values per channel: the statistics are merged from many pieces."""
    x = random_input((64, 2, 40, 40), torch.float32, channels_last, seed=9, mean=3.0)
    assert x.numel() >= jit.SERIAL_BELOW
    check(x, activation="relu", residual=True)
    x = random_input((20000, 3), torch.float32, seed=10)  # (N, C): blocks of rows
    check(x)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_nchw_rows_longer_than_a_piece_and_rows_of_a_few_values(activation):
    """cf rows longer than jit.CHUNK are summed in several pieces, shorter ones as one piece
    each (without slicing): both against the float64 reference, serial and parallel."""
    long_rows = random_input((2, 3, 70, 70), torch.float32, seed=12, mean=3.0)
    assert long_rows.shape[2] * long_rows.shape[3] > jit.CHUNK
    short_rows = random_input((8, 256, 6, 6), torch.float32, seed=13, mean=3.0)
    assert short_rows.numel() >= jit.SERIAL_BELOW
    for x in (long_rows, short_rows, short_rows[:2]):
        check(x, activation=activation, residual=activation is not None)


def test_nchw_channel_by_channel_beyond_the_cache(monkeypatch):
    """Tensors over channels_first.BEYOND_CACHE bytes with long rows (LONG_ROW_BYTES or
    more) run channel by channel, forward and backward (relu and a residual: dpre written
    and reread), serial and parallel, training and eval, against the float64 reference;
    SiLU's dpre kept for the channel's dx (or summed from dL/dresidual, where it is
    written)."""
    x = random_input((1, 8, 1600, 512), torch.float32, seed=14, mean=3.0)
    assert x.numel() * x.element_size() > channels_first.BEYOND_CACHE
    assert x[0, 0].numel() * x.element_size() >= channels_first.LONG_ROW_BYTES
    for threshold in (0, 1 << 40):  # everything parallel, then everything serial
        monkeypatch.setattr(jit, "SERIAL_BELOW", threshold)
        check(x, activation="relu", residual=True)
    check(x, training=False, activation="relu")  # eval's backward: x does not enter dx
    check(x, activation="silu")
    check(x, activation="silu", residual=True)


def test_nchw_passes_run_channel_by_channel_only_where_rows_are_read_in_runs():
    """channels_first._channel_major: past BEYOND_CACHE, rows of LONG_ROW_BYTES or more (the
    hardware prefetcher follows them; shorter ones, C * S values apart, cost more than the
    row-by-row kernel's second read in memory order); below it, the forward's short rows;
    never with fewer than CHANNELS_PER_THREAD channels a thread."""
    channel_major = channels_first._channel_major
    beyond = channels_first.BEYOND_CACHE
    # (n_batch, channels, size, itemsize, threads, short_rows)
    assert channel_major(8, 64, 16 * 56 * 56, 4, 2, False)  # 51 MiB, rows of 196 KiB
    assert channel_major(8, 64, 16 * 56 * 56, 2, 2, True)  # bfloat16, rows of 98 KiB
    assert not channel_major(64, 256, 28 * 28, 4, 2, True)  # 51 MiB, rows of 3 KiB
    assert not channel_major(128, 1024, 7 * 7, 4, 2, True)  # 26 MiB, rows of 196 bytes
    rows = beyond // (8 * 4 * 8192) + 1
    assert channel_major(rows, 8, 8192, 4, 2, False)  # rows of exactly LONG_ROW_BYTES
    assert not channel_major(rows, 8, 8191, 4, 2, False)
    assert channel_major(8, 256, 36, 4, 2, True)  # 288 KiB, short rows: the forward
    assert not channel_major(8, 256, 36, 4, 2, False)  # ... not the backward
    assert not channel_major(8, 7, 16 * 56 * 56, 4, 2, False)  # 3 channels a thread


def test_serial_and_parallel_variants_agree(monkeypatch):
    x = random_input((6, 5, 12, 12), torch.float32, seed=11)
    assert cpu.cf_forward.pick(10)[0] is cpu.cf_forward.serial
    assert cpu.cf_forward.pick(jit.SERIAL_BELOW)[0] is cpu.cf_forward.parallel
    results = []
    for threshold in (0, 1 << 40):  # everything parallel, then everything serial
        monkeypatch.setattr(jit, "SERIAL_BELOW", threshold)
        for channels_last in (False, True):
            results.append(check(x.contiguous(memory_format=torch.channels_last)
                                 if channels_last else x, activation="silu"))  # fmt: skip
    assert_close(results[0], results[2])
    assert_close(results[1], results[3])


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_large_mean_is_stable_on_the_parallel_path(channels_last):
    """Mean 1e4, std 1 in float32: the pieces' own means keep every digit."""
    x = random_input(PARALLEL_SHAPE, torch.float32, channels_last, seed=12, mean=1e4)
    y = BF.batch_norm(x, None, None, training=True)
    dims = (0, 2, 3)
    assert_close(y.mean(dims), torch.zeros(4), atol=1e-3, rtol=0)
    assert_close(y.std(dims), torch.ones(4), atol=1e-3, rtol=0)
    y_ref, _ = oracle(x, None, None, None, True)
    # float32 rounds x itself to 1e-3 (an ulp of 1e4), i.e. 1e-3 of a std
    assert_close(y, y_ref, atol=3e-3, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_statistics_keep_their_digits_with_a_far_first_row(threads):
    """A channels-last block of rows sums float32 terms around a centre, whose distance from
    the mean costs digits: the middle two of four sampled rows, which one far row does not
    move. (122, 8), one block, the first row 10 std from the mean: the output within 1e-6 of
    its scale (centred on the first row: 1.7e-5; on the mean of the four rows: 1.8e-6)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in range(10):
            x = random_input((122, 8), mean=3.0, seed=seed)
            x[0] += 10 * x.std(0)
            y = BF.batch_norm(x, None, None, training=True)
            expected = F.batch_norm(x.double(), None, None, training=True)
            assert (y.double() - expected).abs().max() < 1e-6 * expected.abs().max()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("momentum", [0.1, 0.75, 1.0])
def test_running_update_matches_reference(dtype, momentum):
    g = torch.Generator().manual_seed(13)
    mean, var = torch.randn(7, generator=g).to(dtype), torch.rand(7, generator=g).to(dtype)
    rm, rv = torch.randn(7, generator=g).to(dtype), torch.rand(7, generator=g).to(dtype)
    rm2, rv2 = rm.clone(), rv.clone()
    for count, unbiased in [(5, True), (5, False), (1, True), (0, True)]:
        cpu.NumbaBackend().update_running_stats(rm, rv, mean, var, count, momentum, unbiased)
        reference.update_running_stats(rm2, rv2, mean, var, count, momentum, unbiased)
        assert_close(rm, rm2)
        assert_close(rv, rv2)


def test_training_module_updates_running_stats_like_torch():
    x = random_input((32, 6), torch.float32, seed=14, mean=1.0)
    theirs = torch.nn.BatchNorm1d(6, momentum=0.3)
    rm, rv = theirs.running_mean.clone(), theirs.running_var.clone()
    for _ in range(3):
        theirs(x)
        BF.batch_norm(x, rm, rv, training=True, momentum=0.3)
    assert_close(rm, theirs.running_mean)
    assert_close(rv, theirs.running_var)


def test_relu_keeps_nan_and_zeroes_minus_inf_as_torch_does():
    x = torch.tensor([[1.0, float("nan")], [-float("inf"), 2.0], [0.5, -1.0]])
    rm, rv = torch.zeros(2), torch.ones(2)
    got = BF.batch_norm(x, rm, rv, activation="relu")
    expected = torch.relu(F.batch_norm(x, rm, rv))
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_threads_follow_torch():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        BF.batch_norm(random_input(PARALLEL_SHAPE), None, None, training=True)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    BF.batch_norm(random_input(PARALLEL_SHAPE), None, None, training=True)
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)


_ONE_THREAD = """
import torch
torch.set_num_threads(1)
import batchnorm
x = torch.randn(8, 64, 32, 32).contiguous(memory_format=torch.channels_last)
with batchnorm.ops.use_backend("numba"):
    batchnorm.BatchNorm2d(64)(x)
print(torch.get_num_threads())
"""


def test_first_parallel_kernel_keeps_torch_thread_count():
    """Launching Numba's OpenMP threads (once per process, hence a fresh one) sets the
    OpenMP runtime it shares with torch to all cores; torch.set_num_threads(1) must hold."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _ONE_THREAD], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"


@pytest.mark.auto_dispatch
def test_dispatch_numba_for_cpu_floats_of_every_width():
    for dtype, name in [(torch.float32, "numba"), (torch.float64, "numba"),
                        (torch.float16, "numba"), (torch.bfloat16, "numba"),
                        (torch.int32, "reference")]:  # fmt: skip
        assert ops.select_backend(torch.zeros(2, 3, dtype=dtype)).name == name
    assert ops.select_backend(torch.zeros(2, 3, device="meta")).name == "reference"


# The fork case cannot exist where the OS has no fork (Windows); Linux CI always runs it.
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_the_serial_kernels():
    """GNU OpenMP cannot run in a child forked after it started (numba would end the child):
    children forked after a parallel kernel use the serial ones."""
    x = random_input(PARALLEL_SHAPE, torch.float32, seed=15)
    expected = BF.batch_norm(x, None, None, training=True)  # the parallel kernel runs here
    pid = os.fork()
    if pid == 0:  # the child: no torch op that would itself start OpenMP threads
        try:
            y = BF.batch_norm(x, None, None, training=True)
            ok = jit._forked_child and torch.equal(y[0, 0, 0, :8], expected[0, 0, 0, :8])
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child did not finish")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_silu_over_the_whole_range_of_exp(dtype):
    """The kernels' own vectorized exp: from saturated to overflowing pre-activations."""
    pre = torch.linspace(-800, 800, 64000, dtype=torch.float64).to(dtype)
    x = torch.cat([pre, pre.flip(0)]).view(2, 2, -1).transpose(0, 1).contiguous()  # (2, 2, L)
    rm, rv = torch.zeros(2, dtype=dtype), torch.full((2,), 1 - 1e-5, dtype=dtype)  # pre = x
    x_ = x.clone().requires_grad_()
    y = BF.batch_norm(x_, rm, rv, activation="silu")
    dy = torch.ones_like(x)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    y64 = F.silu(x64)
    y64.backward(dy.double())
    assert_close(y, y64.detach(), dtype)
    assert_close(x_.grad, x64.grad, dtype)


# A read-only install: the package folder and the home folder cannot be written (simulated,
# since the tests may run as root, who can write anywhere).
_READ_ONLY = """
import os, sys, tempfile
blocked = [os.path.realpath(p) for p in sys.argv[1:]]
def _is_blocked(path):
    return any(os.path.realpath(path).startswith(b) for b in blocked)
_temporary_file, _makedirs = tempfile.TemporaryFile, os.makedirs
def temporary_file(*args, dir=None, **kwargs):
    if dir is not None and _is_blocked(dir):
        raise PermissionError(13, "Permission denied (simulated)", dir)
    return _temporary_file(*args, dir=dir, **kwargs)
def makedirs(name, *args, **kwargs):
    if _is_blocked(name) and not os.path.isdir(name):
        raise PermissionError(13, "Permission denied (simulated)", name)
    return _makedirs(name, *args, **kwargs)
tempfile.TemporaryFile, os.makedirs = temporary_file, makedirs
import numba, torch, batchnorm
print(batchnorm.BatchNorm1d(8)(torch.randn(4, 8)).shape[1], repr(numba.config.CACHE_DIR))
"""


@pytest.mark.parametrize("temp_writable", [True, False])
def test_import_works_when_the_cache_folders_are_read_only(tmp_path, temp_writable):
    import subprocess
    import sys

    import batchnorm.backends.numba_cpu as package

    home, temp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), temp.mkdir()
    blocked = [os.path.dirname(package.__file__), str(home)]
    blocked += [] if temp_writable else [str(temp)]
    # (BATCHNORM_CPP=0: the C++ backend, whose cache is under HOME too, would otherwise be
    # built again in the child, 30 s, for a call these tests do not need it for)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(temp), "BATCHNORM_CPP": "0"}
    env.pop("NUMBA_CACHE_DIR", None)
    env.pop("XDG_CACHE_HOME", None)
    done = subprocess.run([sys.executable, "-c", _READ_ONLY, *blocked], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    channels, cache_dir = done.stdout.split()
    assert channels == "8"
    # the temp folder holds the cache when it is writable; else the kernels are not cached
    assert (str(temp) in cache_dir) if temp_writable else cache_dir == "''"


@pytest.mark.auto_dispatch
def test_dispatch_small_nchw_planes_to_aten_large_ones_to_numba(request):
    """Where the C++ backend does not take an NCHW training call (it takes those of up to
    its ``planes_up_to`` values where it builds; declined here), a model's late small planes go
    to ATen (see ATEN_BELOW_PLANE, which depends on the thread count); large planes stay on
    the Numba kernels in training, and the same small values channels-last go to the C++
    backend where it builds (else the Numba kernels)."""
    from batchnorm.backends import Call, cpp_cpu
    from batchnorm.ops.dispatch import select

    def chosen(x: torch.Tensor) -> str:
        return select(Call(x, True, "silu", 0.01, False, False, True)).name

    small = torch.zeros(8, 1152, 3, 3)
    channels_last = small.contiguous(memory_format=torch.channels_last)
    assert chosen(small) == ("cpp_cpu" if cpp_cpu.extension() else "aten")
    assert chosen(channels_last) == ("cpp_cpu" if cpp_cpu.extension() else "numba")
    request.getfixturevalue("cpp_declines_nchw_training")  # from here on
    assert chosen(small) == "aten"
    assert chosen(torch.zeros(8, 96, 24, 24)) == "numba"
    # 5x5 and 6x6 planes: ours on one thread, ATen's on more (see ATEN_BELOW_PLANE_THREADED)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert chosen(torch.zeros(8, 672, 6, 6)) == "numba"
        assert chosen(torch.zeros(8, 512, 5, 5)) == "numba"
        assert chosen(torch.zeros(8, 512, 4, 4)) == "aten"
        torch.set_num_threads(2)
        assert chosen(torch.zeros(8, 672, 6, 6)) == "aten"
        assert chosen(torch.zeros(8, 512, 7, 7)) == "numba"
        # half precision: ATen up to 13x13 planes on more threads (ATEN_BELOW_PLANE_HALF_THREADED)
        for dtype in (torch.bfloat16, torch.float16):
            assert chosen(torch.zeros(8, 256, 13, 13, dtype=dtype)) == "aten"
            assert chosen(torch.zeros(8, 256, 14, 14, dtype=dtype)) == "numba"
        torch.set_num_threads(1)
        assert chosen(torch.zeros(8, 256, 13, 13, dtype=torch.bfloat16)) == "numba"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.auto_dispatch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.usefixtures("cpp_declines_nchw_training")
def test_default_dispatch_runs_silu_after_the_kernels_bn(dtype, monkeypatch):
    """On the Numba kernels, float32 and float64 SiLU calls below SILU_FUSED_FROM values
    run as the kernels' BN (the residual included) followed by torch's SiLU
    (NumbaBackend.unfused): faster, the same results (the float64 oracle), the layer's state
    updated once; larger inputs, a forced backend and half-precision inputs keep the fused
    epilogue."""
    from batchnorm.backends import Call
    from batchnorm.ops.dispatch import select

    x = random_input((8, 16, 24, 24), dtype, seed=20, mean=2.0)
    assert select(Call(x, True, "silu", 0.01, True)).name == "numba"

    def grad_fn(x: torch.Tensor) -> str:
        y = BF.batch_norm(
            x.requires_grad_(), None, None, training=True, activation="silu", residual=x
        )
        return type(y.grad_fn).__name__

    assert grad_fn(x.clone()) == "SiluBackward0"
    check(x, activation="silu", residual=True)  # training, default dispatch
    check(x, training=False, activation="silu", residual=True)  # eval with a graph
    layer = batchnorm.BatchNormAct2d(16, activation="silu", dtype=dtype)
    layer(x)
    assert layer.num_batches_tracked == 1
    torch.testing.assert_close(layer.running_mean, 0.1 * x.mean((0, 2, 3)))
    with ops.use_backend("numba"):
        assert grad_fn(x.clone()) != "SiluBackward0"
    with monkeypatch.context() as patched:  # (undo() would undo the fixture's patch too)
        patched.setattr(cpu, "SILU_FUSED_FROM", x.numel())
        assert grad_fn(x.clone()) != "SiluBackward0"
    half = x.to(torch.bfloat16)
    assert select(Call(half, True, "silu", 0.01, True)).name == "numba"
    assert grad_fn(half) != "SiluBackward0"


@pytest.mark.auto_dispatch
def test_dispatch_long_float32_channel_sums_to_numba():
    """ATen's float32 kernel for (N, C) and channels-last inputs adds a channel's rows one
    by one, its NCHW kernel a plane's values in a few lanes: beyond ATEN_MAX_ROWS rows per
    channel or ATEN_MAX_PLANE values per plane, the calls in which it sums (training, or
    eval with a weight or bias to differentiate) go to the kernels. Plain eval, shorter
    sums and other dtypes stay where they were. (The C++ backend, which takes the small
    float32 (N, C) and channels-last training calls first where it builds, is left out here:
    these are the rules without it.)"""
    from batchnorm.backends import Call
    from batchnorm.backends.aten import ATEN_MAX_PLANE, ATEN_MAX_ROWS
    from batchnorm.ops.dispatch import select

    def chosen(x: torch.Tensor, training: bool = True, weight=None) -> str:
        return select(Call(x, training, "identity", 0.01, False, weight=weight)).name

    cpp = ops.backend_named("cpp_cpu")
    ops.unregister_backend("cpp_cpu")
    try:
        _aten_and_numba_rules(chosen, ATEN_MAX_ROWS, ATEN_MAX_PLANE)
    finally:
        ops.register_backend(cpp)


def _aten_and_numba_rules(chosen, rows, max_plane):
    assert chosen(torch.zeros(rows, 8)) == "aten"
    assert chosen(torch.zeros(rows + 1, 8)) == "numba"
    nchw = torch.zeros(1, 8, 16, 17)  # 272 rows per channel, planes of 272 values
    assert chosen(nchw) == "aten"
    assert chosen(nchw.contiguous(memory_format=torch.channels_last)) == "numba"
    assert chosen(torch.zeros(2, 2, 32, max_plane // 32)) == "aten"
    assert chosen(torch.zeros(2, 2, 32, max_plane // 32 + 1)) == "numba"
    assert chosen(torch.zeros(2040, 1, dtype=torch.float64)) == "aten"
    assert chosen(torch.zeros(2040, 1, dtype=torch.bfloat16)) == "aten"
    x, weight = torch.zeros(2040, 1), torch.ones(1, requires_grad=True)
    assert chosen(x, training=False) == "aten"
    assert chosen(x, training=False, weight=weight.detach()) == "aten"
    assert chosen(x, training=False, weight=weight) == "numba"
    with torch.no_grad():
        assert chosen(x, training=False, weight=weight) == "aten"
