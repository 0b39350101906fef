"""When the Numba kernels compile: never at import, only the specializations a call runs,
with one notice on stderr when a compile really happens (not when the disk cache has the
kernel); and ``batchnorm compile``, which fills the cache ahead of time.

Each test runs fresh processes on an empty NUMBA_CACHE_DIR, so "compiled" and "loaded from
the cache" do not depend on what earlier tests left in the package's own cache."""

import json
import os
import subprocess
import sys

# After import nothing is compiled; an eval-mode forward of a small contiguous float64
# input on the numba backend compiles (or loads) the serial channels-first forward only.
_ONE_CALL = """
import json, torch, batchnorm
import batchnorm.functional as BF
from batchnorm import ops
from batchnorm.backends.numba_cpu import compilation

def state():
    found = {}
    for layout, kernels in compilation.KERNELS.items():
        for step, kernel in kernels.items():
            for variant in ("serial", "parallel"):
                d = getattr(kernel, variant)
                found[f"{layout} {step} {variant}"] = len(d.overloads)
    found["running_update"] = len(compilation.running_update.overloads)
    return found

at_import = state()
compiled_at_import = compilation.NOTICE.shown  # any compile of the package's Numba code
x = torch.randn(4, 3, 10, dtype=torch.float64)
with ops.use_backend("numba"):
    BF.batch_norm(x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
stats = compilation.KERNELS["channels_first"]["forward"].serial.stats
print(json.dumps({"at_import": at_import, "compiled_at_import": compiled_at_import,
                  "after_call": state(),
                  "misses": sum(stats.cache_misses.values()),
                  "hits": sum(stats.cache_hits.values())}))
"""


def _run(code_or_args, cache, *, module=False):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    tail = ["-m", "batchnorm", *code_or_args] if module else ["-c", code_or_args]
    argv = [sys.executable, *tail]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def test_nothing_compiles_at_import_a_call_compiles_what_it_runs_and_says_so_once(tmp_path):
    cold = _run(_ONE_CALL, tmp_path)
    result = json.loads(cold.stdout)
    assert set(result["at_import"].values()) == {0}, result["at_import"]
    assert result["compiled_at_import"] is False
    compiled = {name for name, count in result["after_call"].items() if count}
    assert compiled == {"channels_first forward serial"}
    assert (result["misses"], result["hits"]) == (1, 0)
    assert cold.stderr.count("batchnorm: compiling the Numba CPU kernels") == 1, cold.stderr
    assert str(tmp_path) in cold.stderr and "batchnorm compile" in cold.stderr

    warm = _run(_ONE_CALL, tmp_path)  # a new process: loaded from the cache, silently
    result = json.loads(warm.stdout)
    assert (result["misses"], result["hits"]) == (0, 1)
    assert "compiling" not in warm.stderr, warm.stderr


def test_batchnorm_compile_fills_the_cache_then_loads_from_it(tmp_path):
    # channels-last: its kernels compile fastest
    args = ["compile", "--dtype", "float64", "--layout", "channels_last"]
    first = _run(args, tmp_path, module=True).stdout
    rows = [line.split() for line in first.splitlines() if line.startswith("  ")]
    kernels = {(r[0], r[1], r[2]) for r in rows}
    kernel_names = [f"cl_{step}{r}" for step in ("forward", "backward") for r in ("", "+residual")]
    assert kernels == {(k, "float64", v) for k in kernel_names for v in ("serial", "parallel")} | {
        ("running_update", "float64", "serial")
    }
    assert all(r[3] == "compiled" for r in rows), first
    assert str(tmp_path) in first and "9 specializations: 9 compiled" in first
    assert "C++ kernels" not in first  # float32 only
    second = _run(args, tmp_path, module=True).stdout
    assert "9 specializations: 9 loaded from the cache" in second, second


def test_without_a_cache_folder_the_notice_and_the_command_say_so(monkeypatch, capsys):
    from batchnorm import cli
    from batchnorm.backends.numba_cpu import compilation

    assert compilation.cache_dir() and "`batchnorm compile`" in compilation.notice()
    monkeypatch.setitem(compilation._HELPER, "cache", False)  # no writable folder found
    assert compilation.cache_dir() is None
    text = compilation.notice()
    assert "not cached" in text and "NUMBA_CACHE_DIR" in text and "batchnorm compile" not in text
    assert cli.main(["compile"]) == 1
    assert "Hint: set NUMBA_CACHE_DIR" in capsys.readouterr().err
