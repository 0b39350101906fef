"""Building the C++ backend (batchnorm.backends.cpp_cpu): where a compiler is found it
builds, a later process loads it silently, ``BATCHNORM_CPP=0`` turns it off, a failed build
warns once and leaves the calls on ATen, and ``batchnorm compile`` builds it. Most of these
run in fresh processes."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from batchnorm.backends import cpp_cpu
from batchnorm.backends.cpp_cpu import extension


def test_it_builds_wherever_a_compiler_is_found():
    """test_cpp_cpu.py skips where the extension did not build (no compiler: the backend is
    optional, its calls then run on the Numba kernels and ATen). Where one is found, as on
    our machines and in CI, it must build, so that the skip never hides a broken build."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    assert extension() is not None or compiler is None, cpp_cpu.outcome


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


RUN = """
    import torch, batchnorm
    from batchnorm import ops
    from batchnorm.backends import Call
    x = torch.randn(64, 8) + 3
    print(ops.select(Call(x, True, "identity", 0.01, False)).name)
    y = batchnorm.BatchNorm1d(8)(x)
    print(float((y - torch.nn.BatchNorm1d(8)(x)).abs().max()) < 1e-5)
"""


# Skips only where no compiler is found (the backend is optional there): with a compiler,
# test_it_builds_wherever_a_compiler_is_found fails instead, so a broken build cannot hide.
@pytest.mark.skipif(extension() is None, reason="nothing to load: see the test above")
def test_a_built_extension_loads_without_a_notice_and_the_switch_turns_it_off():
    loaded = _python(RUN)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["cpp_cpu", "True"]
    assert "building the C++ kernels" not in loaded.stderr
    off = _python(RUN, BATCHNORM_CPP="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["aten", "True"]


def test_a_first_call_in_inference_mode_leaves_later_training_working():
    """Nothing the node keeps across calls may come from inference mode, which autograd
    could not save later: a first call in inference mode, then a training step (this
    failed with a placeholder tensor for the absent arguments made by the first call)."""
    done = _python(
        """
        import torch, batchnorm
        layer = batchnorm.BatchNorm1d(8, affine=False, track_running_stats=False)
        with torch.inference_mode():
            layer(torch.randn(64, 8))
        x = torch.randn(64, 8, requires_grad=True)
        layer(x).pow(3).sum().backward()
        print(x.grad.shape)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch.Size([64,", "8])"]


def test_a_failed_build_warns_once_and_leaves_the_calls_on_aten(tmp_path):
    """No compiler (CXX names none) and an empty cache: a warning with a hint, then the
    calls run on ATen with the right results."""
    failed = _python(
        RUN + "    print(batchnorm.BatchNorm1d(8)(x).shape)\n",
        CXX=str(tmp_path / "no-compiler"),
        XDG_CACHE_HOME=str(tmp_path),
        PYTHONWARNINGS="always",
    )
    assert failed.returncode == 0, failed.stderr
    assert failed.stdout.split()[:2] == ["aten", "True"]
    assert failed.stderr.count("the C++ kernels could not be built") == 1
    assert "BATCHNORM_CPP=0" in failed.stderr


def test_calls_on_other_devices_never_build_it(tmp_path):
    """The backend takes CPU inputs only, so a call on another device (a GPU's; here the
    meta device) neither builds the extension (1-2 minutes) nor, without a compiler, warns
    that it cannot be built."""
    done = _python(
        """
        import torch, batchnorm
        from batchnorm.backends import cpp_cpu
        layer = batchnorm.BatchNorm1d(8).to("meta")
        print(layer(torch.empty(64, 8, device="meta")).device, cpp_cpu.outcome)
        """,
        CXX=str(tmp_path / "no-compiler"),
        XDG_CACHE_HOME=str(tmp_path),
        PYTHONWARNINGS="always",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["meta", "not", "needed", "yet"]
    assert "C++ kernels" not in done.stderr


# Skips only where no compiler is found, as the loading test above (same guard).
@pytest.mark.skipif(extension() is None, reason="no compiler: see the first test")
def test_batchnorm_compile_builds_or_loads_it(capsys):
    from batchnorm.cli.compile import _build_cpp

    _build_cpp()
    printed = capsys.readouterr().out
    assert "C++ kernels ((N, C) and channels-last): " in printed
    assert "built" in printed or "loaded from the cache" in printed


def test_the_ninja_package_is_found_without_a_system_ninja(monkeypatch):
    """torch's build runs ninja from PATH: a venv's python run by its path (PATH without
    the venv) on a machine without a system ninja still finds the dependency's."""
    from torch.utils.cpp_extension import is_ninja_available

    from batchnorm.backends.cpp_cpu import _find_ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    assert not is_ninja_available()
    _find_ninja()
    assert is_ninja_available()
