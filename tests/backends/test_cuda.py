"""CUDA: our layers on GPU tensors match torch.nn on the same GPU, through every backend
that computes on CUDA (the default dispatch, and each one forced).

These run where a GPU is present (the project's GPU check runs them on an H100/H200);
on CPU-only machines they are skipped — there is nothing to compare with there.
"""

import contextlib

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import ops
from batchnorm.backends import Call
from conftest import assert_close, random_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HALF = (torch.float16, torch.bfloat16)


def _train_steps(module, dtype, channels_last, device, compute_dtype=None):
    """Outputs and gradients of 3 training steps and one eval step, as float64; inputs are
    rounded to ``dtype``, then given to the module in ``compute_dtype`` (default: dtype)."""
    compute_dtype = compute_dtype or dtype
    results = []
    for step in range(4):
        module.train(step < 3)
        x = random_input((16, 8, 6, 5), dtype, channels_last, seed=step, mean=step)
        dy = random_input((16, 8, 6, 5), dtype, channels_last, seed=9 + step)
        x, dy = x.to(device, compute_dtype), dy.to(device, compute_dtype)
        x.requires_grad_()
        y = module(x)
        y.backward(dy)
        results += [y, x.grad, module.weight.grad.clone(), module.bias.grad.clone()]
        module.zero_grad()
    results += [module.running_mean, module.running_var]
    return [r.detach().double() for r in results]


def test_default_dispatch_on_cuda():
    """cuDNN (ATen) for every call it takes, fused epilogues included, but training on
    large NCHW planes; the Triton kernels for those and for what ATen cannot compute
    (backends.aten.cuda_kernels_faster has the measurements)."""
    if "triton" not in ops.available_backends("cuda"):
        # an environment guard: the rule under test chooses between cuDNN and Triton, and
        # without triton there is no choice to check (the other tests here cover ATen)
        pytest.skip("triton is not installed: every CUDA call goes to ATen or the reference")

    def chosen(x, training=True, **options):
        return ops.select(Call(x, training, options.pop("activation", "identity"), 0.01,
                               options.pop("residual", False), **options)).name  # fmt: skip

    small = torch.empty(8, 16, 4, 4, device="cuda")
    assert chosen(small) == chosen(small, False) == "aten"
    assert chosen(small, activation="relu", residual=True) == "aten"
    assert chosen(small, keep_output_only=True) == "triton"  # InPlace-ABN
    assert chosen(small, unbiased_running_var=False) == "triton"
    assert ops.select_kernels(small).name == "triton"  # SyncBatchNorm, variants
    stem = torch.empty(128, 64, 112, 112, device="cuda", dtype=torch.bfloat16)
    assert chosen(stem) == chosen(stem, activation="relu", residual=True) == "triton"
    assert chosen(stem, False) == "aten"
    assert chosen(stem.view(128, 64, -1)) == "triton"  # (N, C, L), L of a large plane
    assert chosen(torch.empty_like(stem, memory_format=torch.channels_last)) == "aten"


def test_plain_calls_on_cuda_skip_the_general_path(monkeypatch):
    """An eval call of a plain layer on CUDA goes straight to torch.batch_norm, as on CPU:
    torch.nn's output to the bit, without the general path's Python; a training call that
    the dispatch gives ATen skips it too."""
    import batchnorm.nn.base as base

    calls = []
    general = base._batch_norm
    monkeypatch.setattr(base, "_batch_norm", lambda *a, **k: calls.append(1) or general(*a, **k))
    theirs = nn.BatchNorm2d(8, device="cuda")
    ours = batchnorm.BatchNorm2d(8, device="cuda")
    with torch.no_grad():
        theirs.running_mean.normal_(), theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = random_input((16, 8, 6, 5), seed=3).cuda()
    assert torch.equal(ours.eval()(x), theirs.eval()(x))
    assert not calls
    torch.testing.assert_close(ours.train()(x), theirs.train()(x))
    assert not calls


@pytest.mark.parametrize("backend", [None, *ops.available_backends("cuda")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_torch(dtype, channels_last, backend):
    """float32/float64: ours equals torch.nn on the GPU. float16/bfloat16: both round, so
    both are compared with torch.nn run in float64 on the same (rounded) inputs, and ours
    must be no less accurate than torch's own half-precision kernel (within 2x)."""
    device = "cuda"
    theirs = nn.BatchNorm2d(8, device=device, dtype=dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = batchnorm.BatchNorm2d(8, device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    oracle = nn.BatchNorm2d(8, device=device, dtype=torch.float64)
    oracle.load_state_dict(theirs.state_dict())

    if backend is None:
        ours_results = _train_steps(ours, dtype, channels_last, device)
    else:
        with ops.use_backend(backend, lenient=True):
            ours_results = _train_steps(ours, dtype, channels_last, device)
    theirs_results = _train_steps(theirs, dtype, channels_last, device)
    if dtype not in HALF:
        for a, b in zip(ours_results, theirs_results, strict=True):
            assert_close(a, b, dtype)  # the suite's tolerances: 1e-10 / 1e-5 relative
        return
    oracle_results = _train_steps(oracle, dtype, channels_last, device, torch.float64)
    for a, b, truth in zip(ours_results, theirs_results, oracle_results, strict=True):
        ours_error = (a - truth).abs().max().item()
        theirs_error = (b - truth).abs().max().item()
        scale = truth.abs().max().item()
        assert ours_error <= 2 * theirs_error + 1e-3 * scale, (ours_error, theirs_error)


def test_cuda_variants_and_compile():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        batchnorm.BatchNorm2d(8),
        batchnorm.BatchRenorm2d(8, rmax=1.5, dmax=0.5),
        batchnorm.GhostBatchNorm2d(8, virtual_batch_size=4),
        batchnorm.InPlaceBatchNormAct2d(8, activation="leaky_relu"),
    ).cuda()
    x = torch.randn(12, 3, 10, 10, device="cuda")
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert eager.device.type == "cuda" and torch.isfinite(eager).all()


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_cuda_autocast_matches_torch(dtype, activation, backend):
    """Under torch.autocast a conv gives BN a half input with float32 parameters: the
    default dispatch (cuDNN) and the Triton kernels match torch.nn to half's rounding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, padding=1).cuda()
    theirs, ours = (
        nn.BatchNorm2d(16).cuda(),
        batchnorm.BatchNormAct2d(16, activation=activation).cuda(),
    )
    act = {None: nn.Identity(), "relu": nn.ReLU(), "silu": nn.SiLU()}[activation]
    x = torch.randn(32, 3, 28, 28, device="cuda").to(memory_format=torch.channels_last)
    outputs = []
    forced = ops.use_backend(backend, lenient=True) if backend else contextlib.nullcontext()
    for layer in (nn.Sequential(conv, ours), nn.Sequential(conv, theirs, act)):
        with forced, torch.autocast("cuda", dtype=dtype):
            y = layer(x)
        y.float().square().mean().backward()
        outputs.append(y)
    assert outputs[0].dtype == outputs[1].dtype == dtype
    torch.testing.assert_close(outputs[0].float(), outputs[1].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-2, atol=1e-3)
