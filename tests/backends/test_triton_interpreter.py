"""The Triton backend's kernels against reference.py (in float64), under Triton's interpreter.

``triton.jit`` decides when a kernel is defined whether it will be compiled for a GPU or
interpreted on CPU (``TRITON_INTERPRET=1``), and the rest of the suite must not run in
interpreter mode (a process-wide setting: it would also send CPU tensors to the Triton
backend once that is registered). So the ordinary ``pytest`` run (no TRITON_INTERPRET) only
sees the first part of this file: a test that runs the file again in a child process with
TRITON_INTERPRET=1 and fails with the child's report, and checks of compiled mode (CPU
tensors are declined; every kernel compiles for an sm_90 GPU, which needs no GPU). The
child sees the second part, the interpreter cases. Run them directly to see each one:

    TRITON_INTERPRET=1 python -m pytest tests/backends/test_triton_interpreter.py

The interpreter runs every program of a grid in turn with NumPy, so the shapes are small
and the tiles of ``SMALL`` tiny, to cross every block boundary (S not a multiple of the
tile, C not a multiple of the channel block, several tiles per piece, several pieces,
several blocks of pieces in the merge) on them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: its kernels cannot be tested")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


if not INTERPRETED:
    import triton

    #: The suites whose every test takes a backend (tests/conftest.py's ``backend`` fixture,
    #: or their own list of backends): in the child they run through Triton too, from the
    #: layers, variants and SyncBatchNorm (two gloo ranks) down to PyTorch's own tests.
    PARITY_SUITES = [
        "nn/test_modules.py", "nn/test_modules_act.py", "nn/test_variants.py",
        "nn/test_sync_batchnorm.py", "test_functional.py", "test_errors.py",
        "test_torch_func.py", "test_fuzz.py", "test_torch_suites.py",
    ]  # fmt: skip

    def test_interpreter_suite_in_a_child_process():
        """Every case below, and every parity test of PARITY_SUITES with the Triton
        backend, run by a child pytest with TRITON_INTERPRET=1."""
        import batchnorm

        src = str(Path(batchnorm.__file__).resolve().parents[1])
        paths = [src, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(paths)}
        tests = Path(__file__).resolve().parents[1]
        suites = [str(tests / suite) for suite in PARITY_SUITES]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                   "triton", __file__, *suites]  # fmt: skip
        start = time.perf_counter()
        child = subprocess.run(
            command, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
            text=True, timeout=900,
        )  # fmt: skip
        report = child.stdout[-12000:] + child.stderr[-4000:]
        assert child.returncode == 0, f"interpreter tests failed (rc {child.returncode}):\n{report}"
        assert " passed" in child.stdout, report
        print(f"interpreter tests: {time.perf_counter() - start:.1f} s")

    def test_compiled_mode_declines_cpu_tensors():
        """Without the interpreter the kernels are compiled for a GPU: CPU tensors are not
        taken (on a machine without GPU, the dispatch then keeps the other backends)."""
        from batchnorm.backends import triton as backend

        assert not backend.INTERPRETED
        assert not backend.supports(torch.zeros(2, 3))
        if torch.cuda.is_available():
            assert backend.supports(torch.zeros(2, 3, device="cuda"))

    #: Kernel arguments that are not pointers (the rest are, to the dtypes given per case).
    _INTS = {"N", "C", "S", "stride_n", "stride_c", "tiles_s", "tiles", "tiles_per_piece",
             "pieces", "count", "bessel_num", "bessel_den"}  # fmt: skip
    _FLOATS = {"slope_hi", "slope_lo", "eps_hi", "eps_lo", "momentum_hi", "momentum_lo"}

    def _compile_for_sm90(kernel, pointers, constexprs):
        """Compile ``kernel`` for an sm_90 GPU (H100/H200); no GPU is needed for that.
        ``pointers``: element type per pointer argument, "default" for the others."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from batchnorm.backends.triton.backend import LAUNCH_OPTIONS

        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in _INTS:
                signature[name] = "i32"
            elif name in _FLOATS:
                signature[name] = "fp32"
            else:
                signature[name] = "*" + pointers.get(name, pointers["default"])
        source = ASTSource(kernel, signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=LAUNCH_OPTIONS)

    def _needs_the_compiler():
        from triton.backends import backends

        # Environment guards, not hidden failures: a triton build without its NVIDIA
        # compiler (or older than the pin) cannot run this check; CI pins 3.9.0, which has it.
        if "nvidia" not in backends:
            pytest.skip("triton has no NVIDIA backend here: nothing to compile with")
        if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
            pytest.skip("the compile check uses triton 3.9's ASTSource API (pinned: 3.9.0)")

    #: (x dtype, parameter dtype, blocks) per activation: every activation, x dtype, both
    #: accumulators, and each of HAS_Z / HAS_WEIGHT / HAS_BIAS / TRAINING / WRITE_DPRE both
    #: ways, in 5 cases.
    _CF = {"BLOCK_N": 16, "BLOCK_C": 1, "BLOCK_S": 128}
    _CL = {"BLOCK_N": 32, "BLOCK_C": 64, "BLOCK_S": 1}
    _COMPILE_CASES = {
        "identity": ("fp32", "fp32", _CF),
        "relu": ("fp16", "fp32", _CL),
        "leaky_relu": ("bf16", "fp32", _CF),
        "silu": ("fp64", "fp64", _CL),
        "elu": ("bf16", "bf16", _CL),
    }

    @pytest.mark.parametrize("activation", list(_COMPILE_CASES))
    def test_kernels_compile_for_a_gpu(activation):
        """The interpreter runs a kernel as Python, which accepts what the compiler refuses
        (a loop-carried variable changing type, for one): every kernel is also compiled for
        an sm_90 GPU, down to its cubin, in specializations covering every constexpr."""
        import triton.language as tl

        from batchnorm.backends.triton import kernels_backward as backward
        from batchnorm.backends.triton import kernels_forward as forward

        _needs_the_compiler()
        x, p, blocks = _COMPILE_CASES[activation]
        acc = tl.float64 if x == "fp64" else tl.float32
        stats = "fp64" if x == "fp64" else "fp32"
        i = list(_COMPILE_CASES).index(activation)
        flags = {"HAS_Z": i % 2 == 0, "HAS_WEIGHT": i != 1, "HAS_BIAS": i != 2,
                 "ACTIVATION": activation, "ACC": acc, **blocks}  # fmt: skip
        data = {"default": stats, "x_ptr": x, "y_ptr": x, "z_ptr": x, "dy_ptr": x, "dx_ptr": x,
                "dpre_ptr": x, "weight_ptr": p, "bias_ptr": p}  # fmt: skip
        _compile_for_sm90(forward.normalize_kernel, data, {**flags, "BF16_BY_HAND": False})
        _compile_for_sm90(backward.grad_partial_kernel, data, flags)
        for training in (True, False):
            more = {"TRAINING": training, "WRITE_DPRE": training == (i % 2 == 0)}
            _compile_for_sm90(
                backward.grad_input_kernel, data, {**flags, **more, "BF16_BY_HAND": False}
            )
        _compile_for_sm90(forward.stats_partial_kernel, {"default": "fp64", "x_ptr": x},
                          {"ACC": acc, **blocks})  # fmt: skip
        merge = {"BLOCK_P": 32, "BLOCK_C": 32}
        _compile_for_sm90(forward.stats_merge_kernel, {"default": "fp64", "mean_ptr": stats,
                          "var_ptr": stats, "invstd_ptr": stats}, merge)  # fmt: skip
        _compile_for_sm90(backward.grad_merge_kernel, {"default": stats}, merge)
        _compile_for_sm90(forward.running_update_kernel, {"default": stats}, {"BLOCK": 1024})
        # a launch passes an int argument equal to 1 as a constant (biased variance, count 1)
        ones = {"BLOCK": 1024, "bessel_num": 1, "bessel_den": 1}
        _compile_for_sm90(forward.running_update_kernel, {"default": stats}, ones)


else:
    import triton
    import triton.language as tl

    from backends import triton_parity
    from backends.triton_parity import SLOPE, check, f64, params, run_and_compare
    from batchnorm import reference
    from batchnorm.backends.triton import INTERPRETED as BACKEND_INTERPRETED
    from batchnorm.backends.triton import TritonBackend, supports
    from batchnorm.backends.triton.backend import _MAX_GRID_Y
    from batchnorm.backends.triton.kernels_forward import _out
    from conftest import random_input

    DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
              "f64": torch.float64}  # fmt: skip
    ACTIVATIONS = reference.ACTIVATIONS

    #: name: (shape, memory format); NC* contiguous of rank 3/4/5, channels last, (N, C).
    LAYOUTS = {
        "ncl": ((3, 5, 7), None),
        "nchw": ((2, 6, 5, 3), None),
        "ncdhw": ((2, 3, 2, 3, 2), None),
        "nhwc": ((2, 6, 5, 3), torch.channels_last),
        "ndhwc": ((2, 3, 2, 3, 2), torch.channels_last_3d),
        "nc": ((9, 6), None),
    }

    #: The defaults (in the interpreter: one piece per channel block).
    DEFAULT = TritonBackend()
    #: Tiny tiles: on "nchw" (S = 15, C = 6) tiles of 4 channels x 8 values (a short last
    #: tile and channel block), 4 tiles per channel block in pieces of 3 (+1); on "nhwc"
    #: (M = 30 rows) 15 tiles of 2 rows in 5 pieces, merged 2 pieces at a time (2 + 2 + 1).
    SMALL = TritonBackend(tile_values=8, block_channels=4, tiles_per_piece=3,
                          merge_block_pieces=2, merge_block_channels=4)  # fmt: skip

    def make(layout, dtype, seed=0, mean=0.0):
        return triton_parity.make(*LAYOUTS[layout], dtype, seed=seed, mean=mean)

    # -- the cases -----------------------------------------------------------------------

    def test_kernels_are_interpreted():
        assert BACKEND_INTERPRETED

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    @pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_layouts_dtypes_activations(layout, dtype, activation):
        """Every layout, dtype and activation, with the full epilogue (affine + residual)."""
        x = make(layout, dtype)
        weight, bias = params(x.shape[1], dtype)
        residual = make(layout, dtype, seed=3)
        run_and_compare(DEFAULT, x, weight, bias, residual, activation)

    @pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
    @pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_epilogue_options(activation, residual, affine):
        """weight and bias None or not, residual or not; need_dpre both ways."""
        x = make("nchw", torch.float32, seed=4)
        weight, bias = params(x.shape[1], x.dtype, weight="weight" in affine, bias="bias" in affine)
        z = make("nchw", torch.float32, seed=5) if residual else None
        run_and_compare(DEFAULT, x, weight, bias, z, activation, need_dpre=residual)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_block_boundaries(layout, dtype):
        """Tiny tiles and pieces: partial tiles and channel blocks, Chan merges within and
        between pieces, several blocks of pieces in the merge kernels."""
        x = make(layout, dtype, seed=6, mean=2.0)
        weight, bias = params(x.shape[1], dtype, seed=2)
        z = make(layout, dtype, seed=8)
        run_and_compare(SMALL, x, weight, bias, z, "silu")

    def test_small_plan_crosses_the_boundaries_it_claims():
        """SMALL's tiling of "nchw" and "nhwc" is what the comment on SMALL says."""
        cf = SMALL._plan(make("nchw", torch.float32), "cf")
        assert (cf.block_c, cf.block_s, cf.tiles, cf.pieces) == (4, 8, 4, 2)
        assert cf.grid == (2, 2) and cf.S % cf.block_s and cf.C % cf.block_c
        cl = SMALL._plan(make("nhwc", torch.float32), "cl")
        assert (cl.block_n, cl.block_c, cl.tiles, cl.pieces) == (2, 4, 15, 5)
        assert cl.pieces % SMALL.merge_block_pieces

    def test_half_input_with_half_parameters():
        x = make("nhwc", torch.float16, seed=9)
        weight, bias = params(x.shape[1], torch.float32)
        z = make("nhwc", torch.float16, seed=10)
        run_and_compare(SMALL, x, weight.half(), bias.half(), z, "leaky_relu")

    @pytest.mark.parametrize("backend", [DEFAULT, SMALL], ids=["default", "small"])
    @pytest.mark.parametrize("layout", ["nchw", "nhwc"])
    def test_large_mean_is_stable_in_float32(layout, backend):
        """Mean 1e4, std about 1, float32: the variance keeps its digits, where
        E[x^2] - E[x]^2 in float32 would lose all of them (1e8 * 6e-8 = 6)."""
        x = make(layout, torch.float32, seed=11, mean=1e4)
        y, mean, var, invstd = backend.forward_train(x, None, None, None, 1e-5, "identity", SLOPE)
        m64, v64 = reference.batch_stats(f64(x))
        torch.testing.assert_close(var.double(), v64, rtol=1e-5, atol=0)
        torch.testing.assert_close(mean.double(), m64, rtol=0, atol=2e-3)  # an ulp of 1e4
        # float32 rounds x itself, and the mean, to 1e-3 (an ulp of 1e4): 1e-3 of a std
        expected = reference.forward(f64(x), m64, reference.invstd_of(v64, 1e-5))
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=3e-3)
        # with the same (float32) statistics, the epilogue and backward are exact to 1e-5
        check(y, reference.forward(f64(x), f64(mean), f64(invstd)), torch.float32, "y")
        weight, bias = params(x.shape[1], torch.float32)
        run_and_compare(backend, x, weight, bias, None, "relu", y_atol=3e-3 * weight.abs().max())

    def test_one_value_per_channel():
        """M = 1: var 0, invstd 1/sqrt(eps), xhat 0."""
        x = random_input((1, 5), torch.float32)
        run_and_compare(SMALL, x, *params(5, torch.float32), None, "elu")

    def test_strided_inputs_are_copied_into_the_nearer_layout():
        """x sliced (neither layout), dy and residual in the other layout than x."""
        base = random_input((3, 4, 6, 10), torch.float32, seed=12)
        x = base[:, :, :, ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        weight, bias = params(4, torch.float32)
        z = random_input((3, 4, 6, 5), torch.float32, seed=13).to(memory_format=torch.channels_last)
        run_and_compare(SMALL, x, weight, bias, z, "leaky_relu")
        x_cl = x.contiguous(memory_format=torch.channels_last)
        run_and_compare(SMALL, x_cl, weight, bias, z.contiguous(), "relu")

    def test_identity_dpre_is_dy():
        x = make("nchw", torch.float32)
        dy = random_input(tuple(x.shape), torch.float32, seed=14)
        _, mean, _, invstd = DEFAULT.forward_train(x, None, None, None, 1e-5, "identity", SLOPE)
        *_, dpre = DEFAULT.backward(dy, x, None, None, None, mean, invstd, True, "identity",
                                    SLOPE, True)  # fmt: skip
        assert torch.equal(dpre, dy)

    def test_eval_of_an_empty_batch():
        x = torch.empty(0, 3, 4)
        stats = torch.zeros(3)
        y = DEFAULT.forward_eval(x, None, None, None, stats, stats + 1, "relu", SLOPE)
        assert y.shape == x.shape

    def test_unknown_activation_is_refused():
        x = make("nc", torch.float32)
        with pytest.raises(ValueError, match="unknown activation"):
            DEFAULT.forward_train(x, None, None, None, 1e-5, "gelu", SLOPE)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
    @pytest.mark.parametrize("momentum", [0.1, 1.0])
    def test_running_update_matches_reference(dtype, momentum):
        g = torch.Generator().manual_seed(15)
        mean, var = torch.randn(7, generator=g).to(dtype), torch.rand(7, generator=g).to(dtype)
        rm, rv = torch.randn(7, generator=g).to(dtype), torch.rand(7, generator=g).to(dtype)
        rm2, rv2 = rm.clone(), rv.clone()
        for count, unbiased in [(5, True), (5, False), (1, True), (0, True), (3, True)]:
            DEFAULT.update_running_stats(rm, rv, mean, var, count, momentum, unbiased)
            reference.update_running_stats(rm2, rv2, mean, var, count, momentum, unbiased)
            check(rm, rm2.double(), dtype, "running_mean")
            check(rv, rv2.double(), dtype, "running_var")

    def test_running_update_of_tensors_it_cannot_write_goes_to_the_reference():
        mean, var = torch.randn(4), torch.rand(4)
        rm = torch.zeros(8)[::2]  # not contiguous
        rv = torch.ones(4)
        rm2, rv2 = rm.clone(), rv.clone()
        DEFAULT.update_running_stats(rm, rv, mean, var, 6, 0.25)
        reference.update_running_stats(rm2, rv2, mean, var, 6, 0.25)
        assert torch.allclose(rm, rm2) and torch.allclose(rv, rv2)

    @triton.jit
    def _convert_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + i, mask=i < n)
        tl.store(y_ptr + i, _out(v, y_ptr, True), mask=i < n)

    def test_bfloat16_rounding_by_hand_is_torchs():
        """kernels_forward._out (used under the interpreter) rounds float32 to bfloat16 bit for bit
        as torch does (to nearest even), specials and subnormals included."""
        g = torch.Generator().manual_seed(16)
        bits = torch.randint(-(2**31), 2**31, (2048,), generator=g, dtype=torch.int64)
        specials = [0x3F7FFFFF, 0x3F7F8000, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F800000,
                    0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x1, 0x80000001, 0xFFFF,
                    0x8000, 0x0]  # fmt: skip
        bits = torch.cat([bits, torch.tensor(specials, dtype=torch.int64)])
        x = torch.from_numpy((bits & 0xFFFFFFFF).numpy().astype("uint32").view("float32"))
        y = torch.empty(x.numel(), dtype=torch.bfloat16)
        _convert_kernel[(1,)](x, y, x.numel(), BLOCK=4096)
        expected = x.to(torch.bfloat16)
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(y), nan)
        assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))

    def test_supports():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert supports(torch.zeros(2, 3, dtype=dtype))  # any device when interpreted
        assert not supports(torch.zeros(2, 3, dtype=torch.float64))
        assert not supports(torch.zeros(2, 3, dtype=torch.int32))

    def test_pieces_fit_the_grid_limit():
        """However small the pieces asked for, the grid's second dimension stays legal."""
        x = torch.empty(1 << 20, 2, 128, device="meta")
        plan = TritonBackend(tile_values=128, tiles_per_piece=1)._plan(x, "cf")
        assert plan.pieces <= _MAX_GRID_Y
        assert plan.pieces * plan.tiles_per_piece >= plan.tiles
