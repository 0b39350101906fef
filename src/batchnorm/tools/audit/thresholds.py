"""The audit's named constants: the severities, the thresholds of its checks (each with
its reason) and its defaults. :mod:`batchnorm.tools.audit` exports them all."""

from __future__ import annotations

import math

import torch

#: Severities, worst first.
SEVERITIES = ("error", "warning", "info")

# ------------------------------------------------------------------------- thresholds
#: Stale statistics: the root-mean-square over channels of |running_mean - mean| / sqrt(var
#: + eps). A trained model's momentum average stays within a few hundredths of the data's
#: (the demo's model: 0.02 on its training set, 0.04 on its test set); 0.2 shifts every
#: channel by a fifth of its spread, 0.5 by half, which changes what the next layer sees.
STALE_GAP_WARNING = 0.2
STALE_GAP_ERROR = 0.5
#: ... and of |log((running_var + eps) / (var + eps))|: the demo's model is at 0.04-0.1;
#: a factor 1.5 (log 0.41) rescales every channel by 20 %, a factor 3 by 42 % or 73 %.
STALE_LOG_VAR_WARNING = math.log(1.5)
STALE_LOG_VAR_ERROR = math.log(3.0)
#: Metric recovered by recalibration (accuracy as a fraction, or the loss's relative
#: decrease): the demo's model, trained normally, gains 0.3-0.6 points (info); from 1 point
#: recalibrating is worth doing, from 3 the model is clearly held back.
GAIN_WARNING = 0.01
GAIN_ERROR = 0.03
#: Noisy batch statistics, in effective values per channel and batch, m_eff = 1 / noise²,
#: where noise is the measured spread of (batch mean - mean) / std (m_eff = m for
#: independent values, fewer when values within a batch are correlated, as pixels are).
#: Below 32 the batch mean is off by more than 1/sqrt(32) = 0.18 standard deviations and
#: the variance by more than sqrt(2/31) = 25 % in a typical batch, so training normalizes
#: with statistics the running ones (used at inference) do not match; Wu & He (Group
#: Normalization, 2018, Fig. 1) see ResNet-50's ImageNet error with BN grow by about 11
#: points as the batch per device shrinks from 32 images to 2. Below 8 (0.35 std) the
#: training signal itself is mostly batch noise.
NOISY_VALUES_WARNING = 32
NOISY_VALUES_ERROR = 8
#: Batches needed to measure the spread of batch statistics at all.
MIN_NOISE_BATCHES = 4
#: Batches of this many samples or more make batch statistics almost noiseless, and lose
#: the regularizing noise of smaller ones (Hoffer et al., 2017): Ghost BN brings it back.
GHOST_BATCH_SIZE = 1024
#: Dead channel: |weight| below this fraction of the layer's median |weight| (or 0): the
#: channel outputs its bias, a constant, whatever the input.
DEAD_WEIGHT = 1e-3
#: Share of a layer's channels with (almost) constant input above which it is a warning; a
#: few dead ReLU units before a BN are common and cost only their channels.
CONSTANT_SHARE_WARNING = 0.25
#: float16/bfloat16 layers: eps must survive ``var + eps`` at var = 1, i.e. be at least
#: half a unit in the last place of 1 (float16 has 10 mantissa bits, bfloat16 7). The
#: value suggested instead (Keras' default for float16 is 1e-3).
MIN_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SAFE_EPS = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
#: How many of the worst channels a finding names.
WORST_CHANNELS = 3
#: Fold timing: repetitions (the fastest is reported) and the time one repetition lasts at
#: least (calls are repeated within it, so fast models are timed well above the clock's
#: resolution).
TIMING_REPEATS = 5
TIMING_MIN_SECONDS = 0.01
#: Batches taken from the data by default, and the batch size a tensor is cut into.
DEFAULT_NUM_BATCHES = 100
DEFAULT_BATCH_SIZE = 100
