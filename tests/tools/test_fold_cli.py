"""`batchnorm fold`: the success path and a clear message for each bad input."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import example_models
from batchnorm.cli import main
from tools.test_fold import randomize

SHAPE = "2,3,32,32"
FACTORY = f"{__name__}:small_resnet"
UNPICKLED = []  # filled if the CLI ever ran the payload below


def small_resnet() -> nn.Module:
    return example_models.resnet18_like(width=8, classes=5)


class EmptyOutput(nn.Module):
    """A model with a batch norm whose output has no elements."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))[:, :0]


def _payload() -> None:
    UNPICKLED.append(True)


class Payload:
    """Runs code when unpickled: what weights_only=True must refuse."""

    def __reduce__(self):
        return (_payload, ())


def run(capsys, *args):
    status = main(["fold", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(randomize(small_resnet(), seed=3).state_dict(), path)
    return path


def test_folds_prints_report_and_writes_a_loadable_state_dict(tmp_path, weights, capsys):
    out = tmp_path / "folded.pt"
    args = [
        "--model",
        FACTORY,
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--input-shape",
        SHAPE,
    ]
    status, stdout, err = run(capsys, *args)
    assert status == 0, err
    assert "fold: 20 of 20 batch-norm layers folded (fx)" in stdout
    difference = float(stdout.split("max |folded - unfolded| = ")[1].split()[0])
    assert difference < 1e-4
    # documented way back: fold a fresh model, then load the file (weights_only)
    x = torch.randn(2, 3, 32, 32)
    folded, _ = batchnorm.fold(small_resnet(), x)
    folded.load_state_dict(torch.load(out, weights_only=True))
    unfolded = small_resnet()
    unfolded.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), unfolded.eval()(x), rtol=1e-5, atol=1e-5)


def test_refuses_pickled_objects_without_running_them(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"stem.0.weight": torch.ones(1), "extra": Payload()}, path)
    status, _, err = run(
        capsys, "--model", FACTORY, "--weights", str(path), "--out", str(tmp_path / "x.pt")
    )
    assert status == 2
    assert f"refusing to load '{path}': it holds a Python object ({__name__}._payload)" in err
    assert "torch.save(model.state_dict(), path)" in err
    assert UNPICKLED == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no_such_pkg.mod:f"], "cannot import module 'no_such_pkg.mod'"),
        (["--model", "batchnorm.example_models:nope"], "has no callable 'nope'"),
        (["--model", "batchnorm.example_models"], "--model must look like pkg.module:factory"),
        (["--model", "batchnorm.example_models:_MOBILENET_V1_BLOCKS"], "no callable"),
        (["--model", "os:getcwd"], "os:getcwd() returned a str, not an nn.Module"),
        (["--input-shape", "2,5,32,32"], "the model rejected an input of shape (2, 5, 32, 32)"),
        (["--input-shape", "2,x"], "--input-shape must be positive integers separated by commas"),
        (["--input-shape", "0,3,4,4"], "--input-shape must be positive integers"),
        (["--weights", "missing.pt"], "--weights: no such file 'missing.pt'"),
        (
            ["--input-shape", "100000,100000,100000"],
            "--input-shape 100000,100000,100000 has 1000000000000000 elements, more than the "
            "134217728 allowed (MAX_INPUT_ELEMENTS). Hint: fold needs a single example",
        ),
    ],
)
def test_bad_inputs_have_clear_messages(args, message, tmp_path, capsys):
    defaults = {"--model": FACTORY, "--out": str(tmp_path / "o.pt"), "--input-shape": SHAPE}
    merged = {**defaults, **dict(zip(args[::2], args[1::2], strict=True))}
    status, _, err = run(capsys, *[part for item in merged.items() for part in item])
    assert status == 2
    assert err.startswith("batchnorm fold: error: ") and message in err, err
    assert not os.path.exists(tmp_path / "o.pt")


def test_mismatched_and_non_state_dict_weights(tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(example_models.resnet18_like(width=4, classes=5).state_dict(), other)
    status, _, err = run(
        capsys, "--model", FACTORY, "--weights", str(other), "--out", str(tmp_path / "o.pt")
    )
    assert status == 2
    assert f"do not match the model built by {FACTORY}" in err
    assert "shape mismatches [stem.0.weight: file (4, 3, 7, 7) vs model (8, 3, 7, 7)" in err

    partial = tmp_path / "partial.pt"
    state = small_resnet().state_dict()
    state["surprise"] = state.pop("fc.bias")
    torch.save(state, partial)
    status, _, err = run(
        capsys, "--model", FACTORY, "--weights", str(partial), "--out", str(tmp_path / "o.pt")
    )
    assert "missing keys [fc.bias]; unexpected keys [surprise]" in err

    listing = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listing)
    status, _, err = run(
        capsys, "--model", FACTORY, "--weights", str(listing), "--out", str(tmp_path / "o.pt")
    )
    assert status == 2 and "is not a state_dict (a mapping of names to tensors), got list" in err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    status, _, err = run(
        capsys, "--model", FACTORY, "--weights", str(garbage), "--out", str(tmp_path / "o.pt")
    )
    assert status == 2 and f"cannot read '{garbage}' as a torch.save file" in err


def _one_line_error(capsys, *args) -> str:
    status, stdout, err = run(capsys, *args)
    assert status == 2 and stdout == "", (status, stdout, err)
    assert err.startswith("batchnorm fold: error: ") and err.count("\n") == 1, err
    return err


def test_empty_model_output_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "o.pt"
    err = _one_line_error(capsys, "--model", f"{__name__}:EmptyOutput", "--out", str(out),
                          "--input-shape", SHAPE)  # fmt: skip
    assert "the model's output is empty (shape (2, 0, 30, 30)) for an input of shape " in err
    assert "(2, 3, 32, 32)" in err and "Hint: pass an --input-shape" in err
    assert not out.exists()


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    """A folder, or a file in a missing folder, is refused before the model is even built
    (the factory named here does not exist, and is never reached)."""
    common = ["--model", "no_such_pkg.mod:f", "--input-shape", SHAPE]
    err = _one_line_error(capsys, *common, "--out", str(tmp_path))
    assert f"--out '{tmp_path}' is a folder; expected a file name" in err
    assert repr(str(tmp_path / "folded.pt")) in err
    missing = tmp_path / "no" / "such" / "folded.pt"
    err = _one_line_error(capsys, *common, "--out", str(missing))
    assert f"--out '{missing}': the folder '{missing.parent}' does not exist" in err
    assert "Hint: create it first" in err and not missing.parent.exists()
    onnx = tmp_path / "nowhere" / "m.onnx"
    err = _one_line_error(capsys, *common, "--out", str(tmp_path / "o.pt"), "--onnx", str(onnx))
    assert f"--onnx '{onnx}': the folder '{onnx.parent}' does not exist" in err
    err = _one_line_error(capsys, *common, "--out", str(tmp_path / "o.pt"), "--onnx", str(tmp_path))
    assert f"--onnx '{tmp_path}' is a folder" in err and "folded.onnx" in err


def test_help_says_output_folders_must_exist(capsys):
    with pytest.raises(SystemExit):
        main(["fold", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(its folder must exist)" in text
    assert "at most 134217728 elements" in text
