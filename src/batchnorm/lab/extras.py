"""The lab's optional packages (the ``lab`` extra): imported where used, and a clear error
naming the extra when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

#: What the ``lab`` extra installs (pyproject.toml's optional-dependencies).
LAB_EXTRA = ("mnist1d", "matplotlib", "rich")


class MissingExtraError(ImportError):
    """An optional package of the ``lab`` extra is not installed."""


def import_extra(name: str) -> ModuleType:
    """``importlib.import_module(name)``, or a :class:`MissingExtraError` that says which
    extra to install and how, when ``name``'s package is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        package = name.split(".")[0]
        missing = (error.name or "").split(".")[0]
        if missing != package:  # the package is there; something it imports is not
            raise
        raise MissingExtraError(
            f"the lab needs the package {package!r}, which is not installed; it comes with "
            f"the 'lab' extra. Hint: pip install \"batchnorm[lab]\" (from a clone of the "
            f'repository: pip install ".[lab]").',
            name=package,
        ) from error
