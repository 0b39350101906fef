"""Parity of batchnorm.BatchNorm{1,2,3}d with torch.nn over training steps and eval."""

import io

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import ops
from batchnorm.backends import Call, cpp_cpu
from conftest import assert_close, random_input

SHAPES = {
    "NC": (16, 6),
    "NCL": (4, 6, 9),
    "NCHW": (4, 6, 5, 7),
    "NCDHW": (2, 6, 3, 4, 5),
}
PAIRS = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}
CONFIGS = {
    "default": {},
    "no_affine": {"affine": False},
    "no_bias": {"bias": False},
    "no_tracking": {"track_running_stats": False},
    "cumulative": {"momentum": None},
    "momentum_0.3": {"momentum": 0.3, "eps": 1e-3},
}


def make_pair(shape, dtype, **config):
    suffix = PAIRS[len(shape)]
    theirs = torch_bn(getattr(nn, f"BatchNorm{suffix}"), shape[1], dtype=dtype, **config)
    ours = getattr(batchnorm, f"BatchNorm{suffix}")(shape[1], dtype=dtype, **config)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def torch_bn(kind, num_features, bias=True, **options):
    """torch.nn's BN; ``bias=False`` reached its constructor in 2.13, so emulate it before."""
    bn = kind(num_features, **options)
    if not bias and bn.bias is not None:
        bn.register_parameter("bias", None)
    return bn


def run_step(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    return y.detach(), grads


def assert_same_state(ours, theirs, dtype):
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key, value in theirs_state.items():
        if value.is_floating_point():
            assert_close(ours_state[key], value, dtype)
        else:
            assert torch.equal(ours_state[key], value), key


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shape,channels_last",
    [(s, False) for s in SHAPES.values()] + [(SHAPES["NCHW"], True), (SHAPES["NCDHW"], True)],
    ids=[*SHAPES, "NHWC", "NDHWC"],
)
def test_training_then_eval_matches_torch(backend, shape, channels_last, dtype, config):
    theirs, ours = make_pair(shape, dtype, **config)
    for step in range(3):
        x = random_input(shape, dtype, channels_last, seed=step, mean=step)
        dy = random_input(shape, dtype, channels_last, seed=100 + step)
        y_theirs, g_theirs = run_step(theirs, x, dy)
        y_ours, g_ours = run_step(ours, x, dy)
        assert_close(y_ours, y_theirs)
        for a, b in zip(g_ours, g_theirs, strict=True):
            assert_close(a, b)
        assert_same_state(ours, theirs, dtype)
    if channels_last:
        assert y_ours.is_contiguous(memory_format=torch.channels_last if len(shape) == 4
                                    else torch.channels_last_3d)  # fmt: skip
    theirs.eval()
    ours.eval()
    x = random_input(shape, dtype, channels_last, seed=7, mean=1.0)
    dy = random_input(shape, dtype, channels_last, seed=8)
    y_theirs, g_theirs = run_step(theirs, x, dy)
    y_ours, g_ours = run_step(ours, x, dy)
    assert_close(y_ours, y_theirs)
    for a, b in zip(g_ours, g_theirs, strict=True):
        assert_close(a, b)
    assert_same_state(ours, theirs, dtype)


def test_state_dict_round_trip_with_torch():
    theirs, _ = make_pair((8, 4, 3, 3), torch.float32)
    for _ in range(2):
        theirs(random_input((8, 4, 3, 3)))
    theirs.eval()
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = batchnorm.BatchNorm2d(4)
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    ours.eval()
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    back.eval()
    x = random_input((2, 4, 3, 3), seed=3)
    assert torch.equal(ours(x), theirs(x)) or torch.allclose(ours(x), theirs(x), 1e-6, 1e-6)
    assert torch.equal(back(x), theirs(x))


def test_old_checkpoint_without_num_batches_tracked_loads():
    theirs = nn.BatchNorm1d(3)
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # as saved by torch before the counter existed
    ours = batchnorm.BatchNorm1d(3)
    ours.load_state_dict(state)  # torch fills the counter in, so must we
    assert ours.num_batches_tracked.item() == 0


def test_same_constructor_signature_and_repr():
    ours = batchnorm.BatchNorm2d(8, 1e-3, 0.2, affine=True, track_running_stats=True, bias=False)
    theirs = torch_bn(nn.BatchNorm2d, 8, eps=1e-3, momentum=0.2, bias=False)
    assert ours.extra_repr() == theirs.extra_repr()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("training", [True, False])
def test_zero_size_batch_matches_torch(training):
    theirs, ours = make_pair((0, 3, 4, 4), torch.float32)
    for m in (theirs, ours):
        m.running_mean.fill_(2.0)
        m.running_var.fill_(3.0)
        m.train(training)
    x_theirs = torch.zeros(0, 3, 4, 4, requires_grad=True)
    x_ours = torch.zeros(0, 3, 4, 4, requires_grad=True)
    y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
    assert y_ours.shape == y_theirs.shape == (0, 3, 4, 4)
    y_theirs.sum().backward()
    y_ours.sum().backward()
    assert x_ours.grad.shape == x_theirs.grad.shape
    assert torch.equal(ours.weight.grad, theirs.weight.grad)
    assert_same_state(ours, theirs, torch.float32)


def test_half_precision_matches_torch():
    for dtype in (torch.bfloat16, torch.float16):
        theirs, ours = make_pair((16, 4, 3, 3), dtype)
        x = random_input((16, 4, 3, 3), dtype, seed=1)
        assert_close(ours(x).float(), theirs(x).float(), rtol=1e-2, atol=1e-2)
        assert_close(ours.running_var.float(), theirs.running_var.float(), rtol=1e-2, atol=1e-2)


#: Calls that count their training step on each path of a layer's call: the C++ node's
#: count_step ((N, C) float32), ATen's and the Numba kernels' (counted in _layer_call:
#: float16 on a small layer, NCHW float32 above the node's planes_up_to); momentum None
#: counts in _momentum_factor; without tracked statistics no step is counted.
STEP_CASES = {
    "cpp node": ((16, 6), torch.float32, {}),
    "aten (float16)": ((16, 6), torch.float16, {}),
    "numba (large NCHW)": ((2, 4, 8, 8200), torch.float32, {}),
    "cumulative average": ((16, 6), torch.float32, {"momentum": None}),
    "untracked": ((16, 6), torch.float32, {"track_running_stats": False}),
}


@pytest.mark.parametrize("general_path", [False, True], ids=["usual", "general path"])
@pytest.mark.parametrize("case", STEP_CASES)
def test_training_steps_are_counted_once_as_torch_counts_them(case, general_path, monkeypatch):
    """num_batches_tracked goes up by one a training step (and its version counter, as
    torch.nn's in-place add_ bumps it), not in eval, on the usual call's every path and on
    the general one (_layer_call declining): as torch.nn's, as are the running statistics."""
    from batchnorm.nn import base

    shape, dtype, config = STEP_CASES[case]
    theirs, ours = make_pair(shape, torch.float32, **config)
    if general_path:
        monkeypatch.setattr(base, "_layer_call", lambda *args: None)
    x = random_input(shape, torch.float32, seed=5).to(dtype)
    for step, mode in enumerate(["train", "train", "eval", "train"]):
        versions = []
        for m in (theirs, ours):
            m.train(mode == "train")
            count = m.num_batches_tracked
            before = None if count is None else count._version
            m(x)
            versions.append(None if count is None else count._version - before)
        assert versions[0] == versions[1], (step, versions)
        if theirs.num_batches_tracked is not None:
            assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked), step
    if theirs.running_mean is not None:
        assert_close(ours.running_mean, theirs.running_mean, dtype)
        assert_close(ours.running_var, theirs.running_var, dtype)


class _Doubled(nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("shape", [(16, 6), (4, 6, 17, 17)], ids=["aten", "kernels"])
def test_parametrized_parameters_and_buffers_are_used(shape):
    """torch.nn.utils.parametrize moves a parameter (or buffer) out of the module's dicts
    and puts a property in its place: the layer must compute with the parametrized value,
    as torch.nn's does."""
    from torch.nn.utils import parametrize

    theirs, ours = make_pair(shape, torch.float32, momentum=None)
    for m in (theirs, ours):
        parametrize.register_parametrization(m, "weight", _Doubled())
        parametrize.register_parametrization(m, "running_var", _Doubled())
    x = random_input(shape, torch.float32, seed=3)
    dy = random_input(shape, torch.float32, seed=4)
    (y_theirs, g_theirs), (y_ours, g_ours) = run_step(theirs, x, dy), run_step(ours, x, dy)
    assert_close(y_ours, y_theirs, torch.float32)
    for ours_grad, theirs_grad in zip(g_ours, g_theirs, strict=True):
        assert_close(ours_grad, theirs_grad, torch.float32)
    for m in (theirs, ours):
        m.eval()
    assert_close(ours(x), theirs(x), torch.float32)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


class _NoGradient(torch.autograd.Function):
    """y -> y whose backward gives no gradient (None): the layer before it gets none."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        return None


@pytest.mark.parametrize("channels_last", [False, True])
def test_an_output_without_gradient_leaves_the_parameters_without_one(backend, channels_last):
    """As torch.nn's: when the layer's output gets no gradient, its parameters' .grad stay
    None (not zeros) and the input's gradient is only what reaches it otherwise."""
    shape = (4, 6, 5, 7)
    grads = []
    for layer in make_pair(shape, torch.float32):
        x = random_input(shape, channels_last=channels_last).requires_grad_()
        (_NoGradient.apply(layer(x)).sum() + x.sum()).backward()
        grads.append((x.grad, layer.weight.grad, layer.bias.grad))
    (x_theirs, w_theirs, b_theirs), (x_ours, w_ours, b_ours) = grads
    assert w_theirs is None and b_theirs is None
    assert w_ours is None and b_ours is None
    assert_close(x_ours, x_theirs)


def test_inplace_abn_output_without_gradient_leaves_the_parameters_without_one(backend):
    layer = batchnorm.InPlaceBatchNormAct2d(6, activation="leaky_relu")
    x = random_input((4, 6, 5, 7)).requires_grad_()
    (_NoGradient.apply(layer(x)).sum() + x.sum()).backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.fixture
def general_path_calls(monkeypatch):
    """Counts the calls that take the general path (functional._batch_norm) from a layer."""
    import batchnorm.nn.base as base

    calls = []
    general = base._batch_norm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return general(*args, **kwargs)

    monkeypatch.setattr(base, "_batch_norm", counted)
    return calls


@pytest.mark.auto_dispatch
@pytest.mark.parametrize(
    "shape, channels_last",
    [((100, 128), False), ((4, 6, 5, 7), False), ((4, 6, 5, 7), True), ((2, 6, 3, 4, 5), True)],
)
def test_plain_eval_skips_the_general_path_and_matches_torch(
    shape, channels_last, general_path_calls
):
    """A plain layer in eval mode skips the general path (its Python is a quarter of a small
    call). On the C++ backend (where it builds; NCHW here with a graph, small enough for its
    node), which computes (x - mean) * invstd * weight + bias where ATen computes x * a + b,
    the same as torch.nn to float32 rounding, gradients included; on ATen (NCHW where it
    does not build), torch.nn's output exactly."""
    theirs, ours = make_pair(shape, torch.float32)
    theirs(random_input(shape, seed=1))  # running statistics of its own, then the same in ours
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    x = random_input(shape, channels_last=channels_last).requires_grad_()
    call = Call(x, False, "identity", 0.01, False, False, True, ours.weight, ours.bias,
                ours.running_mean, ours.running_var)  # fmt: skip
    backend = ops.select(call).name
    assert backend == "cpp_cpu" or (backend == "aten" and cpp_cpu.extension() is None)
    general_path_calls.clear()
    y_ours, y_theirs = ours(x), theirs(x)
    assert general_path_calls == []
    assert y_ours.stride() == y_theirs.stride()
    dy = torch.randn_like(y_ours)
    grads = torch.autograd.grad(y_ours, (x, ours.weight), dy)
    expected = torch.autograd.grad(y_theirs, (x, theirs.weight), dy)
    if backend == "aten":
        assert torch.equal(y_ours, y_theirs)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))
    else:
        assert_close(y_ours, y_theirs)
        for g, e in zip(grads, expected, strict=True):
            assert_close(g, e)


@pytest.mark.auto_dispatch
@pytest.mark.parametrize("training", [False, True])
def test_only_unusual_layer_calls_go_the_general_way(training, general_path_calls):
    """A layer's usual call goes from its own checks straight to the dispatch's pick, on ATen
    or the kernels, fused activation and residual included; every other call takes the
    general path (which checks, dispatches and raises the errors), with its result."""
    shape = (8, 6, 4, 4)
    x = random_input(shape)
    long_rows = random_input((8, 6, 8, 8), channels_last=True)  # 512 rows: the kernels

    def general_calls(layer, input=x, **kwargs):
        layer.train(training)
        general_path_calls.clear()
        y = layer(input, **kwargs)
        assert y.shape == input.shape
        return len(general_path_calls)

    def raises_on_the_general_path(layer, **kwargs):
        with pytest.raises(TypeError, match="residual has dtype"):
            general_calls(layer, **kwargs)
        return len(general_path_calls)

    plain = batchnorm.BatchNorm2d(6)
    usual = {
        "plain": lambda: general_calls(plain),
        "residual": lambda: general_calls(batchnorm.BatchNorm2d(6), residual=x),
        "activation": lambda: general_calls(batchnorm.BatchNormAct2d(6, activation="silu")),
        "biased running var": lambda: general_calls(
            batchnorm.BatchNorm2d(6, unbiased_running_var=False)
        ),
        "size-1 dimension": lambda: general_calls(plain, random_input((1, 6, 4, 4))),
        "the kernels' rows": lambda: general_calls(plain, long_rows),
        "a forced kernel backend": lambda: _forced("numba", general_calls, plain),
        # a half input with float32 parameters: torch.autocast's case
        "bfloat16 input": lambda: general_calls(plain, x.bfloat16()),
    }
    unusual = {
        "a weight that is not contiguous": lambda: general_calls(_strided_weight(plain)),
        "forward-mode AD": lambda: _dual(general_calls, plain),
        "output-only backward": lambda: general_calls(batchnorm.InPlaceBatchNormAct2d(6)),
        "residual of another dtype": lambda: raises_on_the_general_path(plain, residual=x.double()),
    }
    if training:
        usual["no running statistics"] = lambda: general_calls(
            batchnorm.BatchNorm2d(6, track_running_stats=False)
        )
    else:  # the batch's statistics in eval: torch.nn's rule, in the general path
        unusual["no running statistics"] = lambda: general_calls(
            batchnorm.BatchNorm2d(6, track_running_stats=False)
        )
    for name, case in usual.items():
        assert case() == 0, name
    for name, case in unusual.items():
        assert case() == 1, name
    # parameters of mixed dtypes are not usual
    half_stats = torch.zeros(6, dtype=torch.bfloat16), torch.ones(6, dtype=torch.bfloat16)
    call = Call(x.bfloat16(), training, "identity", 0.0, False, False, True, torch.ones(6), None,
                *half_stats)  # fmt: skip
    assert batchnorm.functional._layer_call(call) is None
    if training:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            batchnorm.BatchNorm1d(6)(torch.randn(1, 6))


#: Inputs whose calls go to ATen ((100, 128), the small ones) and to the kernels (float32 with
#: more than ATEN_MAX_ROWS rows per channel, or more than ATEN_BELOW_NUMEL values).
LAYER_CALL_INPUTS = [
    ((100, 128), False), ((4, 6, 5, 7), True), ((8, 6, 5, 7), False),
    ((300, 16), False), ((8, 4, 12, 12), True), ((8, 16, 32, 32), False),
]  # fmt: skip


@pytest.mark.auto_dispatch
@pytest.mark.parametrize("shape, channels_last", LAYER_CALL_INPUTS)
@pytest.mark.parametrize(
    "dtype, x_dtype",
    [(torch.float32,) * 2, (torch.float64,) * 2, (torch.float32, torch.bfloat16)],
)  # fmt: skip
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("fused", [False, True])
def test_training_layer_calls_give_what_the_general_path_gives(
    shape, channels_last, dtype, x_dtype, config, fused, general_path_calls, monkeypatch
):
    """A layer's usual training call skips the general path and gives its output,
    gradients, running statistics and step count to the bit, over two steps: on ATen (the
    shift of float32 (N, C) and channels-last inputs included) and on the kernels, plain and
    with a fused activation and residual, in every configuration (no running statistics,
    cumulative average, no affine, ...)."""
    import copy

    import batchnorm.nn.base as base

    _, layer = make_pair(shape, dtype, **CONFIGS[config])
    if fused:
        plain = layer
        layer = getattr(batchnorm, f"BatchNormAct{PAIRS[len(shape)]}")(
            shape[1], dtype=dtype, activation="silu", **CONFIGS[config]
        )
        layer.load_state_dict(plain.state_dict())
    twin = copy.deepcopy(layer)
    x = random_input(shape, x_dtype, channels_last=channels_last, mean=3.0).requires_grad_()
    residual = random_input(shape, x_dtype, channels_last=channels_last, seed=2)
    residual = residual.requires_grad_() if fused else None

    def results(layer):
        out = []
        inputs = [x] if residual is None else [x, residual]
        for _ in range(2):
            y = layer(x, residual)
            grads = torch.autograd.grad(y, [*inputs, *layer.parameters()], torch.ones_like(y))
            out += [y, *grads]
        return out + list(layer.buffers())

    general_path_calls.clear()
    usual = results(layer)
    assert general_path_calls == []
    monkeypatch.setattr(base, "_layer_call", lambda *args: None)
    general = results(twin)
    assert len(general_path_calls) == 2
    for got, expected in zip(usual, general, strict=True):
        assert torch.equal(got, expected) and got.stride() == expected.stride()


def _strided_weight(layer):
    copy = batchnorm.BatchNorm2d(6)
    copy.load_state_dict(layer.state_dict())
    with torch.no_grad():
        copy.weight = nn.Parameter(torch.ones(12)[::2])
    return copy


def _forced(name, evaluated, layer):
    with batchnorm.ops.use_backend(name):
        return evaluated(layer)


def _dual(evaluated, layer):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        x = random_input((8, 6, 4, 4))
        return evaluated(layer, fwAD.make_dual(x, torch.ones_like(x)))


@pytest.mark.auto_dispatch
@pytest.mark.parametrize("shape, channels_last", [((100, 128), False), ((4, 6, 5, 7), True)])
@pytest.mark.parametrize(
    "dtype, x_dtype",
    [(torch.float32,) * 2, (torch.float64,) * 2, (torch.float32, torch.bfloat16),
     (torch.float32, torch.float16)],  # half inputs: float32 parameters, as under autocast
)  # fmt: skip
@pytest.mark.parametrize("config", ["default", "no_affine", "no_bias", "momentum_0.3"])
@pytest.mark.parametrize("grad", [False, True])
def test_plain_eval_gives_what_the_general_path_gives(
    shape, channels_last, dtype, x_dtype, config, grad, general_path_calls, monkeypatch
):
    """The plain eval call and the general path's, on the same layer and input: the same
    output and gradients, to the bit, in every configuration that takes it."""
    import batchnorm.nn.base as base

    _, layer = make_pair(shape, dtype, **CONFIGS[config])
    layer(random_input(shape, dtype, seed=1, mean=3.0))  # running statistics of its own
    layer.eval()
    x = random_input(shape, x_dtype, channels_last=channels_last).requires_grad_(grad)
    params = [p for p in (x, layer.weight, layer.bias) if p is not None and grad]

    def results():
        y = layer(x)
        dy = torch.ones_like(y)
        return [y.detach(), *(torch.autograd.grad(y, params, dy) if grad else ())]

    general_path_calls.clear()
    plain = results()
    assert general_path_calls == []
    monkeypatch.setattr(base, "_layer_call", lambda *args: None)
    general = results()
    assert len(general_path_calls) == 1
    for got, expected in zip(plain, general, strict=True):
        assert torch.equal(got, expected) and got.stride() == expected.stride()
