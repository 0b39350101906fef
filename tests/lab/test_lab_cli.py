"""End to end: ``batchnorm demo`` and ``batchnorm reproduce ioffe2015`` on tiny settings,
through the CLI's main() and once as ``python -m batchnorm``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from batchnorm.backends import cpp_cpu
from batchnorm.cli import main
from batchnorm.lab.fit import History
from batchnorm.lab.reproduce import steps_to

matplotlib.use("Agg")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEMO_FIGURES = ("accuracy.png", "gradients.png", "activations.png")


def assert_real_png(path):
    """A PNG that decodes to a picture with something drawn on it."""
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert height >= 300 and width >= 600, image.shape
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05  # not a blank canvas
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 50  # lines, text, colours


def assert_self_contained_html(path, images: int):
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('src="data:image/png;base64,') == images
    assert re.search(r'(src|href)="(?!data:)', page) is None  # nothing to fetch
    return page


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The printed table's rows by run label, split into cells."""
    rows = {}
    for line in stdout.splitlines():
        for label in ("without BN", "with BN"):
            if line.startswith(label):
                rows[label] = re.split(r"\s{2,}", line[len(label) :].strip())
    return rows


def demo(tmp_path, data_npz, *extra):
    out = tmp_path / "report"
    argv = ["demo", "--data", "npz", "--data-dir", str(data_npz), "--epochs", "3",
            "--batch-size", "40", "--out", str(out), "--no-progress", *extra]  # fmt: skip
    return main(argv), out


def test_demo_end_to_end(tmp_path, blobs_npz, capsys):
    code, out = demo(tmp_path, blobs_npz)
    stdout = capsys.readouterr().out
    assert code == 0
    assert "\x1b[" not in stdout  # no terminal escapes when the output is not a terminal
    for name in DEMO_FIGURES:
        assert_real_png(out / name)
    page = assert_self_contained_html(out / "report.html", images=3)
    metrics = json.loads((out / "metrics.json").read_text())

    # What is printed is what is written, to the printed precision.
    rows = table_rows(stdout)
    assert list(rows) == ["without BN", "with BN"] == list(metrics["results"])
    for label, cells in rows.items():
        r = metrics["results"][label]
        assert cells == [
            f"{r['test_accuracy']:.3f}", f"{r['final_train_loss']:.3f}",
            f"{r['train_seconds']:.1f} s",
        ]  # fmt: skip
        run = metrics["runs"][label]
        assert r["test_accuracy"] == run["test_accuracy"][-1]
        assert r["final_train_loss"] == run["train_loss"][-1]
        assert run["steps"] == [0, 6, 12, 18]  # 240 samples / 40 = 6 steps per epoch
        assert len(run["step_loss"]) == 18
        grads = run["probes"]["gradients"]["layers"]
        assert all(len(v) == 18 for v in grads.values())
        assert len(run["probes"]["activations"]["steps"]) == 4
        assert f"{r['test_accuracy']:.3f}" in page  # the page shows the printed table
    assert list(metrics["runs"]["with BN"]["probes"]["gradients"]["layers"]) == [
        "0 Linear", "2 BatchNorm1d", "3 Linear",
    ]  # fmt: skip
    assert metrics["settings"]["batch norm"] == "batchnorm.BatchNorm1d"
    assert f"report {out / 'report.html'}" in stdout


def test_demo_with_torch_bn_matches_ours(tmp_path, blobs_npz, capsys):
    """--bn torch swaps the implementation, and both train to the same numbers."""
    _, ours = demo(tmp_path / "a", blobs_npz, "--no-plots")
    _, theirs = demo(tmp_path / "b", blobs_npz, "--no-plots", "--bn", "torch")
    capsys.readouterr()
    a = json.loads((ours / "metrics.json").read_text())
    b = json.loads((theirs / "metrics.json").read_text())
    assert b["settings"]["batch norm"] == "torch.nn.BatchNorm1d"
    # Without BN the runs are identical; with BN they agree to float32 rounding.
    assert a["runs"]["without BN"]["step_loss"] == b["runs"]["without BN"]["step_loss"]
    np.testing.assert_allclose(
        a["runs"]["with BN"]["step_loss"], b["runs"]["with BN"]["step_loss"], rtol=1e-4
    )


def test_demo_without_plots(tmp_path, blobs_npz, capsys):
    code, out = demo(tmp_path, blobs_npz, "--no-plots")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html"]
    assert_self_contained_html(out / "report.html", images=0)
    assert "(metrics.json)" in capsys.readouterr().out


def test_reproduce_end_to_end(tmp_path, blobs_npz, capsys):
    out = tmp_path / "ioffe"
    argv = ["reproduce", "ioffe2015", "--data", "npz", "--data-dir", str(blobs_npz),
            "--steps", "40", "--eval-every", "10", "--batch-size", "20", "--lr", "0.5",
            "--threshold", "0.6", "--unit", "3", "--out", str(out), "--no-progress"]  # fmt: skip
    code = main(argv)
    stdout = capsys.readouterr().out
    assert code == 0
    assert_real_png(out / "figure1.png")
    assert_self_contained_html(out / "report.html", images=1)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = table_rows(stdout)
    assert list(rows) == ["without BN", "with BN"]
    for label, cells in rows.items():
        r, run = metrics["results"][label], metrics["runs"][label]
        assert run["steps"] == [0, 10, 20, 30, 40]
        # Steps to threshold, recomputed from the curve.
        expected = next(
            (s for s, a in zip(run["steps"], run["test_accuracy"], strict=True) if a >= 0.6),
            None,
        )
        assert r["steps_to_threshold"] == expected
        assert r["final_test_accuracy"] == run["test_accuracy"][-1]
        q = np.asarray(run["probes"]["last hidden layer"]["layers"]["last hidden layer"])
        assert q.shape == (5, 3, 100)  # evaluations x (15, 50, 85 %) x units
        median = q[1:, 1, :]  # trained evaluations; a quarter of 4 is 1
        drift = np.abs(median[-1] - median[0])
        assert r["median_drift_unit"] == pytest.approx(drift[3])
        assert r["median_drift_mean"] == pytest.approx(drift.mean())
        reached = "not reached" if expected is None else str(expected)
        assert cells == [
            reached, f"{r['final_test_accuracy']:.3f}", f"{r['best_test_accuracy']:.3f}",
            f"{r['median_drift_unit']:.2f} / {r['median_drift_mean']:.2f}",
            f"{r['train_seconds']:.1f} s",
        ]  # fmt: skip


def test_steps_to_threshold():
    h = History("x", 10, 6, steps=[0, 5, 10, 15], test_accuracy=[0.1, 0.49, 0.5, 0.7])
    assert steps_to(h, 0.5) == 10
    assert steps_to(h, 0.8) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--data", "mnist"], "needs --data-dir"),
        (["demo", "--data", "npz", "--data-dir", "{bad}"], "not a readable .npz archive"),
        (
            ["reproduce", "ioffe2015", "--unit", "100", "--data", "npz", "--data-dir", "{good}"],
            "unit must be in 0..99",
        ),  # fmt: skip
        (["demo", "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_input_ends_with_a_message(tmp_path, blobs_npz, capsys, argv, message):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an archive")
    argv = [a.format(bad=bad, good=blobs_npz) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "{bad}" in " ".join(argv):
        assert str(bad) in err


# On a machine with a GPU "--device cuda" is valid, so there is no error message to check.
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_cuda_request_without_cuda(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--device", "cuda"])
    assert "Hint: use --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["reproduce", "ioffe2016"]])
def test_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_python_m_batchnorm_demo(tmp_path, mnist1d_cache):
    """The command `make demo` runs, on MNIST-1D, for one epoch, in a fresh process."""
    out = tmp_path / "report"
    # The C++ backend this process built or loaded (from its own cache folder), linked into
    # the child's: the child loads it as a second run of `make demo` would, instead of
    # building it again (30 s; tests/backends/test_cpp_cpu_build.py tests the build).
    built = cpp_cpu.extension()
    if built is not None:
        folder = Path(built.__file__).parent
        link = mnist1d_cache / "batchnorm" / "cpp" / folder.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(folder)
    env = {**os.environ, "XDG_CACHE_HOME": str(mnist1d_cache)}
    done = subprocess.run(
        [sys.executable, "-m", "batchnorm", "demo", "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert built is None or "building the C++ kernels" not in done.stderr
    assert "\x1b[" not in done.stdout + done.stderr  # not a terminal: no progress bar
    assert "MNIST-1D: 4000 train / 1000 test samples, 40 features, 10 classes" in done.stdout
    assert set(table_rows(done.stdout)) == {"without BN", "with BN"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runs"]["with BN"]["steps"] == [0, 40]
    for name in DEMO_FIGURES:
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)


# The lab extra missing: the import of mnist1d (or matplotlib) fails as if not installed.
_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from batchnorm.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    "missing, argv",
    [
        ("mnist1d", ["demo", "--epochs", "1"]),
        ("mnist1d", ["reproduce", "ioffe2015", "--steps", "10"]),
        ("matplotlib", ["demo", "--data", "npz"]),  # the plots: said before training
    ],
)
def test_missing_lab_extra_names_the_extra_and_how_to_install_it(tmp_path, blobs, missing,
                                                                  argv):  # fmt: skip
    if "npz" in argv:
        np.savez(tmp_path / "blobs.npz", **blobs())
        argv = [*argv, "--data-dir", str(tmp_path / "blobs.npz")]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT, missing, *argv, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"batchnorm {argv[0]}: error: the lab needs the package {missing!r}")
    assert 'pip install "batchnorm[lab]"' in line and 'pip install ".[lab]"' in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "ioffe2015", "--quick"], "--quick applies to santurkar2018, renorm2017"),
        (["reproduce", "renorm2017", "--activation", "tanh"], "--activation applies to ioffe2015"),
        (["reproduce", "santurkar2018", "--seeds", "0"], "expected a positive integer"),
    ],
)
def test_reproduce_option_of_another_experiment_is_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
