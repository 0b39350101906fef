"""Data sets for the lab: MNIST-1D generated locally (the default), and the user's own
MNIST / Fashion-MNIST IDX files, Keras' ``mnist.npz`` or any ``.npz`` with
``x_train, y_train, x_test, y_test``.

Nothing is ever downloaded. Every file is checked as it is read, and a broken one raises
:class:`DataError` naming the file and the problem (bad magic number, truncated file, count
mismatch, missing key, label out of range, ...). Every size a header announces is checked
against the file (or bounded, when only decompressing would tell) before anything of that
size is allocated, so a crafted file cannot exhaust memory.

The file readers are in :mod:`~batchnorm.lab.datafiles`, :class:`Dataset` and the checks
every data set passes in :mod:`~batchnorm.lab.dataset`; their public names are
importable from here as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

from batchnorm._cache import cache_root
from batchnorm.lab.datafiles import (
    IDX_FILES,
    MAX_ARRAY_BYTES,
    MNIST_CLASSES,
    NPZ_KEYS,
    _find_idx,
    _single_npz,
    load_idx_folder,
    load_npz,
    read_idx,
)
from batchnorm.lab.dataset import MAX_CLASSES, DataError, Dataset

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "MAX_ARRAY_BYTES",
    "MAX_CLASSES",
    "MNIST_CLASSES",
    "NPZ_KEYS",
    "DataError",
    "Dataset",
    "cache_dir",
    "load_dataset",
    "load_idx_folder",
    "load_mnist1d",
    "load_npz",
    "read_idx",
]

from batchnorm.lab.extras import import_extra

#: The data sets ``load_dataset`` knows by name.
DATASETS = ("mnist1d", "mnist", "fashion-mnist", "npz")


def load_dataset(
    name: str = "mnist1d", data_dir: str | os.PathLike | None = None, quiet: bool = False
) -> Dataset:
    """Load a data set by name.

    * ``"mnist1d"``: MNIST-1D generated locally with ``mnist1d.data.make_dataset`` at its
      default arguments (4000 train / 1000 test signals of length 40), cached under
      :func:`cache_dir`; ``data_dir`` is not used.
    * ``"mnist"`` / ``"fashion-mnist"``: the four IDX files (raw or ``.gz``) in
      ``data_dir``; for ``"mnist"`` Keras' ``mnist.npz`` in ``data_dir`` works too.
    * ``"npz"``: ``data_dir`` is a ``.npz`` file (or a folder holding exactly one) with
      arrays ``x_train, y_train, x_test, y_test``.

    Images are flattened; ``uint8`` pixels are scaled to [0, 1]; float features are kept.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {list(DATASETS)}.")
    if name == "mnist1d":
        return load_mnist1d(quiet=quiet)
    if data_dir is None:
        what = "a .npz file" if name == "npz" else "the folder holding its files"
        raise ValueError(
            f"data set {name!r} needs --data-dir ({what}). Hint: nothing is downloaded; "
            f"get the files yourself, or use the default data set 'mnist1d', generated locally."
        )
    path = Path(data_dir).expanduser()
    if name == "npz":
        return load_npz(_single_npz(path), name="npz")
    if not path.is_dir():
        raise DataError(f"{path}: expected a folder with the {name} files, found no folder.")
    found = {key: _find_idx(path, stem) for key, stem in IDX_FILES.items()}
    if all(found.values()):
        return load_idx_folder(path, name=name)
    if name == "mnist" and (path / "mnist.npz").is_file():
        return load_npz(path / "mnist.npz", name="mnist", num_classes=MNIST_CLASSES)
    missing = [f"{IDX_FILES[k]}[.gz]" for k, v in found.items() if v is None]
    keras = " or Keras' mnist.npz" if name == "mnist" else ""
    raise DataError(
        f"{path}: expected the four {name} IDX files{keras}; missing {', '.join(missing)}."
    )


# ---------------------------------------------------------------------------------------
# MNIST-1D


def cache_dir() -> Path:
    """Where generated data is cached: ``$XDG_CACHE_HOME/batchnorm`` (``~/.cache/batchnorm``)."""
    return cache_root()


def load_mnist1d(quiet: bool = False) -> Dataset:
    """MNIST-1D at ``mnist1d``'s default arguments, generated once and then read from cache."""
    args = import_extra("mnist1d.data").get_dataset_args(as_dict=True)
    args.pop("url", None)  # only used by mnist1d's downloader, which we never call
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"mnist1d-{key}.npz"
    if path.is_file():
        try:
            return load_npz(path, name="MNIST-1D")
        except DataError as error:  # a damaged cache is regenerated, not the user's problem
            print(f"note: regenerating MNIST-1D ({error})", file=sys.stderr)
    if not quiet:
        print(f"Generating MNIST-1D (once; cached at {path})", file=sys.stderr)
    arrays = _generate_mnist1d()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return load_npz(path, name="MNIST-1D")


def _generate_mnist1d() -> dict[str, np.ndarray]:
    import_extra("matplotlib").use("Agg")  # mnist1d imports pyplot; never open a window
    mnist1d_data = import_extra("mnist1d.data")
    get_dataset_args, make_dataset = mnist1d_data.get_dataset_args, mnist1d_data.make_dataset

    # make_dataset reseeds the global `random` and numpy generators; leave them as found.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x_train": data["x"].astype(np.float32),
        "y_train": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }
