"""The Makefile's set-up, dry-run (``make -n``) in a copy of the files it reads: ``make demo``
installs the ``lab`` extra only; ``make test`` the ``dev`` extra too, whether ``make demo``
ran first or not."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# An environment guard: the README's commands need make, which CI and our machines have.
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(folder: Path, target: str) -> list[str]:
    done = subprocess.run(["make", "-n", target], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if "pip install" in line and "-e" in line]


def _stamp(folder: Path, name: str) -> None:
    """What a real install leaves: .venv's python and the stamp, newer than the inputs."""
    (folder / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    (folder / ".venv" / name).touch()
    later = time.time() + 10
    os.utime(folder / ".venv" / name, (later, later))


@pytest.fixture
def clone(tmp_path):
    for name in ("Makefile", "pyproject.toml", "requirements-dev.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_demo_installs_only_the_lab_extra_under_the_pins(clone):
    (install,) = _dry_run(clone, "demo")
    assert '-c requirements-dev.txt -e ".[lab]"' in install


def test_test_installs_the_dev_extra_with_or_without_demo_first(clone):
    (install,) = _dry_run(clone, "test")  # a fresh clone: make test alone
    assert '-c requirements-dev.txt -e ".[lab,dev]"' in install
    _stamp(clone, ".installed-lab")  # after make demo
    (install,) = _dry_run(clone, "test")
    assert '".[lab,dev]"' in install
    assert _dry_run(clone, "demo") == []  # demo does not install again
    _stamp(clone, ".installed")  # after make test: nothing installs again
    _stamp(clone, ".installed-lab")
    assert _dry_run(clone, "test") == [] and _dry_run(clone, "demo") == []


def test_test_runs_the_suite_in_two_worker_processes_unless_told_otherwise(clone):
    def pytest_line(*args: str) -> str:
        done = subprocess.run(["make", "-n", "test", *args], cwd=clone, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        (line,) = [line for line in done.stdout.splitlines() if "-m pytest" in line]
        return line

    assert pytest_line().endswith("-m pytest -q -n 2")
    assert pytest_line("TEST_WORKERS=0").endswith("-m pytest -q -n 0")
