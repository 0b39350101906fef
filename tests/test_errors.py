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
