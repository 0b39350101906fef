"""The batch-norm operation and its dispatch to the backends (see :mod:`batchnorm.backends`).

``batch_norm`` takes validated inputs (:mod:`batchnorm.functional` validates them);
``use_backend``, ``available_backends`` and ``register_backend`` steer the dispatch.
"""

from batchnorm.ops.core import Reduction, backward_impl, batch_norm, forward_impl, run_kernels
from batchnorm.ops.dispatch import (
    available_backends,
    backend_named,
    first_backend,
    register_backend,
    select,
    select_kernels,
    unregister_backend,
    use_backend,
)

#: The kernel backend the default dispatch gives a plain call on a tensor (kept for callers
#: that ask which kernels run, such as ``batchnorm bench``'s environment record).
select_backend = select_kernels

__all__ = [
    "Reduction",
    "available_backends",
    "backend_named",
    "backward_impl",
    "batch_norm",
    "first_backend",
    "forward_impl",
    "register_backend",
    "run_kernels",
    "select",
    "select_backend",
    "select_kernels",
    "unregister_backend",
    "use_backend",
]
