"""The reference backend: :mod:`batchnorm.reference`'s plain torch ops, correct for every
dtype and device. The fallback of the default dispatch (CUDA and half-precision calls, and
activations a faster backend has no kernel for) and, run in float64, the tests' oracle."""

from __future__ import annotations

from batchnorm import reference
from batchnorm.backends import Call


class ReferenceBackend:
    name = "reference"
    operator = False
    devices = None

    def supports(self, call: Call) -> bool:
        return True

    def preferred(self, call: Call) -> bool:
        return True

    def forward_train(self, x, weight, bias, residual, eps, activation, negative_slope):
        mean, var = reference.batch_stats(x)
        invstd = reference.invstd_of(var, eps)
        y = reference.forward(x, mean, invstd, weight, bias, residual, activation, negative_slope)
        return y, mean, var, invstd

    def forward_eval(self, x, weight, bias, residual, mean, invstd, activation, negative_slope):
        return reference.forward(
            x, mean, invstd, weight, bias, residual, activation, negative_slope
        )

    def backward(
        self, dy, x, weight, bias, residual, mean, invstd, training, activation, negative_slope,
        need_dpre,
    ):  # fmt: skip
        dx, dw, db, dpre = reference.backward(
            dy, x, mean, invstd, weight, bias, residual, training, activation, negative_slope
        )
        return dx, dw, db, dpre if need_dpre else None

    update_running_stats = staticmethod(reference.update_running_stats)
