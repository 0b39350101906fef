"""Data sets for the lab: MNIST-1D generated locally (the default), and the user's own
MNIST / Fashion-MNIST IDX files, Keras' ``mnist.npz`` or any ``.npz`` with
``x_train, y_train, x_test, y_test``.

Nothing is ever downloaded. Every file is checked as it is read, and a broken one raises
:class:`DataError` naming the file and the problem (bad magic number, truncated file, count
mismatch, missing key, label out of range, ...). Every size a header announces is checked
against the file (or bounded, when only decompressing would tell) before anything of that
size is allocated, so a crafted file cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

#: The data sets ``load_dataset`` knows by name.
DATASETS = ("mnist1d", "mnist", "fashion-mnist", "npz")

#: MNIST and Fashion-MNIST ship under the same four file names (optionally gzipped).
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: Both MNIST variants have 10 classes; a label outside 0..9 means a wrong or corrupt file.
MNIST_CLASSES = 10
#: Labels are class indices in 0..MAX_CLASSES-1. The model has one output per class, so a
#: label of 2**40 would size a layer for 2**40 classes; 100k is far above any data set the lab
#: trains on (ImageNet-21k has 21,841 classes), so a larger label means a corrupt file or
#: labels that are not indices.
MAX_CLASSES = 100_000
#: Most bytes of data the header of one array (IDX file or .npz member) may announce. The
#: lab's data sets are small (MNIST's training images: 47 MB) and are loaded whole; a larger
#: claim is corrupt or crafted. Checked before reading, it bounds what a gzip or zip bomb,
#: whose real size only decompressing would tell, can make us allocate.
MAX_ARRAY_BYTES = 2**32

#: IDX type codes (the third byte of the magic number) and the big-endian dtype they denote.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


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
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "batchnorm"


def load_mnist1d(quiet: bool = False) -> Dataset:
    """MNIST-1D at ``mnist1d``'s default arguments, generated once and then read from cache."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
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
    import matplotlib

    matplotlib.use("Agg")  # mnist1d imports pyplot; never open a window
    from mnist1d.data import get_dataset_args, make_dataset

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


# ---------------------------------------------------------------------------------------
# .npz files

#: A .npz is a zip archive: it starts with a local file header (or, empty, an end record).
_ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")


def _single_npz(path: Path) -> Path:
    if path.is_dir():
        candidates = sorted(path.glob("*.npz"))
        if len(candidates) != 1:
            raise DataError(
                f"{path}: expected a .npz file or a folder with exactly one, found "
                f"{len(candidates)} .npz files. Hint: pass the file itself as --data-dir."
            )
        return candidates[0]
    if not path.is_file():
        raise DataError(f"{path}: no such file. Hint: --data-dir takes the .npz file here.")
    return path


def load_npz(path: str | os.PathLike, name: str = "npz", num_classes: int | None = None) -> Dataset:
    """Read a ``.npz`` with ``x_train, y_train, x_test, y_test`` (Keras' ``mnist.npz`` has
    this layout). Labels must be integers in ``0..num_classes-1`` (``num_classes`` defaults
    to the largest label + 1, at most MAX_CLASSES). Only plain numeric arrays are read:
    pickled (object) arrays are refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(4)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file.") from None
    if start not in _ZIP_STARTS:  # else numpy would take it for a pickle, and refuse it
        raise DataError(
            f"{path}: not a readable .npz archive (a .npz is a zip file; this one starts "
            f"with {start!r}). Hint: write it with numpy.savez."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            # numpy's names for the members: "x_train.npy" is x_train (as np.load has it)
            present = sorted(n[: -len(".npy")] if n.endswith(".npy") else n for n in names)
            missing = [k for k in NPZ_KEYS if k not in present]
            if missing:
                raise DataError(
                    f"{path}: missing arrays {missing}; found {present}. Expected "
                    f"x_train, y_train, x_test, y_test (the layout of Keras' mnist.npz)."
                )
            size = path.stat().st_size
            arrays = {
                key: _read_npy_member(path, archive, key if key in names else f"{key}.npy", size)
                for key in NPZ_KEYS
            }
    except DataError:
        raise
    # zipfile raises NotImplementedError for unknown compression, RuntimeError for encryption
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError,
            RuntimeError) as error:  # fmt: skip
        raise DataError(
            f"{path}: not a readable .npz archive (truncated or corrupt: {error})."
        ) from None
    return _make_dataset(path, name, arrays, num_classes)


#: Deflate expands data at most 1032-fold (258 bytes per 2-bit code); a zip member that
#: claims more than that from its compressed size is corrupt.
_DEFLATE_MAX_RATIO = 1032
#: The .npy header versions we parse; 3.0 only adds utf-8 field names (structured dtypes,
#: which are not numeric arrays anyway).
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _read_npy_member(path: Path, archive: zipfile.ZipFile, member: str, size: int) -> np.ndarray:
    """One array of a .npz archive of ``size`` bytes. Before numpy allocates anything, every
    size claimed is checked: the zip entry's against the archive and its compressed size, the
    .npy header's shape x itemsize against the entry's. Only plain numeric dtypes are read,
    never pickled objects."""
    key = member.removesuffix(".npy")
    where = f"{path} [{key}]"
    info = archive.getinfo(member)
    ratio = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: _DEFLATE_MAX_RATIO}.get(
        info.compress_type
    )
    if ratio is None:
        raise DataError(
            f"{where}: zip compression method {info.compress_type} is not supported; expected "
            f"stored or deflated members. Hint: write it with numpy.savez or savez_compressed."
        )
    if info.compress_size > size or info.file_size > ratio * info.compress_size:
        raise DataError(
            f"{where}: corrupt zip entry: it claims {info.file_size} bytes, from "
            f"{info.compress_size} bytes stored in an archive of {size} bytes."
        )
    with archive.open(info) as stream:
        try:
            version = np.lib.format.read_magic(stream)
            if version not in _NPY_HEADER_READERS:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
        except ValueError as error:
            raise DataError(
                f"{where}: not a valid .npy array ({error}). Hint: write it with numpy.savez."
            ) from None
        if dtype.hasobject:
            raise DataError(
                f"{where}: cannot read the arrays without pickle (dtype {dtype} holds Python "
                f"objects). Hint: save plain numeric arrays with numpy.savez."
            )
        if dtype.kind not in "biuf":
            what = "labels" if key.startswith("y") else "samples"
            raise DataError(
                f"{where}: expected numeric {what} (a bool, integer or float array), got "
                f"dtype {dtype}."
            )
        hint = "Hint: the file is corrupt; write it again with numpy.savez."
        if any(n < 0 for n in shape):
            raise DataError(f"{where}: the .npy header announces a negative size: {shape}. {hint}")
        payload = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        announced = f"the .npy header announces shape {shape} of {dtype} ({payload} bytes)"
        stored = info.file_size - stream.tell()
        if payload != stored:
            raise DataError(
                f"{where}: {announced}, the archive holds {stored} bytes of data for it. {hint}"
            )
        if payload > MAX_ARRAY_BYTES:
            raise DataError(
                f"{where}: {announced}, more than MAX_ARRAY_BYTES = {MAX_ARRAY_BYTES}. Hint: "
                f"the lab loads data sets whole; use a smaller one."
            )
        data = _read_at_most(stream, payload)
    if len(data) != payload:
        raise DataError(f"{where}: truncated: {announced}, read {len(data)}.")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


# ---------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def load_idx_folder(folder: str | os.PathLike, name: str = "mnist") -> Dataset:
    """Read the four MNIST-style IDX files (raw or gzipped) in ``folder``."""
    folder = Path(folder)
    files, arrays = {}, {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise DataError(f"{folder / stem}[.gz]: no such file.")
        files[key] = path
        arrays[key] = read_idx(path, ndim=3 if key.startswith("x") else 1)
    return _make_dataset(folder, name, arrays, MNIST_CLASSES, files=files)


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw), checking its magic number, its dimensions
    against ``ndim`` when given, and that its size matches its header exactly."""
    path = Path(path)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file.") from None
    with file:
        gzipped = path.suffix == ".gz" or file.read(2) == b"\x1f\x8b"
        file.seek(0)
        if not gzipped:
            return _read_idx_stream(path, file, os.fstat(file.fileno()).st_size, ndim)
        try:
            with gzip.GzipFile(fileobj=file) as stream:
                return _read_idx_stream(path, stream, None, ndim)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(
                f"{path}: not a valid gzip file (truncated or corrupt: {error})."
            ) from None


def _read_idx_stream(
    path: Path, stream: BinaryIO, size: int | None, ndim: int | None
) -> np.ndarray:
    """The IDX array in ``stream``; ``size`` is the file's size, or None for a gzip stream
    (whose size only decompressing would tell): then the data is read with a cap of what the
    header announces, itself bounded by MAX_ARRAY_BYTES, so a bomb cannot allocate more."""
    once = "" if size is not None else " once decompressed"
    magic = stream.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: truncated: {len(magic)} bytes, shorter than the IDX header.")
    zero, type_code, dims = struct.unpack(">HBB", magic)
    if zero != 0 or type_code not in _IDX_DTYPES or dims == 0:
        raise DataError(
            f"{path}: bad magic number 0x{magic.hex()}; an IDX file starts with two zero "
            f"bytes, a type code in {[hex(c) for c in _IDX_DTYPES]} and the number of "
            f"dimensions (MNIST images: 0x00000803, labels: 0x00000801)."
        )
    if ndim is not None and dims != ndim:
        kind = "images (N, rows, cols)" if ndim == 3 else "labels (N,)"
        raise DataError(
            f"{path}: expected {ndim}-D {kind}, the header says {dims}-D (magic "
            f"0x{magic.hex()}). Hint: are image and label files swapped?"
        )
    header = 4 + 4 * dims
    sizes = stream.read(4 * dims)
    if len(sizes) < 4 * dims:
        raise DataError(
            f"{path}: truncated inside the header ({4 + len(sizes)} of {header} bytes{once})."
        )
    shape = struct.unpack(f">{dims}I", sizes)
    dtype = _IDX_DTYPES[type_code]
    payload = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    expected = header + payload
    announced = f"the header announces shape {shape} ({expected} bytes)"
    if size is not None and size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise DataError(f"{path}: {problem}: {announced}, the file has {size} bytes.")
    if payload > MAX_ARRAY_BYTES:
        raise DataError(
            f"{path}: {announced}{once}, more than MAX_ARRAY_BYTES = {MAX_ARRAY_BYTES} bytes "
            f"of data. Hint: the header is probably corrupt; the lab loads data sets whole."
        )
    data = _read_at_most(stream, payload + 1)  # a byte more than announced: trailing bytes?
    if len(data) < payload:
        raise DataError(
            f"{path}: truncated: {announced}, the file has {header + len(data)} bytes{once}."
        )
    if len(data) > payload:
        raise DataError(f"{path}: has trailing bytes: {announced}, the file has more{once}.")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------
# Checks shared by every format

#: Size of the pieces :func:`_read_at_most` reads.
_CHUNK_BYTES = 1 << 20


def _read_at_most(stream: BinaryIO, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``stream``, read in pieces: memory follows the data actually
    there, not the claim (one big read would allocate ``limit`` bytes at once)."""
    data = bytearray()
    while len(data) < limit:
        chunk = stream.read(min(_CHUNK_BYTES, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data


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
