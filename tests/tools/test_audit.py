"""batchnorm.audit and `batchnorm audit`: every planted defect is found at the right layer with
the right severity, its printed fix (run as code) removes it, a healthy model yields nothing
above info, and the audited model is bit-identical afterwards, also after an exception."""

from __future__ import annotations

import copy
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import batchnorm
from batchnorm import example_models
from batchnorm.cli import main
from batchnorm.lab import article_model, fit, ioffe_mlp, load_dataset
from batchnorm.lab.data import Dataset
from batchnorm.tools import audit as audit_module

# The predicted gain (recalibrating on the audited test split) against the measured one
# (recalibrating on the training set, as a user would, then evaluating on the test split).
# The two differ only by the statistics of 1000 test vs 4000 training samples.
GAIN_TOLERANCE = 0.02
TRAIN_STEPS = 300
FACTORY = f"{__name__}:demo_factory"


def demo_factory() -> nn.Module:
    """The demo's model (the CLI builds it from here)."""
    return article_model(40)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on a shared machine: one thread is fastest and reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Dataset:
    """MNIST-1D, generated once into a private cache (the user's is never touched)."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    try:
        return load_dataset("mnist1d", quiet=True)
    finally:
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old


def train(model: nn.Module, data: Dataset, steps: int = TRAIN_STEPS, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    fit(model, optimizer, data, steps=steps, batch_size=100, progress=False, eval_every=steps)
    return model.eval()


@pytest.fixture(scope="module")
def demo_trained(mnist) -> nn.Module:
    torch.manual_seed(0)
    return train(article_model(mnist.num_features), mnist)


@pytest.fixture
def demo(demo_trained) -> nn.Module:
    return copy.deepcopy(demo_trained)


@pytest.fixture(scope="module")
def stale_mlp_trained(mnist):
    """Ioffe & Szegedy's MLP (ReLU) whose middle BN ("4") keeps the statistics of step 30."""
    torch.manual_seed(0)
    model = ioffe_mlp(mnist.num_features, activation="relu")
    train(model, mnist, steps=30)
    early = {k: v.clone() for k, v in model[4].state_dict().items()}
    train(model.train(), mnist, steps=TRAIN_STEPS, seed=1)
    healthy = copy.deepcopy(model)
    with torch.no_grad():
        model[4].running_mean.copy_(early["running_mean"])
        model[4].running_var.copy_(early["running_var"])
    return healthy, model


@pytest.fixture
def stale_mlp(stale_mlp_trained):
    return copy.deepcopy(stale_mlp_trained)


def loader(x: torch.Tensor, y: torch.Tensor | None = None, batch: int = 100) -> list:
    return [
        x[i : i + batch] if y is None else (x[i : i + batch], y[i : i + batch])
        for i in range(0, len(x), batch)
    ]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).double().mean())


def apply_fix(finding, model: nn.Module, **names) -> nn.Module:
    """Run a finding's fix line as written, with ``model`` (and ``loader``, ``x``) bound."""
    namespace = {"model": model, "torch": torch, "nn": nn, "batchnorm": batchnorm, **names}
    exec(finding.fix, namespace)
    return namespace["model"]


def above_info(report) -> list:
    return [f for f in report.findings if f.severity != "info"]


def state(model: nn.Module) -> tuple[dict, list]:
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = [p.requires_grad for p in model.parameters()]
    return tensors, [m.training for m in model.modules()] + grads


def assert_same_state(model: nn.Module, saved: tuple[dict, list]) -> None:
    tensors, modes = saved
    now = model.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys()
    for key, value in tensors.items():
        assert now[key].dtype == value.dtype, key
        assert torch.equal(now[key].detach(), value), key  # bit-identical (NaN-free models)
    grads = [p.requires_grad for p in model.parameters()]
    assert [m.training for m in model.modules()] + grads == modes


# --------------------------------------------------------------------------- healthy model


def test_healthy_demo_model_has_nothing_above_info(demo, mnist):
    for x, y in ((mnist.x_train, mnist.y_train), (mnist.x_test, mnist.y_test)):
        report = batchnorm.audit(demo, x, labels=y)
        assert above_info(report) == [], str(report)
    assert report.metric["name"] == "accuracy"
    assert abs(report.metric["gain"]) < audit_module.GAIN_WARNING
    fold = report.select("foldable")[0]  # the BN folds into the Linear after it; timed
    assert "measured:" in fold.message and fold.evidence["folded"] == ["2"]
    assert report.timing["model_ms"] > 0 and report.timing["speedup"] > 0
    layer = report.layers[0]
    assert layer.name == "2" and layer.gap_rms < audit_module.STALE_GAP_WARNING
    # batches of 100 independent samples: the batch mean is off by about 1/sqrt(100)
    assert 0.07 < layer.noise_mean < 0.13
    assert 70 < layer.effective_values < 140


def test_audit_leaves_the_model_bit_identical(demo, mnist):
    model = nn.Sequential(demo, nn.Dropout(0.1))  # a dropout and an extra level
    model.eval()
    demo[2].train()  # mixed modes, as found
    demo[0].weight.requires_grad_(False)
    saved = state(model)
    report = batchnorm.audit(model, mnist.x_test, labels=mnist.y_test)
    assert report.select("mixed-modes", "0.2", "error")
    assert_same_state(model, saved)


class FailsOnThirdCall(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("planted failure")
        return self.inner(x)


def test_model_unchanged_after_an_exception_midway(demo, mnist):
    model = FailsOnThirdCall(demo).train()
    saved = state(model)
    with pytest.raises(RuntimeError, match="planted failure"):
        batchnorm.audit(model, mnist.x_test)
    assert model.calls == 3
    assert_same_state(model, saved)  # running statistics of 2 batches in train mode undone


# --------------------------------------------------------------------------- 1. stale statistics


def test_stale_statistics_found_and_recalibration_recovers_the_predicted_gain(stale_mlp, mnist):
    healthy, model = stale_mlp
    report = batchnorm.audit(model, mnist.x_test, labels=mnist.y_test, timing=False)
    stale = report.select("stale-statistics")
    assert [(f.layer, f.severity) for f in stale] == [("4", "error")]
    assert stale[0].evidence["gap_rms"] >= audit_module.STALE_GAP_ERROR
    gain = report.select("recalibration-gain")[0]
    assert gain.severity == "error" and gain.layer is None
    assert gain.fix == "batchnorm.recalibrate(model, loader)"
    predicted = report.metric["gain"]
    before = accuracy(model, mnist.x_test, mnist.y_test)
    assert report.metric["running"] == pytest.approx(before, abs=1e-12)

    fixed = apply_fix(stale[0], model, loader=loader(mnist.x_train, mnist.y_train))
    measured = accuracy(fixed, mnist.x_test, mnist.y_test) - before
    assert measured == pytest.approx(predicted, abs=GAIN_TOLERANCE)
    assert (
        accuracy(fixed, mnist.x_test, mnist.y_test)
        >= accuracy(healthy, mnist.x_test, mnist.y_test) - GAIN_TOLERANCE
    )  # the eval accuracy of the model before its statistics went stale
    after = batchnorm.audit(fixed, mnist.x_test, labels=mnist.y_test, timing=False)
    assert not after.select("stale-statistics") and above_info(after) == []


def test_predicted_gain_is_exact_on_the_data_recalibrated_on(stale_mlp, mnist):
    _, model = stale_mlp
    x, y = mnist.x_train[:2000], mnist.y_train[:2000]
    report = batchnorm.audit(model, x, labels=y, timing=False)
    before = accuracy(model, x, y)
    batchnorm.recalibrate(model, loader(x), progress=False)
    assert accuracy(model, x, y) - before == pytest.approx(report.metric["gain"], abs=1e-12)


def test_stale_statistics_of_a_frozen_layer(stale_mlp, mnist):
    healthy, model = stale_mlp
    model, _ = batchnorm.freeze(model)
    report = batchnorm.audit(model, mnist.x_test, labels=mnist.y_test, timing=False)
    stale = report.select("stale-statistics")
    # frozen layers keep eval mode in the audit's pass: 7 sees what the stale 4 gives it
    assert [(f.layer, f.severity) for f in stale] == [("4", "error"), ("7", "warning")]
    assert stale[0].fix == stale[1].fix  # one fix for both
    fixed = apply_fix(stale[0], model, loader=loader(mnist.x_train))
    assert isinstance(fixed[4], batchnorm.FrozenBatchNorm1d)
    after = batchnorm.audit(fixed, mnist.x_test, labels=mnist.y_test, timing=False)
    assert not after.select("stale-statistics")
    assert accuracy(fixed, mnist.x_test, mnist.y_test) == pytest.approx(
        accuracy(healthy, mnist.x_test, mnist.y_test), abs=GAIN_TOLERANCE
    )


# --------------------------------------------------------------------------- 2. noisy statistics


def test_small_batches_are_noisy_and_freezing_removes_the_finding(demo, mnist):
    x = mnist.x_train[:2000]
    for batch_size, severity in ((4, "error"), (16, "warning")):
        report = batchnorm.audit(demo, x, batch_size=batch_size, timing=False)
        noisy = report.select("noisy-batch-statistics")
        assert [(f.layer, f.severity) for f in noisy] == [("2", severity)]
        m_eff = noisy[0].evidence["effective_values"]
        assert m_eff < audit_module.NOISY_VALUES_WARNING
        assert m_eff == pytest.approx(batch_size, rel=0.5)  # independent samples: m_eff ≈ N
        assert "freeze" in noisy[0].fix and "BatchRenorm1d" in noisy[0].message
    fixed = apply_fix(noisy[0], demo)
    assert isinstance(fixed[2], batchnorm.FrozenBatchNorm1d)
    after = batchnorm.audit(fixed, x, batch_size=4, timing=False)
    assert not after.select("noisy-batch-statistics") and above_info(after) == []
    assert not batchnorm.audit(demo, x, batch_size=50, timing=False).select(
        "noisy-batch-statistics"
    )


@pytest.mark.parametrize(
    "layer",
    [batchnorm.GhostBatchNorm1d(128, virtual_batch_size=8), batchnorm.BatchRenorm1d(128)],
    ids=["ghost", "renorm"],
)
def test_noise_of_ghost_and_renorm_layers_is_by_design(demo, mnist, layer):
    layer.load_state_dict(demo[2].state_dict())
    demo[2] = layer.eval()
    report = batchnorm.audit(demo, mnist.x_train[:2000], batch_size=8, timing=False)
    noisy = report.select("noisy-batch-statistics", "2")
    assert [f.severity for f in noisy] == ["info"]
    assert noisy[0].evidence["effective_values"] < audit_module.NOISY_VALUES_ERROR * 2
    if isinstance(layer, batchnorm.GhostBatchNorm1d):  # measured on the virtual batches
        report = batchnorm.audit(demo, mnist.x_train[:2000], batch_size=100, timing=False)
        assert report.select("noisy-batch-statistics", "2")[0].evidence["values_per_batch"] == 8


def test_ddp_without_sync_batch_norm(demo, mnist, monkeypatch):
    monkeypatch.setattr(audit_module, "_world_size", lambda: 4)
    x = mnist.x_train[:2000]
    report = batchnorm.audit(demo, x, batch_size=16, timing=False)
    ddp = report.select("ddp-without-sync-batch-norm")
    assert [(f.layer, f.severity) for f in ddp] == [(None, "warning")]
    assert ddp[0].evidence["noisy_layers"] == ["2"]
    noisy = report.select("noisy-batch-statistics", "2")[0]
    assert (
        noisy.fix
        == ddp[0].fix.split("  #")[0]
        == ("model = batchnorm.convert_sync_batchnorm(model)")
    )
    fixed = apply_fix(ddp[0], demo)
    assert isinstance(fixed[2], batchnorm.SyncBatchNorm)
    after = batchnorm.audit(fixed, x, batch_size=16, timing=False)  # 4 x 16 samples
    assert above_info(after) == [], str(after)


def test_a_real_ddp_wrapper_is_unwrapped(demo, mnist, tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        wrapped = nn.parallel.DistributedDataParallel(demo)
        wrapped.eval()
        saved = state(wrapped)
        report = batchnorm.audit(wrapped, mnist.x_test, labels=mnist.y_test, timing=False)
        assert_same_state(wrapped, saved)
    finally:
        dist.destroy_process_group()
    assert [a.name for a in report.layers] == ["2"]
    ddp = report.select("ddp-without-sync-batch-norm")[0]
    assert ddp.severity == "info" and ddp.fix.startswith(
        "model.module = batchnorm.convert_sync_batchnorm(model.module)"
    )


# --------------------------------------------------------------------------- 3. mode traps


def test_bn_in_training_mode_inside_an_eval_model(demo, mnist):
    demo.eval()
    demo[2].train()
    report = batchnorm.audit(demo, mnist.x_test, timing=False)
    mixed = report.select("mixed-modes")
    assert [(f.layer, f.severity) for f in mixed] == [("2", "error")]
    fixed = apply_fix(mixed[0], demo)
    assert above_info(batchnorm.audit(fixed, mnist.x_test, timing=False)) == []


def test_frozen_weights_whose_statistics_still_update(demo, mnist):
    for p in demo[2].parameters():
        p.requires_grad_(False)  # the usual fine-tuning trap
    report = batchnorm.audit(demo, mnist.x_test, timing=False)
    frozen = report.select("frozen-but-updating")
    assert [(f.layer, f.severity) for f in frozen] == [("2", "warning")]
    assert frozen[0].evidence["running_mean_drift_rms"] > 0.01  # measured on the pass
    fixed = apply_fix(frozen[0], demo)
    assert isinstance(fixed[2], batchnorm.FrozenBatchNorm1d)
    assert above_info(batchnorm.audit(fixed, mnist.x_test, timing=False)) == []


def test_track_running_stats_false_in_eval(demo, mnist):
    bn = batchnorm.BatchNorm1d(128, track_running_stats=False)
    bn.load_state_dict(demo[2].state_dict(), strict=False)
    demo[2] = bn
    demo.eval()
    report = batchnorm.audit(demo, mnist.x_test, timing=False)
    found = report.select("batch-statistics-in-eval")
    assert [(f.layer, f.severity) for f in found] == [("2", "warning")]
    assert found[0].evidence["noise_mean"] > 0
    fixed = apply_fix(found[0], demo, loader=loader(mnist.x_train))
    assert fixed[2].track_running_stats and fixed[2].running_mean is not None
    after = batchnorm.audit(fixed, mnist.x_test, labels=mnist.y_test, timing=False)
    assert above_info(after) == []


def test_statistics_never_updated(demo, mnist):
    demo[2].reset_running_stats()  # mean 0, variance 1, num_batches_tracked 0
    report = batchnorm.audit(demo, mnist.x_test, labels=mnist.y_test, timing=False)
    never = report.select("never-updated")
    assert [(f.layer, f.severity) for f in never] == [("2", "error")]
    assert not report.select("stale-statistics")  # said once, with the measured gap
    assert "measured: running_mean off by" in never[0].message
    fixed = apply_fix(never[0], demo, loader=loader(mnist.x_train))
    after = batchnorm.audit(fixed, mnist.x_test, labels=mnist.y_test, timing=False)
    assert above_info(after) == []


@pytest.mark.parametrize(
    ("momentum", "severity"), [(0.0, "warning"), (1.0, "warning"), (None, "info")]
)
def test_momentum_surprises(demo, mnist, momentum, severity):
    demo[2].momentum = momentum
    report = batchnorm.audit(demo, mnist.x_test, timing=False)
    found = report.select("momentum", "2")
    assert [f.severity for f in found] == [severity]
    fixed = apply_fix(found[0], demo)
    assert not batchnorm.audit(fixed, mnist.x_test, timing=False).select("momentum")


# --------------------------------------------------------------------------- 4. waste and speed


class Flat1d(nn.Sequential):
    """MNIST-1D's (N, 40) features as the (N, 1, 40) signals of a 1-D CNN."""

    def __init__(self) -> None:
        super().__init__(nn.Unflatten(1, (1, 40)), example_models.cnn1d(in_channels=1))


@pytest.fixture(scope="module")
def cnn_trained(mnist) -> nn.Module:
    torch.manual_seed(0)
    model = train(Flat1d(), mnist, steps=100)
    # 100 steps leave stale statistics (the audit measures +6 points from recalibrating):
    # recalibrate, so that only the waste findings remain
    return batchnorm.recalibrate(model, loader(mnist.x_train), progress=False)


def test_biases_before_bn_and_fusable_activations(cnn_trained, mnist):
    model = copy.deepcopy(cnn_trained)
    x = mnist.x_test
    expected = model(x)
    report = batchnorm.audit(model, x, labels=mnist.y_test, timing=False)
    assert above_info(report) == [], str(report)
    bias = report.select("bias-before-batch-norm")
    assert [(f.layer, f.evidence["layer"]) for f in bias] == [("1.4", "1.3"), ("1.12", "1.11")]
    fusable = report.select("fusable-activation")
    assert [f.layer for f in fusable] == ["1.4", "1.7", "1.12"]
    assert report.select("foldable")[0].evidence["folded"] == ["1.0", "1.4", "1.7", "1.12"]
    for finding in bias + fusable:  # each fix keeps the eval outputs
        model = apply_fix(finding, model)
        torch.testing.assert_close(model.eval()(x), expected, rtol=1e-4, atol=1e-5)
    after = batchnorm.audit(model, x, labels=mnist.y_test, timing=False)
    assert not after.select("bias-before-batch-norm") and not after.select("fusable-activation")
    assert isinstance(model[1][4], batchnorm.BatchNormAct1d) and model[1][3].bias is None


def test_residual_and_method_activations_in_a_traced_resnet():
    model = example_models.resnet18_like(width=8, classes=10)
    report = batchnorm.audit(model, torch.randn(64, 3, 16, 16), batch_size=16, timing=False)
    fusable = {f.layer: f for f in report.select("fusable-activation")}
    assert fusable["blocks.0.bn1"].evidence == {"activation": "relu", "residual": False}
    assert fusable["blocks.0.bn2"].evidence == {"activation": "relu", "residual": True}
    assert "blocks.2.downsample.1" not in fusable  # one term of a sum takes the other
    assert fusable["stem.1"].fix.endswith("model.stem[2] = nn.Identity()")
    # a freshly built model: never trained, in training mode
    assert len(report.select("never-updated", severity="error")) == 20
    assert report.select("model-in-training-mode")


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the nn.Sequential fallback sees in."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.SiLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.body(x) if x.sum() > -1e9 else x)


def test_neighbours_inside_sequential_when_tracing_fails():
    report = batchnorm.audit(Untraceable(), torch.randn(64, 8), batch_size=16, timing=False)
    bias = report.select("bias-before-batch-norm", "body.1")[0]
    assert bias.evidence == {"layer": "body.0", "parameters": 16, "graph": "sequential"}
    fusable = report.select("fusable-activation", "body.1")[0]
    assert fusable.evidence["activation"] == "silu"
    assert "model.body[2] = nn.Identity()" in fusable.fix


# --------------------------------------------------------------------------- 5. numerics


def test_invalid_running_variance(demo, mnist):
    with torch.no_grad():
        demo[2].running_var[3] = float("nan")
        demo[2].running_var[5] = -1.0
    report = batchnorm.audit(demo, mnist.x_test, timing=False)
    found = report.select("invalid-running-statistics")
    assert [(f.layer, f.severity) for f in found] == [("2", "error")]
    assert found[0].evidence["nonfinite"] == [3] and found[0].evidence["negative"] == [5]
    fixed = apply_fix(found[0], demo, loader=loader(mnist.x_train))
    assert above_info(batchnorm.audit(fixed, mnist.x_test, timing=False)) == []


def test_eps_too_small_for_float16(demo, mnist):
    model = demo.half()
    x = mnist.x_test.half()
    report = batchnorm.audit(model, x, timing=False)
    found = report.select("eps-too-small")
    assert [(f.layer, f.severity) for f in found] == [("2", "warning")]
    assert found[0].evidence["channels_eps_lost"] > 64
    fixed = apply_fix(found[0], model)
    assert fixed[2].eps == 1e-3
    assert above_info(batchnorm.audit(fixed, x, timing=False)) == []
    assert not batchnorm.audit(demo.float(), mnist.x_test, timing=False).select("eps-too-small")


def test_dead_channels(demo, mnist):
    with torch.no_grad():
        demo[2].weight[[7, 9]] = 0.0
    report = batchnorm.audit(demo, mnist.x_test, timing=False)
    found = report.select("dead-channels")
    assert [(f.layer, f.severity, f.evidence["dead"]) for f in found] == [("2", "warning", [7, 9])]
    fixed = apply_fix(found[0], demo)
    assert not batchnorm.audit(fixed, mnist.x_test, timing=False).select("dead-channels")
    with torch.no_grad():
        demo[2].weight.zero_()
    assert batchnorm.audit(demo, mnist.x_test, timing=False).select("dead-channels")[
        0
    ].severity == ("error")


@pytest.mark.parametrize(("units", "severity"), [(10, "info"), (40, "warning")])
def test_channels_with_constant_input(demo, mnist, units, severity):
    with torch.no_grad():  # dead ReLU units: the BN after them sees zeros
        demo[0].weight[:units] = 0.0
        demo[0].bias[:units] = -1.0
    report = batchnorm.audit(demo, mnist.x_test, timing=False)
    found = report.select("constant-input")
    assert [(f.layer, f.severity) for f in found] == [("2", severity)]
    assert found[0].evidence["channels"] == list(range(units))
    assert not report.select("stale-statistics")  # constant channels are not scored


# --------------------------------------------------------------------------- output


def test_json_html_and_rich_table(stale_mlp, mnist, tmp_path, monkeypatch):
    _, model = stale_mlp
    report = batchnorm.audit(model, mnist.x_test, labels=mnist.y_test, num_batches=4)
    data = json.loads(report.to_json(tmp_path / "audit.json"))
    assert json.loads((tmp_path / "audit.json").read_text()) == data
    assert data["counts"]["error"] == 2 and data["settings"]["batches"] == 4
    assert data["findings"][0]["severity"] == "error"
    assert len(data["layers"][1]["running_mean"]) == 100
    page = report.to_html(tmp_path / "audit.html")
    assert_self_contained(page)
    assert page.count("data:image/png;base64,") == 3  # one plot per layer
    from rich.console import Console

    console = Console(record=True, width=200)
    report.print(console)
    text = console.export_text()
    assert "stale-statistics" in text and "batchnorm.recalibrate(model, loader)" in text
    assert "stale-statistics" in str(report)
    monkeypatch.setitem(sys.modules, "rich.table", None)
    with pytest.raises(ImportError, match="pip install"):
        report.print()


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    for attribute in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page):
        assert attribute.startswith("data:"), attribute
    assert "<script" not in page and "@import" not in page and "url(" not in page


def test_input_errors(demo):
    with pytest.raises(TypeError, match="expected an nn.Module"):
        batchnorm.audit("model", torch.randn(4, 40))
    with pytest.raises(ValueError, match="one label per sample"):
        batchnorm.audit(demo, torch.randn(8, 40), labels=torch.zeros(3))
    with pytest.raises(ValueError, match="batch_size"):
        batchnorm.audit(demo, torch.randn(8, 40), batch_size=0)
    with pytest.raises(ValueError, match="no batch"):
        batchnorm.audit(demo, [])
    report = batchnorm.audit(nn.Linear(3, 2), torch.randn(4, 3))
    assert [f.check for f in report.findings] == ["no-batch-norm"]


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli_files(demo, mnist, tmp_path):
    with torch.no_grad():
        demo[2].weight[[7, 9]] = 0.0  # planted dead channels (a warning)
    weights = tmp_path / "weights.pt"
    torch.save(demo.state_dict(), weights)
    data = tmp_path / "data.npz"
    np.savez(
        data,
        x_train=mnist.x_train[:1000].numpy(),
        y_train=mnist.y_train[:1000].numpy(),
        x_test=mnist.x_test[:500].numpy(),
        y_test=mnist.y_test[:500].numpy(),
    )
    return weights, data


def test_cli_end_to_end(cli_files, tmp_path, capsys):
    weights, data = cli_files
    out_json, out_html = tmp_path / "audit.json", tmp_path / "audit.html"
    args = ["audit", "--model", FACTORY, "--weights", str(weights), "--data", str(data)]
    status = main([*args, "--json", str(out_json), "--html", str(out_html), "--no-timing"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "dead-channels" in captured.out and "w = model[2].weight; w[w.abs()" in captured.out
    report = json.loads(out_json.read_text())
    assert report["settings"]["samples"] == 1000 and report["metric"]["name"] == "accuracy"
    dead = [f for f in report["findings"] if f["check"] == "dead-channels"]
    assert [(f["layer"], f["severity"], f["evidence"]["dead"]) for f in dead] == [
        ("2", "warning", [7, 9])
    ]
    assert_self_contained(out_html.read_text())
    assert main([*args, "--split", "test", "--fail-on", "warning", "--no-timing"]) == 1
    assert main([*args, "--fail-on", "error", "--no-timing"]) == 0
    capsys.readouterr()


def test_cli_errors(cli_files, tmp_path, capsys):
    weights, data = cli_files
    args = ["audit", "--model", FACTORY, "--weights", str(weights)]
    cases = [
        ([*args, "--data", str(tmp_path / "missing.npz")], "no such file"),
        ([*args, "--data", str(data), "--sample-shape", "3,7"], "--sample-shape 3,7 has 21"),
        ([*args, "--data", str(data), "--sample-shape", "2,20"], "the model failed on the data"),
        ([*args, "--data", str(data), "--json", str(tmp_path / "no" / "a.json")], "does not"),
        (["audit", "--model", "nope", "--data", str(data)], "pkg.module:factory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
