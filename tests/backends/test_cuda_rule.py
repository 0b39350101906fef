"""The CUDA dispatch rule (backends.aten.cuda_kernels_faster), checked on shapes alone
(meta tensors), so that it holds on machines without a GPU too; tests/backends/test_cuda.py
checks the dispatch itself on a GPU."""

import pytest
import torch

from batchnorm.backends import Call, builtin_backends
from batchnorm.backends.aten import cuda_kernels_faster


def _faster(shape, training=True, channels_last=False):
    x = torch.empty(shape, device="meta")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return cuda_kernels_faster(Call(x, training, "identity", 0.01, False))


@pytest.mark.parametrize(
    ("shape", "training", "channels_last", "expected"),
    [
        ((128, 64, 112, 112), True, False, True),  # ResNet-50's stem at batch 128
        ((256, 64, 112, 112), True, False, True),
        ((128, 64, 112 * 112), True, False, True),  # (N, C, L) of the same size
        ((128, 64, 112, 112), False, False, False),  # eval: cuDNN
        ((128, 64, 112, 112), True, True, False),  # channels last: cuDNN
        ((32, 64, 112, 112), True, False, False),  # a quarter of the values
        ((128, 256, 56, 56), True, False, False),  # smaller planes
        ((8192, 8192), True, False, False),  # (N, C)
    ],
)
def test_cuda_kernels_faster_only_on_large_nchw_planes(shape, training, channels_last, expected):
    assert _faster(shape, training, channels_last) is expected


def test_aten_defers_to_gpu_kernels_only_when_they_are_registered():
    backends = {b.name: b for b in builtin_backends()}
    assert (backends["aten"].gpu_kernels is not None) == ("triton" in backends)


@pytest.mark.parametrize(
    ("capability", "hip", "expected"),
    [((9, 0), None, True), ((8, 0), None, True), ((7, 5), None, False), ((9, 4), "6.2", False)],
)
def test_triton_kernels_run_on_ampere_and_later_nvidia_gpus(capability, hip, expected,
                                                            monkeypatch):  # fmt: skip
    """Older GPUs and ROCm keep cuDNN/MIOpen and the reference (a Triton compile error on a
    model that ran before would be a regression); checked on the device query alone."""
    # an environment guard: triton is an optional dependency (the dev install has it)
    backend = pytest.importorskip("batchnorm.backends.triton.backend")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    backend._kernels_run_on.cache_clear()
    try:
        assert backend._kernels_run_on(0) is expected
    finally:
        backend._kernels_run_on.cache_clear()
