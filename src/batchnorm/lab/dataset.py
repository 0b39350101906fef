"""The lab's data set: :class:`Dataset` (float32 features, int64 labels), :class:`DataError`,
and the checks every loaded data set passes, whatever file format it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Labels are class indices in 0..MAX_CLASSES-1. The model has one output per class, so a
#: label of 2**40 would size a layer for 2**40 classes; 100k is far above any data set the lab
#: trains on (ImageNet-21k has 21,841 classes), so a larger label means a corrupt file or
#: labels that are not indices.
MAX_CLASSES = 100_000


class DataError(ValueError):
    """A data file is missing, corrupt or inconsistent; the message names the file."""


@dataclass
class Dataset:
    """A classification data set as float32 features ``(N, F)`` and int64 labels ``(N,)``."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    #: Where the data came from (a cache file, a folder), for the report.
    source: str = ""

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def to(self, device: torch.device | str) -> Dataset:
        """The same data on ``device``."""
        move = [t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)]
        return Dataset(self.name, *move, self.num_classes, self.source)

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test samples, "
            f"{self.num_features} features, {self.num_classes} classes"
        )


# ---------------------------------------------------------------------------------------
# Checks shared by every format


def _make_dataset(
    source: Path,
    name: str,
    arrays: dict[str, np.ndarray],
    num_classes: int | None,
    files: dict[str, Path] | None = None,
) -> Dataset:
    """Check the four arrays against each other and turn them into tensors; errors name the
    file each array came from (``files``) or ``source``."""

    def where(key: str) -> str:
        return f"{files[key]}" if files else f"{source} [{key}]"

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2:
            raise DataError(
                f"{where('x_' + split)}: expected samples of shape (N, features...) with at "
                f"least 2 dimensions, got shape {x.shape}."
            )
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{where('y_' + split)}: expected integer class labels of shape (N,), got "
                f"{y.dtype} of shape {y.shape}. Hint: one-hot labels -> y.argmax(axis=1)."
            )
        if len(x) != len(y):
            raise DataError(
                f"{where('y_' + split)}: count mismatch: {len(x)} samples in x_{split} but "
                f"{len(y)} labels in y_{split}."
            )
        if len(x) == 0:
            raise DataError(f"{where('x_' + split)}: no samples.")
        if x[0].size == 0:
            raise DataError(
                f"{where('x_' + split)}: the samples have no features (shape {x.shape})."
            )
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise DataError(f"{where('x_' + split)}: expected numeric samples, got {x.dtype}.")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DataError(f"{where('x_' + split)}: contains NaN or infinite values.")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{where('x_test')}: test samples have shape {arrays['x_test'].shape[1:]}, train "
            f"samples {arrays['x_train'].shape[1:]}; they must match."
        )
    classes = num_classes
    if classes is None:  # the largest label + 1, unless beyond MAX_CLASSES (reported below)
        top = max(int(arrays[key].max()) for key in ("y_train", "y_test"))  # exact ints
        classes = min(top + 1, MAX_CLASSES)
    for key in ("y_train", "y_test"):
        y = arrays[key]
        bad = (y < 0) | (y >= classes)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            bound = (
                f" (at most MAX_CLASSES = {MAX_CLASSES} classes: the model has one output per "
                f"class)"
                if num_classes is None and y[first] >= classes
                else ""
            )
            raise DataError(
                f"{where(key)}: label out of range: {key}[{first}] = {int(y[first])}, expected "
                f"0..{classes - 1}{bound}. Hint: labels are class indices 0..K-1; "
                f"numpy.unique(y, return_inverse=True) maps other values to indices."
            )

    def features(x: np.ndarray) -> Tensor:
        flat = x.reshape(len(x), -1)
        # uint8 images are pixels in 0..255; the usual [0, 1] scaling keeps inputs O(1).
        scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
        return torch.from_numpy(flat.astype(np.float32) * np.float32(scale))

    return Dataset(
        name=name,
        x_train=features(arrays["x_train"]),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=features(arrays["x_test"]),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=classes,
        source=str(source),
    )
