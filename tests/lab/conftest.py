"""Fixtures of the lab's tests: a private cache for MNIST-1D and small data sets on disk."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from batchnorm.cli import main
from batchnorm.lab.data import Dataset, load_npz


@pytest.fixture(scope="session")
def mnist1d_cache(tmp_path_factory):
    """A cache folder for the whole session, so MNIST-1D is generated once and the user's
    own cache is never touched."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture
def cache_env(mnist1d_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(mnist1d_cache))
    return mnist1d_cache


def blobs(train=240, test=60, features=8, classes=3, seed=0, dtype=np.float32):
    """A learnable classification problem: Gaussian clusters around random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2, (classes, features))
    arrays = {}
    for split, n in (("train", train), ("test", test)):
        y = rng.integers(0, classes, n)
        arrays[f"x_{split}"] = (centres[y] + rng.normal(0, 1, (n, features))).astype(dtype)
        arrays[f"y_{split}"] = y.astype(np.int64)
    return arrays


@pytest.fixture(name="blobs")
def blobs_fixture():
    """The function :func:`blobs`, for tests that write their own variants."""
    return blobs


@pytest.fixture
def blobs_npz(tmp_path):
    """A small .npz data set (240 train / 60 test, 8 features, 3 classes) and its path."""
    path = tmp_path / "blobs.npz"
    np.savez(path, **blobs())
    return path


@pytest.fixture
def blobs_data(blobs_npz) -> Dataset:
    return load_npz(blobs_npz)


def _quick_run(tmp_path_factory, cache, experiment):
    """``batchnorm reproduce EXPERIMENT --quick`` once per session (the findings tests and the
    browser test share it): (report folder, metrics, printed text)."""
    out = tmp_path_factory.mktemp(experiment)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("XDG_CACHE_HOME", str(cache))
        assert main(["reproduce", experiment, "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "metrics.json").read_text()), printed.getvalue()


@pytest.fixture(scope="session")
def santurkar_quick(tmp_path_factory, mnist1d_cache):
    return _quick_run(tmp_path_factory, mnist1d_cache, "santurkar2018")


@pytest.fixture(scope="session")
def renorm_quick(tmp_path_factory, mnist1d_cache):
    return _quick_run(tmp_path_factory, mnist1d_cache, "renorm2017")
