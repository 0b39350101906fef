"""torch.func and forward-mode AD through every backend, against torch.nn.functional.

Each test runs once per registered backend (the ``backend`` fixture forces it, also on the
small inputs that the default dispatch would give ATen), so the Numba kernels' autograd
Function is what the transforms see; a backend that cannot serve a transform must hand the
call to one that can, never return a missing (None) tangent.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import batchnorm
import batchnorm.functional as BF
from conftest import assert_close

ACTIVATIONS = [None, "relu", "leaky_relu", "silu", "elu"]
SMALL = (5, 3, 2)  # small enough for Jacobians (30 x 30)
LARGE = (2048, 40)  # 81,920 values: the Numba kernels' size under the default dispatch


def torch_bn(x, weight, bias, residual=None, training=True, activation=None, stats=None):
    """The oracle: torch.nn.functional's batch norm, then the residual and the activation."""
    mean, var = stats if stats is not None else (None, None)
    y = F.batch_norm(x, mean, var, weight, bias, training)
    if residual is not None:
        y = y + residual
    return {
        None: lambda v: v,
        "relu": torch.relu,
        "leaky_relu": lambda v: F.leaky_relu(v, 0.01),
        "silu": F.silu,
        "elu": F.elu,
    }[activation](y)


def ours_bn(x, weight, bias, residual=None, training=True, activation=None, stats=None):
    mean, var = stats if stats is not None else (None, None)
    return BF.batch_norm(
        x, mean, var, weight, bias, training, activation=activation, residual=residual
    )


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    residual = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, weight, bias, residual


@pytest.mark.parametrize("shape", [SMALL, LARGE])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
def test_jvp_matches_torch(backend, shape, activation, training):
    x, weight, bias, residual = _inputs(shape)
    stats = (
        None
        if training
        else (
            torch.randn(shape[1], dtype=torch.float64),
            torch.rand(shape[1], dtype=torch.float64) + 0.5,
        )
    )
    tangents = tuple(torch.randn_like(t) for t in (x, weight, bias, residual))

    def call(fn):
        return lambda x, w, b, r: fn(x, w, b, r, training, activation, stats)

    out, tangent = jvp(call(ours_bn), (x, weight, bias, residual), tangents)
    expected, expected_tangent = jvp(call(torch_bn), (x, weight, bias, residual), tangents)
    assert_close(out, expected)
    assert_close(tangent, expected_tangent)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_forward_ad_dual_tensors_give_the_tangent(backend, activation):
    x, weight, bias, _ = _inputs(LARGE)
    dx = torch.randn_like(x)
    with forward_ad.dual_level():
        y = ours_bn(forward_ad.make_dual(x, dx), weight, bias, activation=activation)
        tangent = forward_ad.unpack_dual(y).tangent
    assert tangent is not None, "a silent None tangent"
    _, expected = jvp(lambda x: torch_bn(x, weight, bias, activation=activation), (x,), (dx,))
    assert_close(tangent, expected)


def test_running_statistics_with_a_tangent_are_refused(backend):
    x, weight, bias, _ = _inputs(LARGE)
    mean, var = (
        torch.zeros(LARGE[1], dtype=torch.float64),
        torch.ones(LARGE[1], dtype=torch.float64),
    )
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="forward grad"):
        dual_mean = forward_ad.make_dual(mean, torch.ones_like(mean))
        BF.batch_norm(forward_ad.make_dual(x, torch.ones_like(x)), dual_mean, var, weight, bias)


@pytest.mark.parametrize("in_dims", [(0, None, None), (1, None, None), (0, 0, 0), (None, 0, None)])
def test_vmap_matches_a_loop_of_torch_calls(backend, in_dims):
    """vmap over the input's dims or the parameters: each slice is its own batch norm."""
    batch = 3
    x, weight, bias, _ = _inputs(LARGE)
    args = []
    for t, dim in zip((x, weight, bias), in_dims, strict=True):
        args.append(t if dim is None else torch.stack([t * (i + 1) for i in range(batch)], dim))
    result = vmap(lambda x, w, b: ours_bn(x, w, b, activation="relu"), in_dims)(*args)
    for i in range(batch):
        piece = [t if d is None else t.select(d, i) for t, d in zip(args, in_dims, strict=True)]
        assert_close(result[i], torch_bn(*piece, activation="relu"))


@pytest.mark.parametrize("activation", [None, "silu"])
def test_jacobians_and_hessian_match_torch(backend, activation):
    x, weight, bias, residual = _inputs(SMALL)

    def ours(x):
        return ours_bn(x, weight, bias, residual, activation=activation)

    def theirs(x):
        return torch_bn(x, weight, bias, residual, activation=activation)

    assert_close(jacrev(ours)(x), jacrev(theirs)(x))
    assert_close(jacfwd(ours)(x), jacfwd(theirs)(x))
    expected_hessian = hessian(lambda x: theirs(x).pow(3).sum())(x)
    assert_close(hessian(lambda x: ours(x).pow(3).sum())(x), expected_hessian)  # fwd-over-rev
    assert_close(jacrev(jacrev(lambda x: ours(x).pow(3).sum()))(x), expected_hessian)
    # grad of vmap, and vmap of grad (per-sample gradients of a layer's parameters)
    xs = torch.stack([x, 2 * x])
    assert_close(grad(lambda xs: vmap(ours)(xs).pow(2).sum())(xs),
                 grad(lambda xs: vmap(theirs)(xs).pow(2).sum())(xs))  # fmt: skip


def test_per_sample_gradients_of_a_layer_match_torch(backend):
    ours, theirs = (
        batchnorm.BatchNorm1d(40).double().eval(),
        torch.nn.BatchNorm1d(40).double().eval(),
    )
    for layer in (ours, theirs):
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
            layer.weight.uniform_(0.5, 2)
    theirs.load_state_dict(ours.state_dict())
    samples = torch.randn(6, 2048, 40, dtype=torch.float64)

    def per_sample(layer):
        params = {k: v.detach() for k, v in layer.named_parameters()}
        buffers = {k: v.detach() for k, v in layer.named_buffers()}

        def loss(params, x):
            return functional_call(layer, (params, buffers), (x,)).pow(2).sum()

        return vmap(grad(loss), (None, 0))(params, samples)

    got, expected = per_sample(ours), per_sample(theirs)
    for name in expected:
        assert_close(got[name], expected[name])


@pytest.mark.parametrize("grad_mode", [True, False])
def test_vmap_over_stacked_layers_trains_as_torch(backend, grad_mode):
    """Model ensembling (torch.func.stack_module_state, functional_call, vmap) of layers in
    training: outputs, running statistics and parameter gradients as torch.nn's. float32
    (N, C) inputs at mean 100 take ATen's shifted path under the default dispatch, whose
    running-mean correction must work on vmap's wrapped buffers."""
    from torch.func import stack_module_state

    def ensemble(kind):
        torch.manual_seed(0)
        layers = [kind(8) for _ in range(3)]
        params, buffers = stack_module_state(layers)
        template = kind(8).to("meta")
        x, dy = torch.randn(3, 16, 8) + 100, torch.randn(3, 16, 8)
        with torch.set_grad_enabled(grad_mode):
            y = vmap(lambda p, b, x: functional_call(template, (p, b), (x,)))(params, buffers, x)
            grads = torch.autograd.grad(y, list(params.values()), dy) if grad_mode else ()
        return [y, *grads, buffers["running_mean"], buffers["running_var"]]

    for got, expected in zip(ensemble(batchnorm.BatchNorm1d), ensemble(torch.nn.BatchNorm1d),
                             strict=True):  # fmt: skip
        assert_close(got, expected, rtol=1e-4, atol=1e-4)  # float32 at mean 100


@pytest.mark.parametrize("shape", [(16, 8), (300, 8)])  # ATen's path and the kernels'
def test_vmap_of_a_training_layer_with_unbatched_statistics_is_refused(backend, shape):
    """vmap over the input of a training layer whose running statistics are not batched
    raises, as torch.nn's does, with a hint; after replace_all_batch_norm_modules_ (no
    running statistics) the layer runs and gives torch.nn's output."""
    from torch.func import replace_all_batch_norm_modules_

    x = torch.randn(3, *shape) + 100
    with pytest.raises(RuntimeError, match="running_mean"):
        vmap(batchnorm.BatchNorm1d(8))(x)
    ours, theirs = batchnorm.BatchNorm1d(8), torch.nn.BatchNorm1d(8)
    replace_all_batch_norm_modules_(ours), replace_all_batch_norm_modules_(theirs)
    assert_close(vmap(ours)(x), vmap(theirs)(x), rtol=1e-4, atol=1e-4)  # float32 at mean 100


@pytest.mark.parametrize("activation", [None, "silu", "elu"])
def test_gradcheck_with_batched_grads_and_forward_ad(backend, activation):
    x, weight, bias, residual = (t.requires_grad_() for t in _inputs((4, 3, 2)))
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: ours_bn(x, w, b, r, activation=activation),
        (x, weight, bias, residual),
        check_batched_grad=True,
        check_forward_ad=True,
        check_backward_ad=True,
        check_undefined_grad=True,
    )


def test_in_place_layer_under_jvp_and_vmap():
    """InPlaceBatchNormAct saves only its output; forward-mode AD uses its input anyway.
    (Batch statistics without running ones: updating buffers under a transform fails in
    torch.nn too.)"""
    options = {"activation": "leaky_relu", "track_running_stats": False}
    layer = batchnorm.InPlaceBatchNormAct1d(40, **options).double()
    reference = batchnorm.BatchNormAct1d(40, **options).double()
    x = torch.randn(LARGE, dtype=torch.float64)
    dx = torch.randn_like(x)
    out, tangent = jvp(layer, (x,), (dx,))
    expected, expected_tangent = jvp(reference, (x,), (dx,))
    assert_close(out, expected)
    assert_close(tangent, expected_tangent)
    xs = torch.stack([x, -x])
    assert_close(vmap(layer)(xs), vmap(reference)(xs))
