"""A folded model exports to ONNX without BatchNormalization nodes and onnxruntime agrees.

The export uses ``optimize=False``: torch.onnx's optimizer fuses Conv -> BN by itself, which
would make "no BatchNormalization node" true without fold.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

import batchnorm
from batchnorm import example_models
from batchnorm.cli import main
from conftest import assert_close, random_input
from tools.test_fold import randomize


def small_mobilenet() -> nn.Module:
    return example_models.mobilenet_like(width_mult=0.25, classes=10)


def export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    return torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False).model_proto


def run_onnx(proto: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(output))


def op_types(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


def test_unfolded_export_keeps_batch_norm_nodes():
    """The check below can fail: without fold, the same export holds BN nodes."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert "BatchNormalization" in op_types(export(model, random_input((1, 3, 8, 8))))


def test_folded_resnet_exports_without_batch_norm_and_onnxruntime_agrees():
    model = randomize(example_models.resnet18_like(width=8, classes=10), seed=1)
    x = random_input((2, 3, 32, 32))
    folded, report = batchnorm.fold(model, x)
    assert len(report.folded) == 20
    proto = export(folded, x)
    onnx.checker.check_model(proto)
    assert "Conv" in op_types(proto) and "BatchNormalization" not in op_types(proto)
    with torch.no_grad():
        expected = model(x)
    # onnxruntime's convolutions sum in another order than PyTorch's: float32 rounding
    assert_close(run_onnx(proto, x), expected, rtol=1e-4, atol=1e-4)


def test_cli_writes_an_onnx_file_onnxruntime_runs(tmp_path, capsys):
    out, path = tmp_path / "folded.pt", tmp_path / "folded.onnx"
    status = main(
        ["fold", "--model", f"{__name__}:small_mobilenet", "--out", str(out),
         "--onnx", str(path), "--input-shape", "1,3,64,64"]
    )  # fmt: skip
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "fold: 27 of 27 batch-norm layers folded (fx)" in printed.out
    # one file, weights included: no folded.onnx.data beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.onnx", "folded.pt"]
    assert f"to {path} (one file, weights included)" in printed.out
    proto = onnx.load(str(path), load_external_data=False)
    assert proto.graph.initializer and not any(t.external_data for t in proto.graph.initializer)
    # two of its BN sit before a 1x1 conv: torch.onnx's own optimizer would leave them
    assert "BatchNormalization" not in op_types(proto)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # the CLI's
    folded, _ = batchnorm.fold(small_mobilenet(), x)
    folded.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        assert_close(run_onnx(proto, x), folded(x), rtol=1e-4, atol=1e-4)
