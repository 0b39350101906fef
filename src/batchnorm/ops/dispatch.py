"""Which backend computes a call: the registry, the default rule and ``use_backend``.

The default dispatch walks the registry in order and takes the first backend that both
supports the call and is preferred for it; each backend states both rules itself (see
:mod:`batchnorm.backends`). ``use_backend(name)`` forces one backend instead: a call it
cannot compute raises a clear error rather than silently running elsewhere.
"""

from __future__ import annotations

from typing import cast

from batchnorm.backends import Backend, Call, KernelBackend, builtin_backends

_REGISTRY: list[Backend] = builtin_backends()
_forced: Backend | None = None
#: With a forced backend: calls it cannot compute go to the default dispatch (True, for
#: test suites that run every case through each backend) or raise (False, the default).
_lenient = False


def register_backend(backend: Backend, *, before: str | None = None) -> None:
    """Add ``backend`` to the dispatch, ahead of the backend named ``before`` (default:
    ahead of all, so that its own ``preferred`` rule decides which calls it takes)."""
    names = [b.name for b in _REGISTRY]
    if backend.name in names:
        raise ValueError(f"register_backend: a backend named {backend.name!r} exists already.")
    if before is not None and before not in names:
        raise ValueError(f"register_backend: unknown backend {before!r}; available: {names}.")
    _REGISTRY.insert(0 if before is None else names.index(before), backend)


def unregister_backend(name: str) -> None:
    """Remove the backend ``name`` (for tests that register a toy one)."""
    _REGISTRY[:] = [b for b in _REGISTRY if b.name != name]


def available_backends(device: str | None = None) -> list[str]:
    """The registered backends' names, in dispatch order; with ``device`` (a device type
    such as "cpu"), those that compute on it."""
    return [
        b.name for b in _REGISTRY if device is None or b.devices in (None,) or device in b.devices
    ]


def first_backend() -> Backend | None:
    """The backend the default dispatch asks first (None while ``use_backend`` forces one):
    a call it supports and prefers is its, whatever the registry holds after it."""
    if _forced is not None or not _REGISTRY:
        return None
    return _REGISTRY[0]


def forced() -> bool:
    """Whether ``use_backend`` forces a backend now."""
    return _forced is not None


def backend_named(name: str) -> Backend:
    for backend in _REGISTRY:
        if backend.name == name:
            return backend
    raise ValueError(f"unknown backend {name!r}; available: {available_backends()}")


def select(call: Call, *, kernels_only: bool = False, declined: int = 0) -> Backend:
    """The backend for ``call``: the forced one, else the first supporting and preferred.

    ``kernels_only``: among kernel backends only (under torch.compile, and for callers that
    need the kernels themselves, such as SyncBatchNorm). ``declined``: the number of
    backends at the registry's front known not to take the call (not asked again)."""
    forced = _forced
    if forced is not None and not (kernels_only and forced.operator):
        if forced.supports(call):
            return forced
        if not _lenient:
            raise ValueError(
                f"use_backend({forced.name!r}): that backend cannot compute this call "
                f"({call.x.dtype} input on {call.x.device}, activation {call.activation!r}, "
                f"residual: {call.has_residual}, unbiased running var: "
                f"{call.unbiased_running_var}, output-only backward: {call.keep_output_only})."
                f" Hint: force it only for calls it supports, or leave the choice to the "
                f"default dispatch."
            )
    for backend in _REGISTRY[declined:] if declined else _REGISTRY:
        if kernels_only and backend.operator:
            continue
        if backend.supports(call) and backend.preferred(call):
            return backend
    raise RuntimeError(f"no backend takes this call; registered: {available_backends()}")


def select_kernels(
    x,
    training: bool = True,
    activation: str = "identity",
    has_residual: bool = False,
    negative_slope: float = 0.01,
) -> KernelBackend:
    """The kernel backend for a plain call on ``x`` (its unspecified options: the usual)."""
    call = Call(x, training, activation, negative_slope, has_residual, False, True)
    return cast(KernelBackend, select(call, kernels_only=True))


class use_backend:
    """Context manager forcing the backend ``name`` (see :func:`available_backends`).

    ``lenient=True`` sends the calls it cannot compute to the default dispatch instead of
    raising (test suites use it to run every case through each backend)."""

    def __init__(self, name: str, *, lenient: bool = False) -> None:
        self.backend = backend_named(name)
        self.lenient = lenient

    def __enter__(self) -> Backend:
        global _forced, _lenient
        self._previous = (_forced, _lenient)
        _forced, _lenient = self.backend, self.lenient
        return self.backend

    def __exit__(self, *exc: object) -> None:
        global _forced, _lenient
        _forced, _lenient = self._previous
