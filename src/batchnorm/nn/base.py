"""The shell of every trainable layer in :mod:`batchnorm.nn`: the constructor, parameters,
buffers and state_dict of torch.nn.BatchNorm1d/2d/3d, the running-average step and the call
of the one functional core (:mod:`batchnorm.functional`), with the checks every layer makes
and the input ranks of the 1d/2d/3d flavours.

The layers subclass ``torch.nn.modules.batchnorm._BatchNorm`` on purpose: tools across the
ecosystem (``torch.optim.swa_utils.update_bn``, fvcore, timm, detectron2) find batch-norm
layers with ``isinstance(m, _BatchNorm)``, and they keep working with ours.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.functional import ArgumentTypeError, InputError, _batch_norm, _layer_call
from batchnorm.nn.tracing import GraphFriendly, script_batch_norm, script_check_rank

#: The N of the ``BatchNormNd`` flavour that takes inputs of each rank.
DIMS_OF_INPUT_RANK = {2: 1, 3: 1, 4: 2, 5: 3}

_Layer = TypeVar("_Layer", bound=type)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def check_positive_int(layer: str, name: str, value: Any, meaning: str = "") -> int:
    """Constructor arguments that count something (num_features, virtual_batch_size), as a
    Python int: any integer type is taken (numpy's too, as torch.nn takes them). Errors are
    of torch's classes (TypeError for a non-integer, RuntimeError for a negative count) and
    ValueErrors too."""
    message = f"{layer}: {name} must be a positive int{meaning}, got {value!r}."
    try:
        number = operator.index(value) if not isinstance(value, bool) else 0
    except TypeError:
        raise ArgumentTypeError(message) from None
    if number < 1:
        raise InputError(message)
    return number


def check_layer_input(
    layer: str, input: Tensor, ranks: tuple[int, ...] | None, layout: str, num_features: int
) -> None:
    """The rank and channel checks every layer makes, with messages naming the layer.
    ``ranks=None`` accepts any rank >= 2."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(input).__name__}.")
    if ranks is None and input.dim() < 2:
        raise ValueError(
            f"{layer}: expected an input of shape {layout} with at least 2 dimensions, got shape "
            f"{tuple(input.shape)}. Hint: a single sample needs a batch dimension, e.g. "
            f"input.unsqueeze(0)."
        )
    if ranks is not None and input.dim() not in ranks:
        dims = DIMS_OF_INPUT_RANK.get(input.dim())
        hint = (
            f"use the BatchNorm{dims}d flavour for {input.dim()}-D inputs."
            if dims is not None
            else "batch norm takes inputs of shape (N, C, *) with 2 to 5 dimensions."
        )
        raise ValueError(
            f"{layer}: expected a {' or '.join(f'{r}-D' for r in ranks)} input {layout}, got a "
            f"{input.dim()}-D input of shape {tuple(input.shape)}. Hint: {hint}"
        )
    if input.shape[1] != num_features:
        raise InputError(
            f"{layer}: expected {num_features} channels in dimension 1, got input of shape "
            f"{tuple(input.shape)} with {input.shape[1]}. Hint: set num_features to the number "
            f"of channels of the layer before."
        )


def full_signature(cls: _Layer) -> _Layer:
    """Class decorator for a layer whose ``__init__`` names only its own options and passes
    the others on to its parent through ``*args``/``**kwargs``: the signature that
    ``inspect.signature`` and ``help`` show lists the parameters passed on, in the parent's
    order, where ``*args`` (positional ones) and ``**kwargs`` (keyword-only ones) stand."""
    init = cls.__dict__["__init__"]
    own = list(inspect.signature(init).parameters.values())
    kinds = {p.kind for p in own}
    named = {p.name for p in own}
    parent = super(cls, cls).__init__
    passed = [p for p in inspect.signature(parent).parameters.values() if p.name not in named]
    positional = [p for p in passed if p.kind in _POSITIONAL]
    keyword = [p for p in passed if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if inspect.Parameter.VAR_POSITIONAL not in kinds:  # only by keyword, through **kwargs
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in positional] + keyword
        positional = []
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        keyword = []
    init.__signature__ = inspect.Signature(
        [p for p in own if p.kind in _POSITIONAL]
        + positional
        + keyword
        + [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY],
        return_annotation=inspect.signature(init).return_annotation,
    )
    return cls


def bind_options(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A constructor's arguments (``self`` first in ``args``) bound to ``signature``, the
    defaults filled in, ``self`` left out: for layers that take the parameters of
    ``_BatchNormBase.__init__`` with a change (the lazy ones, SyncBatchNorm) without
    restating them."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return {name: value for name, value in list(bound.arguments.items())[1:]}


def _own(layer: torch.nn.Module, name: str) -> Any:
    """``layer.<name>`` for a parameter or buffer, from the module's own dicts: the attribute
    goes through ``Module.__getattr__``, 0.4 µs a name on every call of a small layer. A
    name not there (a parametrization or a property in its place) is read as an attribute."""
    for table in (layer._parameters, layer._buffers):
        if name in table:
            return table[name]
    return getattr(layer, name)


class _BatchNormBase(GraphFriendly, _BatchNorm):
    """Shared body of the trainable modules of this package.

    Subclasses set the accepted ranks; variants change only how the statistics (or the
    scale and shift given to the one functional core) are obtained in training, in
    ``_forward`` (the eager path of ``forward``; see :mod:`batchnorm.nn.tracing` for the
    torch.fx and TorchScript paths).
    """

    #: What TorchScript compiles as constants (torch's, and the options of this package).
    __constants__ = [
        *_BatchNorm.__constants__,
        "activation",
        "negative_slope",
        "unbiased_running_var",
        "_ranks",
        "_script_trains",
    ]

    #: Input ranks the layer accepts and how to describe them in an error.
    _ranks: tuple[int, ...] | None = ()
    _layout: str = ""
    #: The activation fused after the normalization (None: plain batch norm).
    activation: str | None = None
    negative_slope: float = 0.01
    #: Keep only the output for backward (InPlace-ABN); see InPlaceBatchNormAct2d.
    _keep_output_only: bool = False
    #: Whether the TorchScript path can train (its training step is plain batch norm).
    _script_trains: bool = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        name, meaning = type(self).__name__, " (the number of channels C of an (N, C, *) input)"
        num_features = check_positive_int(name, "num_features", num_features, meaning)

        # `bias` reached torch's constructor only recently; handle it here for torch >= 2.3.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            del self.bias
            self.register_parameter("bias", None)
        self.unbiased_running_var = unbiased_running_var

    @torch.jit.unused
    @property
    def layer_name(self) -> str:
        """How error messages name this layer."""
        return f"{type(self).__name__}({self.num_features})"

    def _get_name(self) -> str:
        """``batchnorm.BatchNorm2d`` in ``repr`` where torch.nn's layer says ``BatchNorm2d``:
        after ``convert`` a printed model shows which layers are ours. A class defined
        outside this package (a user's subclass) keeps its plain name."""
        cls = type(self)
        ours = cls.__module__.split(".")[0] == "batchnorm"
        return f"batchnorm.{cls.__name__}" if ours else cls.__name__

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation not in (None, "identity"):
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        if not self.unbiased_running_var:
            text += ", unbiased_running_var=False"
        return text

    def _check_input_dim(self, input: Tensor) -> None:
        # The passing case in a few C calls (it runs on every call; small layers feel it);
        # anything else goes to check_layer_input, which says what is wrong.
        ranks = self._ranks
        if (
            isinstance(input, Tensor)
            and (input.dim() >= 2 if ranks is None else input.dim() in ranks)
            and input.shape[1] == self.num_features
        ):
            return
        check_layer_input(self.layer_name, input, ranks, self._layout, self.num_features)

    def _momentum_factor(self) -> float:
        """The running-average factor for this step; counts the step, as torch.nn does."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        count = _own(self, "num_batches_tracked")
        if count is not None:
            count.add_(1)
            if self.momentum is None:  # cumulative moving average
                return 1.0 / float(count)
        return 0.0 if self.momentum is None else self.momentum

    def _forward(self, input: Tensor, residual: Tensor | None) -> Tensor:
        """The eager path of ``forward``: what variants override."""
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, steps = self._call_tensors()
        momentum = self._momentum_factor() if steps is None else self.momentum
        if not self._keep_output_only:  # the usual call: the dispatch's pick directly
            activation = "identity" if self.activation is None else self.activation
            # a Call's fields (_layer_call builds the Call where it needs one)
            call = (input, self.training, activation, self.negative_slope, residual is not None,
                    False, self.unbiased_running_var, weight, bias, running_mean, running_var,
                    residual, momentum, self.eps)  # fmt: skip
            y = _layer_call(call, steps)  # steps counted where it makes the call
            if y is not None:
                return y
        if steps is not None:
            steps.add_(1)
        return self._normalize(input, residual, momentum)

    def _call_tensors(self) -> tuple[Tensor | None, ...]:
        """(weight, bias, running_mean, running_var, steps) of this call, in one step (a
        small layer's call felt the seven it took): the parameters, the running statistics
        torch.nn's rule gives (the layer's own, except in training with track_running_stats
        off), each read as ``_own`` reads it; and steps, num_batches_tracked where this
        training step counts it and its momentum is fixed, for the call to count
        (``_layer_call``: in C++ where the C++ backend takes it, which saves torch's add_
        from Python, 4-5 µs of a small layer's 25), else None (``_momentum_factor`` counts
        the step: a cumulative average's factor reads the count)."""
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        training = self.training
        if training and not self.track_running_stats:
            return weight, bias, None, None, None
        mean = buffers["running_mean"] if "running_mean" in buffers else self.running_mean
        var = buffers["running_var"] if "running_var" in buffers else self.running_var
        steps = None
        if training and self.momentum is not None:
            steps = _own(self, "num_batches_tracked")
        return weight, bias, mean, var, steps

    def _tracked_statistics(self) -> tuple[Tensor | None, Tensor | None]:
        """The running statistics a call reads (eval) or updates (training), torch.nn's
        rule: the layer's own, except in training with track_running_stats off."""
        return self._call_tensors()[2:4]

    def _forward_script(self, input: Tensor, residual: Tensor | None) -> Tensor:
        """The TorchScript path of ``forward``: the plain layer's function in torch ops."""
        if self._ranks is not None:
            script_check_rank(input.dim(), list(self._ranks))
        if self.training and not self._script_trains:
            raise RuntimeError(
                "this batch-norm variant trains only in eager mode; a scripted copy runs in "
                "eval mode (call .eval() before torch.jit.script)"
            )
        momentum = 0.0 if self.momentum is None else self.momentum
        num_batches_tracked = self.num_batches_tracked
        if self.training and self.track_running_stats and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(num_batches_tracked)
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        if self.training and not self.track_running_stats:
            running_mean, running_var = None, None
        return script_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
            momentum, self.eps, self.activation, self.negative_slope, residual,
            self.unbiased_running_var,
        )  # fmt: skip

    def _normalize(
        self,
        input: Tensor,
        residual: Tensor | None,
        momentum: float,
        weight: Tensor | None | bool = True,
        bias: Tensor | None | bool = True,
        running_mean: Tensor | None | bool = True,
        running_var: Tensor | None | bool = True,
        reduction: Any = None,
    ) -> Tensor:
        """The functional core with this layer's options; parameters and running statistics
        default to the layer's own (``True``), the statistics read in eval mode and updated
        in training when tracked."""
        if weight is True:
            weight = _own(self, "weight")
        if bias is True:
            bias = _own(self, "bias")
        tracked_mean, tracked_var = self._tracked_statistics()
        if running_mean is True:
            running_mean = tracked_mean
        if running_var is True:
            running_var = tracked_var
        # in eval the tracked statistics are the layer's own: none, and the batch's are used
        use_batch_stats = self.training or (tracked_mean is None and tracked_var is None)
        return _batch_norm(
            input,
            running_mean,  # type: ignore[arg-type]
            running_var,  # type: ignore[arg-type]
            weight,
            bias,
            use_batch_stats,
            momentum,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            where=self.layer_name,
            unbiased_running_var=self.unbiased_running_var,
            keep_output_only=self._keep_output_only,
            reduction=reduction,
            layer_checked=True,  # forward has run check_layer_input
        )


class _Dims1d:
    _ranks = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class _Dims2d:
    _ranks = (4,)
    _layout = "(N, C, H, W)"


class _Dims3d:
    _ranks = (5,)
    _layout = "(N, C, D, H, W)"
