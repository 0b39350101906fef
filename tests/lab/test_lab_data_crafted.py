"""Crafted data files (the fuzzer's finds and their relatives): headers that announce huge or
overflowing sizes, truncated payloads, pickled or non-numeric dtypes, lying zip entries,
gzip bombs, huge and negative labels, empty arrays. Every loader (IDX raw and gzipped,
Keras' mnist.npz, any .npz, the MNIST-1D cache) must refuse each with a DataError that says
what is wrong, quickly and without allocating what the header claims."""

from __future__ import annotations

import gzip
import io
import struct
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

from batchnorm.lab import data as lab_data
from batchnorm.lab.data import DataError, load_dataset, load_npz, read_idx

#: Most memory one refused load may allocate (traced by tracemalloc, numpy's included);
#: the crafted files claim gigabytes to terabytes.
PEAK_BYTES = 32 * 2**20
#: Generous, for a loaded machine: a refusal reads a few kilobytes.
SECONDS = 10.0


def refused(load, *args, **kwargs) -> str:
    """The DataError message of ``load(*args, **kwargs)``, checking that it came fast and
    without a large allocation."""
    start = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as error:
            load(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"allocated {peak} bytes before refusing: {error.value}"
    assert time.monotonic() - start < SECONDS
    return str(error.value)


# ---------------------------------------------------------------------------------------
# IDX


def idx(code: int, shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    """An IDX file: magic (two zero bytes, type code, rank), big-endian sizes, data."""
    return (
        struct.pack(">HBB", 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + payload
    )


def write(path, blob: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


U8, I32 = 0x08, 0x0C
BIG = 2**32 - 1  # the largest size an IDX header can hold

#: case: (ndim, file bytes, message for the raw file, message for the gzipped file).
IDX_CASES = {
    # 2**96 bytes: the file is far too short; decompressed, the claim is over the bound.
    "huge shape": (
        3, idx(U8, (BIG, BIG, BIG)),
        "truncated: the header announces shape (4294967295, 4294967295, 4294967295) "
        "(79228162458924105385300197391 bytes), the file has 16 bytes.",
        "(79228162458924105385300197391 bytes) once decompressed, more than MAX_ARRAY_BYTES",
    ),
    # 2**31 * 2**31 * 4 = 2**64: 0 in int64 arithmetic, which once passed for an empty file.
    "product wraps to zero in int64": (
        3, idx(U8, (2**31, 2**31, 4)),
        "truncated: the header announces shape (2147483648, 2147483648, 4) "
        "(18446744073709551632 bytes), the file has 16 bytes.",
        "(18446744073709551632 bytes) once decompressed, more than MAX_ARRAY_BYTES",
    ),
    # A claim under the bound: the gzipped file is read with a cap and found short.
    "claim under the bound, little data": (
        1, idx(U8, (BIG,), b"\x01" * 10),
        "truncated: the header announces shape (4294967295,) (4294967303 bytes), the file "
        "has 18 bytes.",
        "truncated: the header announces shape (4294967295,) (4294967303 bytes), the file "
        "has 18 bytes once decompressed.",
    ),
    "int32 labels over the bound": (
        1, idx(I32, (BIG,)),
        "truncated: the header announces shape (4294967295,) (17179869188 bytes)",
        "more than MAX_ARRAY_BYTES = 4294967296 bytes of data",
    ),
    "truncated payload": (
        3, idx(U8, (3, 4, 3), b"\x00" * 20),
        "truncated: the header announces shape (3, 4, 3) (52 bytes), the file has 36 bytes.",
        "the file has 36 bytes once decompressed.",
    ),
    "truncated sizes": (
        3, idx(U8, (3, 4, 3))[:9],
        "truncated inside the header (9 of 16 bytes).",
        "truncated inside the header (9 of 16 bytes once decompressed).",
    ),
}  # fmt: skip


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("case", list(IDX_CASES))
def test_crafted_idx_is_refused(tmp_path, case, gz):
    ndim, blob, raw_message, gz_message = IDX_CASES[case]
    path = write(tmp_path / "crafted-idx", blob, gz)
    message = refused(read_idx, path, ndim=ndim)
    assert message.startswith(f"{path}: ")
    assert (gz_message if gz else raw_message) in message, message


def test_gzip_bomb_is_read_only_up_to_its_claim(tmp_path):
    """64 MiB of zeros after a header announcing 144 bytes: reading stops one byte past."""
    path = tmp_path / "bomb-idx.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx(U8, (12, 4, 3)))
        zeros = bytes(2**20)
        for _ in range(64):
            f.write(zeros)
    message = refused(read_idx, path, ndim=3)
    assert "has trailing bytes: the header announces shape (12, 4, 3) (160 bytes)" in message
    assert "the file has more once decompressed" in message


def write_mnist_folder(folder, images: bytes, labels: bytes, gz: bool = False) -> None:
    """The four MNIST files: ``images``/``labels`` for train and test alike."""
    for key, stem in lab_data.IDX_FILES.items():
        write(folder / stem, images if key.startswith("x") else labels, gz)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (idx(U8, (0, 4, 3)), idx(U8, (0,)), "train-images-idx3-ubyte{gz}: no samples."),
        (idx(U8, (2, 0, 3)), idx(U8, (2,), b"\x01\x02"),
         "train-images-idx3-ubyte{gz}: the samples have no features (shape (2, 0, 3))."),
        (idx(U8, (2, 4, 3), bytes(24)), idx(U8, (2,), b"\x01\xff"),
         "train-labels-idx1-ubyte{gz}: label out of range: y_train[1] = 255, expected 0..9."),
    ],
    ids=["empty", "no features", "label 255"],
)  # fmt: skip
def test_crafted_mnist_folder_is_refused(tmp_path, images, labels, message, gz):
    write_mnist_folder(tmp_path, images, labels, gz)
    assert message.format(gz=".gz" if gz else "") in refused(load_dataset, "mnist", tmp_path)


# ---------------------------------------------------------------------------------------
# .npz (any, Keras' mnist.npz, the MNIST-1D cache)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], descr: str, payload: bytes = b"") -> bytes:
    """A .npy file with any header: numpy writes what it is given, checked or not."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def small_arrays(train: int = 6, test: int = 4, features: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(train, features)).astype(np.float32),
        "y_train": np.arange(train, dtype=np.int64) % 3,
        "x_test": rng.normal(size=(test, features)).astype(np.float32),
        "y_test": np.arange(test, dtype=np.int64) % 3,
    }


def write_npz(path, members: dict[str, bytes | np.ndarray], compression=zipfile.ZIP_STORED):
    """A .npz of the small arrays, with ``members`` (arrays or raw .npy bytes) in their
    place."""
    contents = {**small_arrays(), **members}
    with zipfile.ZipFile(path, "w", compression) as archive:
        for key, value in contents.items():
            blob = value if isinstance(value, bytes) else npy(value)
            archive.writestr(f"{key}.npy", blob)
    return path


def lie_about_size(path, member: str, file_size: int) -> None:
    """Patch the central directory so that ``member`` claims ``file_size`` bytes."""
    blob = bytearray(path.read_bytes())
    start = blob.find(b"PK\x01\x02")
    while start != -1:
        name_length = struct.unpack_from("<H", blob, start + 28)[0]
        if blob[start + 46 : start + 46 + name_length] == member.encode():
            struct.pack_into("<I", blob, start + 24, file_size)
            path.write_bytes(bytes(blob))
            return
        start = blob.find(b"PK\x01\x02", start + 4)
    raise AssertionError(f"no central directory entry for {member}")


def _labels(**changes) -> dict[str, np.ndarray]:
    arrays = small_arrays()
    for key, (index, value, dtype) in changes.items():
        y = arrays[key].astype(dtype)
        y[index] = value
        arrays[key] = y
    return arrays


#: case: (members replacing the small arrays', [key named in the message, message]).
NPZ_CASES = {
    # The fuzzer's 500-byte file: numpy would first allocate 44 TiB.
    "huge shape": (
        {"x_train": npy_header((10**12, 6), "<f8")},
        "[x_train]: the .npy header announces shape (1000000000000, 6) of float64 "
        "(48000000000000 bytes), the archive holds 0 bytes of data for it.",
    ),
    "product overflows int64": (
        {"x_train": npy_header((2**32, 2**32), "|u1")},
        "[x_train]: the .npy header announces shape (4294967296, 4294967296) of uint8 "
        "(18446744073709551616 bytes), the archive holds 0 bytes",
    ),
    "truncated payload": (
        {"x_test": npy_header((4, 3), "<f4", bytes(20))},
        "[x_test]: the .npy header announces shape (4, 3) of float32 (48 bytes), the archive "
        "holds 20 bytes",
    ),
    "negative dimension": (
        {"x_train": npy_header((-6, 3), "<f4")},
        "[x_train]: the .npy header announces a negative size: (-6, 3).",
    ),
    "object dtype": (
        {"x_train": npy_header((6, 3), "|O", b"not a pickle")},
        "[x_train]: cannot read the arrays without pickle (dtype object holds Python objects)",
    ),
    "text samples": (
        {"x_train": npy_header((6, 3), "<U1", bytes(72))},
        "[x_train]: expected numeric samples (a bool, integer or float array), got dtype <U1.",
    ),
    "complex labels": (
        {"y_train": npy_header((6,), "<c8", bytes(48))},
        "[y_train]: expected numeric labels (a bool, integer or float array), got dtype complex64.",
    ),
    "structured samples": (
        {"x_train": npy_header((6,), [("a", "<f4"), ("b", "<f4")], bytes(48))},
        "[x_train]: expected numeric samples",
    ),
    "not a .npy member": ({"x_train": b"just some bytes"}, "[x_train]: not a valid .npy array"),
    "huge label": (
        _labels(y_train=(2, 2**40, np.int64)),
        "[y_train]: label out of range: y_train[2] = 1099511627776, expected 0..99999 (at "
        "most MAX_CLASSES = 100000 classes: the model has one output per class). Hint: labels "
        "are class indices 0..K-1",
    ),
    "uint64 label above int64": (
        _labels(y_test=(1, 2**64 - 1, np.uint64)),
        "[y_test]: label out of range: y_test[1] = 18446744073709551615, expected 0..99999",
    ),
    "label just over MAX_CLASSES": (
        _labels(y_train=(0, lab_data.MAX_CLASSES, np.int64)),
        "[y_train]: label out of range: y_train[0] = 100000, expected 0..99999",
    ),
    "huge negative label": (
        _labels(y_test=(3, -(2**40), np.int64)),
        "[y_test]: label out of range: y_test[3] = -1099511627776, expected 0..2. Hint:",
    ),
    "empty arrays": (
        {"x_test": np.zeros((0, 3), np.float32), "y_test": np.zeros(0, np.int64)},
        "[x_test]: no samples.",
    ),
    "no features": (
        {"x_train": np.zeros((6, 0), np.float32), "x_test": np.zeros((4, 0), np.float32)},
        "[x_train]: the samples have no features (shape (6, 0)).",
    ),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_crafted_npz_is_refused(tmp_path, case):
    members, message = NPZ_CASES[case]
    path = write_npz(tmp_path / "crafted.npz", members)
    assert f"{path} {message}" in refused(load_npz, path)


def test_npz_of_small_arrays_still_loads(tmp_path):
    """The crafting helpers write files that load, so each refusal is due to its change."""
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        data = load_npz(write_npz(tmp_path / "fine.npz", {}, compression))
        assert (len(data.x_train), data.num_features, data.num_classes) == (6, 3, 3)
    fortran = np.asfortranarray(np.arange(12, dtype=">f8").reshape(6, 2))
    members = {"x_train": fortran, "x_test": fortran[:4]}
    data = load_npz(write_npz(tmp_path / "fortran.npz", members))
    assert data.x_train.tolist() == fortran.tolist()


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
def test_zip_entry_claiming_more_than_it_can_hold(tmp_path, compression):
    """A central directory claiming ~4 GiB for a member of a few hundred bytes: stored data
    is never larger than its compressed size, deflated data at most 1032 times."""
    path = write_npz(tmp_path / "lying.npz", {}, compression)
    lie_about_size(path, "x_train.npy", 2**32 - 256)
    message = refused(load_npz, path)
    assert f"{path} [x_train]: corrupt zip entry: it claims 4294967040 bytes, from " in message


def test_unsupported_zip_compression(tmp_path):
    path = write_npz(tmp_path / "bz2.npz", {}, zipfile.ZIP_BZIP2)
    message = refused(load_npz, path)
    assert "zip compression method 12 is not supported; expected stored or deflated" in message


def test_crafted_keras_mnist_npz(tmp_path):
    write_npz(tmp_path / "mnist.npz", {"x_train": npy_header((10**12, 6), "<f8")})
    message = refused(load_dataset, "mnist", tmp_path)
    assert f"{tmp_path / 'mnist.npz'} [x_train]: the .npy header announces shape" in message


def test_crafted_mnist1d_cache_is_regenerated(tmp_path, monkeypatch, capsys):
    """A crafted cache file is refused like any other and regenerated (here: small arrays
    stand in for MNIST-1D, and the cache is this test's own)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(lab_data, "_generate_mnist1d", small_arrays)
    lab_data.load_mnist1d(quiet=True)
    (path,) = (tmp_path / "batchnorm").glob("mnist1d-*.npz")
    write_npz(path, {"x_train": npy_header((10**12, 6), "<f8")})
    tracemalloc.start()
    try:
        data = lab_data.load_mnist1d(quiet=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES
    note = capsys.readouterr().err
    assert "regenerating MNIST-1D" in note and "shape (1000000000000, 6)" in note
    assert len(data.x_train) == 6 and lab_data.load_npz(path).num_features == 3
