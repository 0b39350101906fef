"""Readers of the data files the lab takes: MNIST / Fashion-MNIST IDX files (raw or
gzipped) and ``.npz`` archives with ``x_train, y_train, x_test, y_test`` (Keras'
``mnist.npz`` has this layout).

Every file is checked as it is read, and a broken one raises
:class:`~batchnorm.lab.dataset.DataError` naming the file and the problem (bad magic number,
truncated file, count mismatch, missing key, label out of range, ...). Every size a header
announces is checked against the file (or bounded, when only decompressing would tell)
before anything of that size is allocated, so a crafted file cannot exhaust memory.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from batchnorm.lab.dataset import DataError, Dataset, _make_dataset

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
# Reading a stream with a bound

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
