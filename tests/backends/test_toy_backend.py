"""A new backend is tested by registering it: nothing else in the suite names backends.

A toy backend (the reference's kernels under another name, for CPU float64 only) is
registered by a pytest plugin in a child run of the parity suites; the ``backend`` fixture
then runs every parity test through it too, and the toy counts the calls it computed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PLUGIN = """
import atexit, os, torch
from batchnorm import ops
from batchnorm.backends.reference import ReferenceBackend

class ToyBackend(ReferenceBackend):
    name = "toy"
    devices = ("cpu",)
    calls = 0

    def supports(self, call):
        return call.x.is_cpu and call.x.dtype == torch.float64

    def preferred(self, call):
        return False  # only when forced: the default dispatch stays as it is

    def forward_train(self, *args):
        ToyBackend.calls += 1
        return super().forward_train(*args)

ops.register_backend(ToyBackend())
atexit.register(lambda: open(os.environ["TOY_CALLS"], "w").write(str(ToyBackend.calls)))
"""

PARITY_SUITES = ["tests/test_functional.py", "tests/test_torch_func.py"]


def test_a_registered_toy_backend_runs_through_the_parity_suites(tmp_path):
    (tmp_path / "toy_backend_plugin.py").write_text(PLUGIN)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TOY_CALLS": str(tmp_path / "calls")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), str(root / "src"), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "toy_backend_plugin", "-p", "no:cacheprovider",
         "-k", "toy", *PARITY_SUITES],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 40, summary  # the fixture gave the toy every parity test
    assert int((tmp_path / "calls").read_text()) > 0  # and the toy computed them
