"""Batch norm in Triton kernels: CUDA GPUs, and any device under Triton's interpreter.

Importing this package imports triton and raises ImportError where it is not installed
(batchnorm itself never needs it). ``supports(x)`` says which inputs ``TritonBackend``
takes; see :mod:`.kernels_forward` for the design (:mod:`.kernels_backward` for the
gradients) and :mod:`.backend` for the torch side.
"""

from batchnorm.backends.triton.backend import INTERPRETED, TritonBackend, supports

__all__ = ["INTERPRETED", "TritonBackend", "supports"]
