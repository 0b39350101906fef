"""The Triton backend's results against reference.py in float64: the checks shared by the
interpreter suite (tests/backends/test_triton_interpreter.py, tiny CPU tensors) and the GPU
suite (tests/backends/test_triton_cuda.py, CUDA tensors of real layer sizes).

Nothing here imports triton: the backend under test is passed in.
"""

from __future__ import annotations

import torch

from batchnorm import reference
from conftest import TOLERANCES, random_input

HALF = (torch.float16, torch.bfloat16)
SLOPE = 0.1  # not torch's default 0.01: a slope read as another number would show


def make(shape, memory_format, dtype, seed=0, mean=0.0, device="cpu"):
    """random_input of ``shape`` in ``memory_format`` (None: contiguous) on ``device``."""
    x = random_input(shape, dtype, seed=seed, mean=mean).to(device)
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def params(channels, dtype, seed=1, weight=True, bias=True, device="cpu"):
    """weight (away from 0, both signs) and bias; float32 for half inputs, as under
    torch.autocast."""
    g = torch.Generator().manual_seed(seed)
    pdtype = reference.compute_dtype(dtype)
    sign = torch.sign(torch.randn(channels, generator=g))
    w = ((torch.rand(channels, generator=g) + 0.5) * sign).to(device, pdtype)
    b = torch.randn(channels, generator=g).to(device, pdtype)
    return (w if weight else None), (b if bias else None)


def f64(t):
    return None if t is None else t.detach().double()


def check(actual, expected, dtype, what=""):
    """``actual`` (of dtype) against the float64 ``expected``.

    float32/float64: the suite's tolerances (relative, and to the tensor's largest
    magnitude). float16/bfloat16: no worse than twice the error of rounding ``expected``
    itself to that dtype (largest error; element-wise: one unit in the last place), plus
    1e-5 of the tensor's magnitude for what float32 arithmetic adds."""
    assert actual.dtype == dtype, (what, actual.dtype, dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    if dtype not in HALF:
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(
            actual.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=what
        )
        return
    error = (actual.double() - expected).abs()
    rounding = (expected.to(dtype).double() - expected).abs()
    atol = 1e-5 * scale
    assert error.max() <= 2 * rounding.max() + atol, (what, error.max(), rounding.max())
    ulp = torch.finfo(dtype).eps * expected.abs()
    assert (error <= ulp + atol).all(), (what, (error - ulp).max())


def check_stats(actual, expected, x_dtype, what=""):
    """Statistics and parameter gradients: float32 for half inputs, else x's dtype."""
    check(actual, expected, reference.compute_dtype(x_dtype), what)


def run_and_compare(backend, x, weight, bias, residual, activation, need_dpre=True, seed=7,
                    y_atol=None):  # fmt: skip
    """Training forward + backward and eval forward + backward of ``backend`` against
    reference.py in float64 on the same inputs (backward and eval get the statistics the
    backend computed, so they are checked on their own). ``y_atol``: compare the training
    output to the exact one with this absolute tolerance instead."""
    dtype = x.dtype
    dy = random_input(tuple(x.shape), dtype, seed=seed).to(x.device)
    eps = 1e-5
    # training forward: statistics against the exact ones, y against the exact y
    y, mean, var, invstd = backend.forward_train(x, weight, bias, residual, eps, activation, SLOPE)
    m64, v64 = reference.batch_stats(f64(x))
    i64 = reference.invstd_of(v64, eps)
    check_stats(mean, m64, dtype, "mean")
    check_stats(var, v64, dtype, "var")
    check_stats(invstd, i64, dtype, "invstd")
    expected = reference.forward(
        f64(x), m64, i64, f64(weight), f64(bias), f64(residual), activation, SLOPE
    )
    if y_atol is None:
        check(y, expected, dtype, "y (training)")
    else:
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=y_atol)
    for training in (True, False):
        if not training:  # eval: statistics that are not those of the batch
            mean = (m64 + 0.3).to(mean.dtype)
            invstd = (i64 * 0.7).to(invstd.dtype)
            y = backend.forward_eval(x, weight, bias, residual, mean, invstd, activation, SLOPE)
            expected = reference.forward(
                f64(x), f64(mean), f64(invstd), f64(weight), f64(bias), f64(residual),
                activation, SLOPE,
            )  # fmt: skip
            check(y, expected, dtype, "y (eval)")
        dx, dw, db, dpre = backend.backward(
            dy, x, weight, bias, residual, mean, invstd, training, activation, SLOPE, need_dpre
        )
        ex, ew, eb, ep = reference.backward(
            f64(dy), f64(x), f64(mean), f64(invstd), f64(weight), f64(bias), f64(residual),
            training, activation, SLOPE,
        )  # fmt: skip
        mode = "training" if training else "eval"
        check(dx, ex, dtype, f"dx ({mode})")
        check_stats(dw, ew, dtype, f"dweight ({mode})")
        check_stats(db, eb, dtype, f"dbias ({mode})")
        if need_dpre:
            check(dpre, ep, dtype, f"dpre ({mode})")
        else:
            assert dpre is None
