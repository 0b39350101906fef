"""Every bad input raises the documented error type with expected-vs-given and a hint."""

import pytest
import torch

import batchnorm
import batchnorm.functional as BF


def raises(error, *fragments):
    """pytest.raises that also checks the message names the given fragments."""
    return pytest.raises(error, match="(?s)" + ".*".join(map(_escape, fragments)))


def _escape(s):
    import re

    return re.escape(s)


def test_wrong_rank_names_layer_and_hint():
    with raises(ValueError, "BatchNorm2d(3)", "4-D", "got a 3-D input", "(8, 3, 5)", "BatchNorm1d"):
        batchnorm.BatchNorm2d(3)(torch.randn(8, 3, 5))
    with raises(ValueError, "BatchNorm1d(3)", "2-D or 3-D", "4-D", "BatchNorm2d"):
        batchnorm.BatchNorm1d(3)(torch.randn(8, 3, 5, 5))


def test_channel_mismatch():
    with raises(ValueError, "BatchNorm1d(3)", "expected 3 channels", "(8, 5)", "num_features"):
        batchnorm.BatchNorm1d(3)(torch.randn(8, 5))
    with raises(ValueError, "3 channels", "running_mean has shape (4,)"):
        BF.batch_norm(torch.randn(8, 3), torch.zeros(4), torch.ones(4))


def test_single_value_per_channel_in_training():
    with raises(ValueError, "BatchNorm1d(3)", "more than 1 value per channel", "(1, 3)", "eval"):
        batchnorm.BatchNorm1d(3)(torch.randn(1, 3))
    with raises(ValueError, "more than 1 value per channel", "(1, 3, 1, 1)"):
        batchnorm.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))
    bn = batchnorm.BatchNorm1d(3).eval()
    assert bn(torch.randn(1, 3)).shape == (1, 3)  # eval mode takes a single sample


def test_single_value_hint_recommends_only_what_works():
    with pytest.raises(ValueError) as info:
        batchnorm.BatchNorm1d(3)(torch.randn(1, 3))
    hint = str(info.value).partition("Hint:")[2]
    for remedy in ("model.eval()", "FrozenBatchNorm", "larger batches", "SyncBatchNorm"):
        assert remedy in hint
    assert "Ghost" not in hint  # GhostBatchNorm needs 2 values per channel too
    assert batchnorm.FrozenBatchNorm1d(3).train()(torch.randn(1, 3)).shape == (1, 3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_inputs(dtype):
    with raises(TypeError, "BatchNorm1d(3)", "floating-point", str(dtype), ".float()"):
        batchnorm.BatchNorm1d(3)(torch.ones(4, 3, dtype=dtype))


def test_dtype_mismatch():
    with raises(TypeError, "input has dtype torch.float64", "weight has dtype torch.float32"):
        batchnorm.BatchNorm1d(3)(torch.randn(4, 3, dtype=torch.float64))
    # float16/bfloat16 inputs may use float32 parameters, as in torch (mixed precision).
    assert batchnorm.BatchNorm1d(3)(torch.randn(4, 3).bfloat16()).dtype == torch.bfloat16


def test_device_mismatch():
    bn = batchnorm.BatchNorm1d(3, device="meta")
    with raises(ValueError, "input is on cpu", "is on meta", "same device"):
        bn(torch.randn(4, 3))


def test_eval_without_running_stats_functional():
    with raises(ValueError, "eval mode needs running_mean and running_var", "training=True"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_not_a_tensor_and_bad_num_features():
    with raises(TypeError, "expected a torch.Tensor", "list"):
        batchnorm.BatchNorm1d(3)([[1.0, 2.0, 3.0]])
    with raises(ValueError, "num_features must be a positive int", "0"):
        batchnorm.BatchNorm1d(0)


def test_bad_activation_and_residual():
    with raises(ValueError, "unknown activation 'tanh'", "relu"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=True, activation="tanh")
    with raises(ValueError, "residual must have the input's shape (4, 3)", "(4, 2)"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=True, residual=torch.ones(4, 2))


def test_rank_one_input_functional():
    with raises(ValueError, "at least 2 dimensions", "(3,)", "unsqueeze(0)"):
        BF.batch_norm(torch.randn(3), None, None, training=True)


# ---------------------------------------------------------------------------------------
# Found by differential fuzzing (issue P0): torch's rules, clear errors, no bare exceptions.


@pytest.mark.parametrize("eps, training", [(0.0, True), (-1.0, True), (-1.0, False)])
def test_eps_follows_torchs_rule(eps, training):
    x = torch.randn(6, 3)
    stats = (torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError):  # torch's own error type for this mistake
        torch.nn.functional.batch_norm(x, *stats, training=training, eps=eps)
    with raises(ValueError, "eps must be", f"got {eps}", "1e-5"):
        BF.batch_norm(x, *stats, training=training, eps=eps)
    with raises(ValueError, "BatchNorm1d(3)", "eps must be"):
        batchnorm.BatchNorm1d(3, eps=eps).train(training)(x)


def test_eps_zero_is_allowed_in_eval_as_in_torch():
    x = torch.randn(6, 3)
    expected = torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), eps=0.0)
    torch.testing.assert_close(BF.batch_norm(x, torch.zeros(3), torch.ones(3), eps=0.0), expected)


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_one_running_statistic_without_the_other_raises_in_training(given):
    stats = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    stats[{"running_mean": "running_var", "running_var": "running_mean"}[given]] = None
    with raises(ValueError, f"got {given} without"):
        BF.batch_norm(torch.randn(6, 3), stats["running_mean"], stats["running_var"], training=True)


def test_errors_torch_raises_as_runtime_error_are_runtime_errors_too():
    x = torch.randn(6, 3)
    for call in (
        lambda: BF.batch_norm(x, torch.zeros(4), torch.ones(4)),  # size mismatch
        lambda: BF.batch_norm(x, None, None, training=False),  # eval without statistics
        lambda: batchnorm.BatchNorm1d(4)(x),  # the layer's channel check
    ):
        with pytest.raises(RuntimeError):
            call()
        with pytest.raises(ValueError):
            call()
    with pytest.raises(TypeError) as caught:  # a dtype mismatch
        BF.batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3))
    assert isinstance(caught.value, RuntimeError)


def test_residual_dtype_is_checked():
    for x in (torch.randn(6, 3), torch.randn(300, 256)):
        with raises(TypeError, "residual has dtype torch.float64", "residual.to(torch.float32)"):
            BF.batch_norm(x, None, None, training=True, residual=x.double())


def test_forcing_a_backend_on_an_input_it_cannot_take_says_so():
    # the Numba kernels have no elu epilogue (elu goes to the reference)
    x = torch.randn(300, 256, dtype=torch.float16)
    with batchnorm.ops.use_backend("numba"), raises(ValueError, "'numba'", "'elu'"):
        BF.batch_norm(x, None, None, training=True, activation="elu")


def test_numpy_integers_are_channel_counts_as_in_torch():
    np = pytest.importorskip("numpy")
    layer = batchnorm.BatchNorm2d(np.int64(4))
    assert layer.num_features == 4 and type(layer.num_features) is int
    assert batchnorm.GhostBatchNorm1d(3, np.int32(2)).virtual_batch_size == 2
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(np.int64(4)))
    assert type(batchnorm.convert(model)[0]) is batchnorm.BatchNorm2d
    with raises(ValueError, "num_features must be a positive int", "True"):
        batchnorm.BatchNorm1d(True)


@pytest.mark.parametrize(
    "bounds, fragment",
    [({"rmax": 0}, "rmax=0.0"), ({"rmax": 0.5}, "rmax=0.5"), ({"dmax": -1}, "dmax=-1.0"),
     ({"rmin": -1.0}, "rmin must be in [0, 1]")],
)  # fmt: skip
def test_batch_renorm_bounds_are_checked(bounds, fragment):
    with raises(ValueError, "BatchRenorm1d", fragment):
        batchnorm.BatchRenorm1d(3, **bounds)
    # a schedule is checked when it is used, at the step it gives a bad bound
    scheduled = {k: (lambda step, v=v: v) for k, v in bounds.items()}
    layer = batchnorm.BatchRenorm1d(3, **scheduled)
    with raises(ValueError, "BatchRenorm1d", fragment, "at step 0"):
        layer(torch.randn(8, 3))


@pytest.mark.parametrize("training", [True, False])
def test_an_empty_batch_of_another_dtype_is_returned_as_torch_does(training, backend):
    x = torch.empty(0, 3, 4, dtype=torch.float64)
    stats = (torch.zeros(3), torch.ones(3))
    expected = torch.nn.functional.batch_norm(x, *stats, training=training)
    y = BF.batch_norm(x, *stats, torch.ones(3), torch.zeros(3), training=training)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    assert batchnorm.BatchNorm1d(3).train(training)(x).dtype == torch.float64
