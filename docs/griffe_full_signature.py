"""Griffe extension for the API reference (mkdocs.yml): the real constructor signature of the
layers decorated with ``batchnorm.nn.base.full_signature``, and of those whose ``__init__``
is ``(self, *args, **kwargs)`` bound to a signature of their own (SyncBatchNorm, the lazy
layers).

Such a layer's ``__init__`` names only its own options (or none) and passes the others on
through ``*args``/``**kwargs``; ``__init__.__signature__`` is set at import, which reading
the sources (griffe's static analysis, used for the rest of the reference) cannot see. For
those classes only, this extension imports the class and replaces the parameters of its
``__init__`` by the ones ``inspect.signature`` gives.

(mkdocstrings-python's ``force_inspection`` applies to a whole package: it would import
every module of batchnorm, ``batchnorm.__main__`` included, which runs the CLI, and list
``__doc__``, ``__module__`` and ``__annotations__`` as members of every class.)
"""

from __future__ import annotations

import ast
import inspect
import sys
from typing import Any

import griffe

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}

_logger = griffe.get_logger(__name__)


class FullSignature(griffe.Extension):
    """Runtime ``__init__`` parameters for the classes decorated with ``decorator``."""

    def __init__(self, decorator: str = "batchnorm.nn.base.full_signature") -> None:
        super().__init__()
        self.decorator = decorator

    def on_class(self, *, cls: griffe.Class, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        init = cls.members.get("__init__")
        decorated = any(d.callable_path == self.decorator for d in cls.decorators)
        if decorated and not isinstance(init, griffe.Function):
            raise ValueError(f"{cls.path}: decorated with {self.decorator}, has no __init__")
        if not isinstance(init, griffe.Function) or not (decorated or _passes_all_on(init)):
            return
        # The sources griffe reads (its search paths) come first: the code documented is the
        # code imported. (dynamic_import replaces sys.path by the paths given.)
        try:
            runtime = griffe.dynamic_import(cls.path, [*loader.finder.search_paths, *sys.path])
        except ImportError as error:  # a warning: `mkdocs build --strict` fails on it
            _logger.warning(f"{cls.path}: signature left as written, cannot import: {error}")
            return
        signature = inspect.signature(runtime.__init__)
        init.parameters = griffe.Parameters(
            *(_parameter(p, cls) for p in signature.parameters.values())
        )
        for parameter in init.parameters:
            parameter.function = init


def _passes_all_on(init: griffe.Function) -> bool:
    """``__init__(self, *args, **kwargs)``: a constructor that binds its arguments to a
    signature it sets itself (``__init__.__signature__``, e.g. SyncBatchNorm's)."""
    kinds = [p.kind for p in init.parameters][1:]
    return kinds == [griffe.ParameterKind.var_positional, griffe.ParameterKind.var_keyword]


def _parameter(parameter: inspect.Parameter, cls: griffe.Class) -> griffe.Parameter:
    """``parameter`` as griffe's static analysis would have it (annotation as an expression,
    default as source text)."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        annotation = None
    else:
        text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
        annotation = griffe.safe_get_annotation(ast.parse(text, mode="eval").body, parent=cls)
    default = None if parameter.default is inspect.Parameter.empty else repr(parameter.default)
    return griffe.Parameter(
        parameter.name, annotation=annotation, kind=_KINDS[parameter.kind], default=default
    )
