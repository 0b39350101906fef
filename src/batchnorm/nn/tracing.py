"""How the layers look to graph tools: ``torch.fx`` tracing and TorchScript.

Every layer's ``forward`` (:class:`GraphFriendly`) has three paths:

* **eager** (``_forward``): the layer's own code, with its checks and kernels;
* **torch.fx**: when ``forward`` receives an ``fx.Proxy`` it records one ``call_module``
  node for the layer, exactly what fx records for torch.nn's batch norm, which fx's default
  tracer treats as a leaf (it only knows modules of the ``torch.nn`` namespace). So
  ``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor`` and other
  tracers see the layer as one node and the traced graph calls the real layer;
* **TorchScript** (``_forward_script``): ``torch.jit.script`` compiles only this path
  (``torch.jit.is_scripting()``), made of torch operations: the same function as the eager
  path (running-average update, ``unbiased_running_var``, residual, fused activation), with
  torch's kernels. Variants whose training step is not plain batch norm (Ghost, Renorm,
  Sync) script their eval mode; in training the scripted layer raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx


class GraphFriendly:
    """The ``forward`` of every layer: eager code in ``_forward``, an fx node for an fx
    Proxy, ``_forward_script`` under TorchScript. Subclasses override those two, never
    ``forward``."""

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_script(input, residual)
        else:  # TorchScript does not compile this branch
            if isinstance(input, fx.Proxy) or isinstance(residual, fx.Proxy):
                return fx_call_module(self, input, residual)
            return self._forward(input, residual)


def fx_call_module(module: torch.nn.Module, input: object, residual: object) -> fx.Proxy:
    """Record ``module(input[, residual])`` as one ``call_module`` node of the graph being
    traced, as fx does for a leaf module."""
    proxy = input if isinstance(input, fx.Proxy) else residual
    tracer = proxy.tracer
    try:
        path = tracer.path_of_module(module)
    except NameError:
        path = ""
    if not path:  # the traced root itself (or a module outside it): no name to call
        raise fx.proxy.TraceError(
            f"{type(module).__name__}: torch.fx records a batch-norm layer as a call of a "
            f"submodule of the traced model, so it cannot trace the layer on its own, nor one "
            f"that is not a submodule (torch.nn's batch norm cannot be traced alone either). "
            f"Hint: trace a model that contains it, e.g. torch.nn.Sequential(layer)."
        )
    args = (input,) if residual is None else (input, residual)
    return tracer.create_proxy("call_module", path, args, {})


def script_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    activation: str | None,
    negative_slope: float,
    residual: Tensor | None,
    unbiased_running_var: bool,
) -> Tensor:
    """The layers' function in torch operations, for TorchScript:
    ``act(BN(input) [+ residual])``, running statistics updated in place when given in
    training (biased variance when ``unbiased_running_var`` is False, as the eager path)."""
    if (
        use_batch_stats
        and not unbiased_running_var
        and running_mean is not None
        and running_var is not None
    ):
        y = F.batch_norm(input, None, None, weight, bias, True, momentum, eps)
        with torch.no_grad():
            dims = [0]
            for d in range(2, input.dim()):
                dims.append(d)
            var, mean = torch.var_mean(input, dims, correction=0)
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(var.to(running_var.dtype), momentum)
    else:
        y = F.batch_norm(
            input, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps
        )
    if residual is not None:
        y = y + residual
    if activation is not None:
        if activation == "relu":
            y = torch.relu(y)
        elif activation == "leaky_relu":
            y = F.leaky_relu(y, negative_slope)
        elif activation == "silu":
            y = F.silu(y)
        elif activation == "elu":
            y = F.elu(y)
    return y


def script_check_rank(rank: int, ranks: list[int]) -> None:
    """The rank check of the eager path, for TorchScript."""
    if rank not in ranks:
        raise ValueError(f"batch norm: expected an input with {ranks} dimensions, got {rank}")
