"""Data loaders: MNIST-1D generation and cache, IDX files (raw and gzipped), .npz files, and
every way such a file can be broken."""

from __future__ import annotations

import gzip
import random
import struct

import numpy as np
import pytest
import torch

from batchnorm.lab import data as lab_data
from batchnorm.lab.data import DataError, load_dataset, load_npz, read_idx

# ---------------------------------------------------------------------------------------
# Writing IDX files the way the MNIST distribution does (big-endian header, then data).

_TYPE_CODES = {np.uint8: 0x08, np.int16: 0x0B, np.float32: 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    code = _TYPE_CODES[array.dtype.type]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array=None, raw: bytes | None = None, gz: bool = False):
    payload = idx_bytes(array) if raw is None else raw
    if gz:
        payload = gzip.compress(payload)
        path = path.with_name(path.name + ".gz")
    path.write_bytes(payload)
    return path


def mnist_arrays(train=12, test=5, rows=4, cols=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (train, rows, cols), dtype=np.uint8),
        "y_train": rng.integers(0, 10, train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (test, rows, cols), dtype=np.uint8),
        "y_test": rng.integers(0, 10, test).astype(np.uint8),
    }


def write_mnist(folder, arrays=None, gz=False, overrides=None):
    """The four MNIST files in ``folder``; ``overrides`` maps a key to raw bytes."""
    arrays = arrays or mnist_arrays()
    overrides = overrides or {}
    paths = {}
    for key, stem in lab_data.IDX_FILES.items():
        paths[key] = write_idx(folder / stem, arrays.get(key), overrides.get(key), gz=gz)
    return paths


# ---------------------------------------------------------------------------------------
# IDX: what loads


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_folder_loads_the_arrays_written(tmp_path, gz, name):
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays, gz=gz)
    data = load_dataset(name, tmp_path)
    assert data.num_classes == 10 and data.num_features == 12
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        expected = torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255)
        torch.testing.assert_close(getattr(data, f"x_{split}"), expected)
        assert getattr(data, f"y_{split}").dtype == torch.int64
        assert getattr(data, f"y_{split}").tolist() == arrays[f"y_{split}"].tolist()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_read_idx_other_types(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) * 7 - 50).astype(dtype)
    if dtype is np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a.idx", array)
    out = read_idx(path, ndim=3)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


# ---------------------------------------------------------------------------------------
# IDX: every way to break a file. Each error names the file and the problem.


def _header(code=0x08, dims=(12, 4, 3)):
    return struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def _broken(case: str) -> tuple[str, bytes]:
    """(key of the broken file, its bytes) for each corruption."""
    a = mnist_arrays()
    images = idx_bytes(a["x_train"])
    if case == "bad magic":
        return "x_train", b"\x12\x34" + images[2:]
    if case == "unknown type code":
        return "x_train", images[:2] + b"\x07" + images[3:]
    if case == "zero dimensions":
        return "x_train", images[:3] + b"\x00"
    if case == "shorter than a header":
        return "x_train", images[:3]
    if case == "truncated header":
        return "x_train", images[:10]
    if case == "truncated data":
        return "x_train", images[:-5]
    if case == "trailing bytes":
        return "x_train", images + b"\x00\x00"
    if case == "swapped files":
        return "y_train", images
    raise AssertionError(case)


IDX_CASES = {
    "bad magic": "bad magic number 0x12340803",
    "unknown type code": "bad magic number",
    "zero dimensions": "bad magic number",
    "shorter than a header": "truncated",
    "truncated header": "truncated inside the header",
    "truncated data": "truncated: the header announces shape (12, 4, 3)",
    "trailing bytes": "has trailing bytes",
    "swapped files": "expected 1-D labels",
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("case", list(IDX_CASES))
def test_corrupt_idx_file_names_file_and_problem(tmp_path, case, gz):
    key, raw = _broken(case)
    paths = write_mnist(tmp_path, gz=gz, overrides={key: raw})
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path)
    message = str(error.value)
    assert str(paths[key]) in message
    assert IDX_CASES[case] in message


@pytest.mark.parametrize("damage", ["cut", "not gzip"])
def test_broken_gzip(tmp_path, damage):
    paths = write_mnist(tmp_path, gz=True)
    path = paths["x_test"]
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "cut" else b"plain bytes, no gzip")
    with pytest.raises(DataError, match="not a valid gzip file") as error:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(error.value)


def test_count_mismatch_between_images_and_labels(tmp_path):
    arrays = mnist_arrays()
    arrays["y_test"] = arrays["y_test"][:-1]
    paths = write_mnist(tmp_path, arrays)
    with pytest.raises(DataError, match="count mismatch: 5 samples in x_test but 4 labels") as e:
        load_dataset("mnist", tmp_path)
    assert str(paths["y_test"]) in str(e.value)


def test_label_out_of_range(tmp_path):
    arrays = mnist_arrays()
    arrays["y_train"][3] = 10
    paths = write_mnist(tmp_path, arrays)
    with pytest.raises(
        DataError, match=r"label out of range: y_train\[3\] = 10, expected 0..9"
    ) as e:
        load_dataset("mnist", tmp_path)
    assert str(paths["y_train"]) in str(e.value)


def test_train_and_test_image_sizes_differ(tmp_path):
    arrays = mnist_arrays()
    arrays["x_test"] = arrays["x_test"][:, :3, :]
    write_mnist(tmp_path, arrays)
    with pytest.raises(
        DataError, match=r"test samples have shape \(3, 3\), train samples \(4, 3\)"
    ):
        load_dataset("mnist", tmp_path)


def test_missing_files_are_listed(tmp_path):
    paths = write_mnist(tmp_path)
    paths["y_test"].unlink()
    paths["x_test"].unlink()
    with pytest.raises(DataError) as error:
        load_dataset("fashion-mnist", tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "t10k-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte[.gz]" in message
    assert "train-images" not in message


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="found no folder"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar", tmp_path)


# ---------------------------------------------------------------------------------------
# .npz


def test_npz_float_features_are_kept(tmp_path, blobs):
    arrays = blobs(dtype=np.float64)
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_dataset("npz", tmp_path / "d.npz")
    assert data.num_classes == 3 and data.num_features == 8
    assert data.x_train.dtype == torch.float32
    torch.testing.assert_close(data.x_train, torch.from_numpy(arrays["x_train"]).float())
    assert data.y_test.tolist() == arrays["y_test"].tolist()


def test_keras_mnist_npz_in_folder(tmp_path):
    a = mnist_arrays()  # Keras' mnist.npz: uint8 images (N, 28, 28), uint8 labels
    np.savez(tmp_path / "mnist.npz", **a)
    data = load_dataset("mnist", tmp_path)
    assert data.num_classes == 10
    expected = torch.from_numpy(a["x_test"].reshape(5, -1).astype(np.float32) / 255)
    torch.testing.assert_close(data.x_test, expected)
    assert data.y_train.tolist() == a["y_train"].tolist()


def test_npz_folder_with_one_file(tmp_path, blobs):
    np.savez(tmp_path / "only.npz", **blobs())
    assert load_dataset("npz", tmp_path).source == str(tmp_path / "only.npz")
    np.savez(tmp_path / "second.npz", **blobs())
    with pytest.raises(DataError, match="found 2 .npz files"):
        load_dataset("npz", tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_dataset("npz", tmp_path / "missing.npz")


def _npz_case(case: str, path, blobs):
    arrays = blobs()
    if case == "missing keys":
        arrays["images"] = arrays.pop("x_train")
        arrays["labels"] = arrays.pop("y_test")
    elif case == "count mismatch":
        arrays["y_train"] = arrays["y_train"][:-2]
    elif case == "negative label":
        arrays["y_test"][7] = -1
    elif case == "float labels":
        arrays["y_train"] = arrays["y_train"].astype(np.float32)
    elif case == "one-hot labels":
        arrays["y_train"] = np.eye(3, dtype=np.int64)[arrays["y_train"]]
    elif case == "NaN features":
        arrays["x_test"][2, 1] = np.nan
    elif case == "1-D features":
        arrays["x_train"] = arrays["x_train"][:, 0]
    elif case == "no samples":
        arrays["x_test"], arrays["y_test"] = arrays["x_test"][:0], arrays["y_test"][:0]
    elif case == "text features":
        arrays["x_train"] = np.full(arrays["x_train"].shape, "a")
    elif case == "feature mismatch":
        arrays["x_test"] = arrays["x_test"][:, :5]
    elif case == "object array":
        arrays["x_train"] = np.array([np.zeros(2), np.zeros(3)], dtype=object)
        np.savez(path, **arrays)  # np.savez pickles object arrays; we refuse to unpickle
        return
    np.savez(path, **arrays)


NPZ_CASES = {
    "missing keys": "missing arrays ['x_train', 'y_test']; found ['images', 'labels', 'x_test', "
    "'y_train']",
    "count mismatch": "count mismatch: 240 samples in x_train but 238 labels",
    "negative label": "label out of range: y_test[7] = -1",
    "float labels": "expected integer class labels of shape (N,), got float32",
    "one-hot labels": "y.argmax(axis=1)",
    "NaN features": "contains NaN or infinite values",
    "1-D features": "at least 2 dimensions, got shape (240,)",
    "no samples": "no samples",
    "text features": "expected numeric samples",
    "feature mismatch": "test samples have shape (5,), train samples (8,)",
    "object array": "cannot read the arrays without pickle",
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_corrupt_npz_names_file_and_problem(tmp_path, case, blobs):
    path = tmp_path / "bad.npz"
    _npz_case(case, path, blobs)
    with pytest.raises(DataError) as error:
        load_npz(path)
    message = str(error.value)
    assert str(path) in message
    assert NPZ_CASES[case] in message


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "empty"])
def test_unreadable_npz(tmp_path, damage, blobs):
    path = tmp_path / "bad.npz"
    np.savez(path, **blobs())
    blob = path.read_bytes()
    content = {"truncated": blob[: len(blob) // 2], "not a zip": b"hello" * 10, "empty": b""}
    path.write_bytes(content[damage])
    with pytest.raises(DataError, match="not a readable .npz archive") as error:
        load_npz(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------
# MNIST-1D


def test_mnist1d_is_generated_once_cached_and_equal_to_mnist1d(cache_env, monkeypatch):
    from mnist1d.data import get_dataset_args, make_dataset

    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    data = load_dataset("mnist1d", quiet=True)
    # Generating reseeds mnist1d's global generators; the loader puts them back.
    assert (random.random(), np.random.random()) == before

    files = list((cache_env / "batchnorm").glob("mnist1d-*.npz"))
    assert len(files) == 1 and data.source == str(files[0])
    assert (len(data.x_train), len(data.x_test), data.num_features, data.num_classes) == (
        4000, 1000, 40, 10,
    )  # fmt: skip
    reference = make_dataset(get_dataset_args())
    torch.testing.assert_close(data.x_train, torch.from_numpy(reference["x"]).float())
    torch.testing.assert_close(data.x_test, torch.from_numpy(reference["x_test"]).float())
    assert data.y_train.tolist() == reference["y"].tolist()
    assert data.y_test.tolist() == reference["y_test"].tolist()

    # The second load reads the cache (generating again would fail here).
    def no_generation():
        raise AssertionError("generated again")

    monkeypatch.setattr(lab_data, "_generate_mnist1d", no_generation)
    again = load_dataset("mnist1d")
    assert torch.equal(again.x_train, data.x_train)


def test_damaged_mnist1d_cache_is_regenerated(cache_env, capsys):
    load_dataset("mnist1d", quiet=True)
    (path,) = (cache_env / "batchnorm").glob("mnist1d-*.npz")
    good = path.read_bytes()
    path.write_bytes(good[:1000])
    data = load_dataset("mnist1d", quiet=True)
    assert "regenerating MNIST-1D" in capsys.readouterr().err
    assert len(data.x_train) == 4000 and path.read_bytes() == good


def test_dataset_to_device_and_describe(blobs_data):
    moved = blobs_data.to("cpu")
    assert torch.equal(moved.x_train, blobs_data.x_train)
    assert blobs_data.describe() == "npz: 240 train / 60 test samples, 8 features, 3 classes"
