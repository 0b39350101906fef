"""The training loop, the probes and the models, checked against independent computations
(numpy quantiles, norms of the gradients, torch.nn's BatchNorm1d)."""

from __future__ import annotations

import copy
import json
from functools import partial
from itertools import pairwise

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.fit import adam, evaluate, fit, resolve_device, torch_threads
from batchnorm.lab.models import article_model, copy_shared_weights, ioffe_mlp
from batchnorm.lab.probes import ActivationQuantiles, GradientNorms
from batchnorm.lab.report import write_metrics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(data, bn="batchnorm", seed=0):
    torch.manual_seed(seed)
    return article_model(data.num_features, data.num_classes, bn, hidden=16)


# ---------------------------------------------------------------------------------------
# fit


def test_history_bookkeeping(blobs_data):
    model = _model(blobs_data)
    history = fit(model, adam(model.parameters(), 1e-2), blobs_data, steps=25, batch_size=20,
                  eval_every=10, progress=False)  # fmt: skip
    # 240 samples in batches of 20: 12 steps per epoch; evaluations at 0, 10, 20 and the end.
    assert history.steps_per_epoch == 12
    assert history.steps == [0, 10, 20, 25]
    assert history.epochs == pytest.approx([0, 10 / 12, 20 / 12, 25 / 12])
    assert len(history.step_loss) == 25
    assert history.train_loss[0] is None and history.train_accuracy[0] is None
    # Each training-loss entry is the mean of the step losses since the previous evaluation.
    for (a, b), value in zip([(0, 10), (10, 20), (20, 25)], history.train_loss[1:], strict=True):
        assert value == pytest.approx(np.mean(history.step_loss[a:b]), rel=1e-6)
    assert all(0 <= a <= 1 for a in history.train_accuracy[1:])
    assert history.train_seconds > 0 and history.eval_seconds > 0
    json.dumps(history.to_dict())  # plain data


def test_final_evaluation_is_the_model_in_eval_mode(blobs_data):
    model = _model(blobs_data)
    history = fit(model, adam(model.parameters(), 1e-2), blobs_data, epochs=3, batch_size=24,
                  progress=False)  # fmt: skip
    assert model.training  # the loop leaves the model as it trains
    model.eval()
    with torch.no_grad():
        logits = model(blobs_data.x_test)
    accuracy = (logits.argmax(1) == blobs_data.y_test).double().mean().item()
    loss = nn.functional.cross_entropy(logits, blobs_data.y_test).item()
    assert history.test_accuracy[-1] == pytest.approx(accuracy)
    assert history.test_loss[-1] == pytest.approx(loss, rel=1e-5)
    assert history.test_accuracy[-1] > 0.8  # the clusters are learnable
    assert evaluate(model, blobs_data.x_test, blobs_data.y_test) == pytest.approx((loss, accuracy))


def test_same_seed_same_batches_same_result(blobs_data):
    runs = []
    for _ in range(2):
        model = _model(blobs_data)
        runs.append(fit(model, torch.optim.SGD(model.parameters(), 0.1), blobs_data, steps=30,
                        batch_size=16, seed=7, progress=False))  # fmt: skip
    assert runs[0].step_loss == runs[1].step_loss
    model = _model(blobs_data)
    other = fit(model, torch.optim.SGD(model.parameters(), 0.1), blobs_data, steps=30,
                batch_size=16, seed=8, progress=False)  # fmt: skip
    assert other.step_loss != runs[0].step_loss


@pytest.mark.parametrize("device", DEVICES)
def test_our_batchnorm_trains_like_torch_nn(blobs_data, device):
    """The loop gives the same curves with batchnorm.BatchNorm1d as with torch.nn's."""
    data = blobs_data.to(device)
    histories = {}
    for bn in ("batchnorm", "torch"):
        model = _model(data, bn).to(device)
        histories[bn] = fit(model, torch.optim.SGD(model.parameters(), 0.05), data, steps=40,
                            batch_size=20, eval_every=20, progress=False)  # fmt: skip
    np.testing.assert_allclose(
        histories["batchnorm"].step_loss, histories["torch"].step_loss, rtol=1e-4, atol=1e-5
    )
    # Rounding may flip a near-tied prediction: allow one test sample of difference.
    np.testing.assert_allclose(
        histories["batchnorm"].test_accuracy, histories["torch"].test_accuracy, atol=1 / 60
    )


def test_fit_rejects_bad_settings(blobs_data):
    model = _model(blobs_data)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(ValueError, match=r"batch_size must be an int in 1..240"):
        fit(model, opt, blobs_data, steps=1, batch_size=500)
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        fit(model, opt, blobs_data, steps=1, epochs=1)
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        fit(model, opt, blobs_data)
    with pytest.raises(ValueError, match="positive ints"):
        fit(model, opt, blobs_data, steps=0)
    with pytest.raises(ValueError, match="eval_every must be a positive int"):
        fit(model, opt, blobs_data, steps=2, eval_every=0)
    with pytest.raises(ValueError, match="the model is on meta and the data on cpu"):
        fit(model.to("meta"), opt, blobs_data, steps=2)


def test_diverged_training_writes_strict_json(blobs_data, tmp_path):
    model = _model(blobs_data, bn=None)
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    history = fit(model, torch.optim.SGD(model.parameters(), 0.1), blobs_data, steps=3,
                  batch_size=40, progress=False)  # fmt: skip
    path = write_metrics(tmp_path / "m.json", history.to_dict())
    loaded = json.loads(path.read_text())  # strict: NaN became null
    assert loaded["test_loss"][-1] is None and loaded["step_loss"] == [None] * 3


def test_progress_goes_to_stderr_as_plain_lines_off_a_terminal(blobs_data, capsys):
    model = _model(blobs_data)
    fit(model, adam(model.parameters(), 1e-3), blobs_data, steps=40, batch_size=20,
        label="probe")  # fmt: skip
    out, err = capsys.readouterr()
    assert out == ""  # progress never writes to stdout
    lines = err.splitlines()  # captured stderr is not a terminal: plain lines, no bar
    assert "\r" not in err and 1 <= len(lines) <= 10, lines
    assert lines[-1].startswith("probe: 40/40 steps (100 %)") and "test acc" in lines[-1]
    fit(model, adam(model.parameters(), 1e-3), blobs_data, steps=12, batch_size=20,
        progress=False)  # fmt: skip
    assert capsys.readouterr() == ("", "")


def test_resolve_device_and_threads():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees 0 CUDA device"):
            resolve_device("cuda")
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------
# Probes


def test_activation_quantiles_match_numpy(blobs_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    pooled = ActivationQuantiles({"relu in": "1"}, (0.15, 0.5, 0.85))
    per_unit = ActivationQuantiles({"relu in": "1"}, (0.15, 0.5, 0.85), per_unit=True)
    logits = ActivationQuantiles({"logits": "2"}, (0.1, 0.9), of="output")
    probes = {"pooled": pooled, "per_unit": per_unit, "logits": logits}
    history = fit(model, torch.optim.SGD(model.parameters(), 0.1), blobs_data, steps=24,
                  batch_size=20, eval_every=12, probes=probes, progress=False)  # fmt: skip
    assert history.probes["pooled"]["steps"] == [0, 12, 24]
    # The last record is of the final model: recompute it independently.
    with torch.no_grad():
        hidden = model[0](blobs_data.x_test).numpy()
        out = model(blobs_data.x_test).numpy()
    q = (0.15, 0.5, 0.85)
    np.testing.assert_allclose(
        history.probes["pooled"]["layers"]["relu in"][-1], np.quantile(hidden.ravel(), q),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(
        history.probes["per_unit"]["layers"]["relu in"][-1], np.quantile(hidden, q, axis=0),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(
        history.probes["logits"]["layers"]["logits"][-1], np.quantile(out.ravel(), (0.1, 0.9)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    # Hooks are gone after training.
    assert not model[1]._forward_pre_hooks and not model[2]._forward_hooks


def test_activation_quantiles_errors():
    with pytest.raises(ValueError, match="of must be 'input' or 'output'"):
        ActivationQuantiles({"a": "0"}, of="middle")
    with pytest.raises(ValueError, match=r"quantiles must lie in \[0, 1\]"):
        ActivationQuantiles({"a": "0"}, (0.5, 50))
    probe = ActivationQuantiles({"a": "7"})
    with pytest.raises(ValueError, match="has no submodule '7'; its submodules are"):
        probe.attach(nn.Sequential(nn.Linear(2, 2)))


def test_gradient_norms_match_the_gradients():
    torch.manual_seed(0)
    model = article_model(6, 4, "batchnorm", hidden=8)
    probe = GradientNorms()
    probe.attach(model)
    for step in (1, 2):
        model.zero_grad(set_to_none=True)
        x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
        nn.functional.cross_entropy(model(x), y).backward()
        probe.after_step(step)
        expected = {
            f"{path} {type(m).__name__}": torch.cat([p.grad.ravel() for p in m.parameters()])
            .norm()
            .item()
            for path, m in model.named_children()
            if list(m.parameters())
        }
        got = {label: values[-1] for label, values in probe.result()["layers"].items()}
        assert list(got) == ["0 Linear", "2 BatchNorm1d", "3 Linear"]
        assert got == pytest.approx(expected, rel=1e-5)
    probe.detach()
    assert probe.result()["steps"] == [1, 2]


def test_gradient_norms_every_step_in_fit(blobs_data):
    model = _model(blobs_data, bn=None)
    history = fit(model, adam(model.parameters(), 1e-3), blobs_data, steps=15, batch_size=30,
                  probes={"g": GradientNorms({"first": "0"})}, progress=False)  # fmt: skip
    result = history.probes["g"]
    assert result["steps"] == list(range(1, 16))
    assert list(result["layers"]) == ["first"] and len(result["layers"]["first"]) == 15
    assert all(v > 0 for v in result["layers"]["first"])


# ---------------------------------------------------------------------------------------
# Models


def test_article_model_layers_and_shared_weights():
    torch.manual_seed(3)
    without = article_model(40, 10, None)
    with_bn = article_model(40, 10, "batchnorm")
    own = copy_shared_weights(without, with_bn)
    assert [type(m) for m in with_bn] == [nn.Linear, nn.ReLU, batchnorm.BatchNorm1d, nn.Linear]
    assert isinstance(without[2], nn.Identity)
    assert isinstance(article_model(40, 10, "torch")[2], nn.BatchNorm1d)
    assert all(key.startswith("2.") for key in own) and "2.running_mean" in own
    for key, value in without.state_dict().items():
        assert torch.equal(with_bn.state_dict()[key], value)
    with pytest.raises(ValueError, match="differ beyond extra layers"):
        copy_shared_weights(with_bn, without)
    with pytest.raises(ValueError, match="unknown batch-norm implementation 'keras'"):
        article_model(4, 2, "keras")


def test_ioffe_mlp_layers():
    model = ioffe_mlp(40, 10, "batchnorm", "sigmoid")
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + ["Linear"]
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [100, 100, 100, 10]
    plain = ioffe_mlp(40, 10, None, "relu")
    assert isinstance(plain[1], nn.Identity) and isinstance(plain[8], nn.ReLU)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        ioffe_mlp(40, 10, None, "gelu")


def test_copying_a_model_keeps_probes_independent(blobs_data):
    """Probes hold no reference to a model after detaching (deepcopy of a trained model)."""
    model = _model(blobs_data)
    fit(model, adam(model.parameters(), 1e-3), blobs_data, steps=2, batch_size=20,
        probes={"g": GradientNorms()}, progress=False)  # fmt: skip
    copy.deepcopy(model)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Epoch timing (the numbers themselves are benchmarks, not tested)


def test_time_interleaved_shuffles_the_order_of_every_round():
    """Each run is called once a round, after a different run from round to round (a fixed
    order gives every run the same predecessor, whose caches it meets each time), and the
    same seed gives the same orders (distributed benchmarks call together)."""
    from batchnorm.lab.timing import time_interleaved

    def calls(seed: int) -> list[str]:
        log: list[str] = []
        runs = {name: partial(log.append, name) for name in "abcd"}
        times = time_interleaved(runs, reps=40, warmup=0, seed=seed)
        assert {name: len(t) for name, t in times.items()} == dict.fromkeys("abcd", 40)
        return log

    log = calls(0)
    rounds = [log[i : i + 4] for i in range(0, len(log), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    pairs = {pair for r in rounds for pair in pairwise(r)}  # (a, then b) in a round
    assert pairs == {(a, b) for a in "abcd" for b in "abcd" if a != b}
    assert len({tuple(r) for r in rounds}) > 10
    assert calls(0) == log and calls(1) != log


def test_epoch_seconds_reports_each_implementation():
    from batchnorm.lab.timing import epoch_seconds, synthetic_data

    data = synthetic_data(samples=300)
    before = torch.get_num_threads()
    result = epoch_seconds(epochs=1, repeats=2, data=data)
    assert torch.get_num_threads() == before
    assert set(result["epoch_seconds"]) == {"batchnorm", "torch", "none"}
    for timing in result["epoch_seconds"].values():
        assert len(timing["samples"]) == 2 and all(t > 0 for t in timing["samples"])
        assert timing["median"] == pytest.approx(np.median(timing["samples"]))
    medians = {k: v["median"] for k, v in result["epoch_seconds"].items()}
    assert result["ratio_batchnorm_to_torch"] == pytest.approx(
        medians["batchnorm"] / medians["torch"]
    )
    ours, theirs = (result["epoch_seconds"][k]["samples"] for k in ("batchnorm", "torch"))
    assert result["paired_ratio_batchnorm_to_torch"] == pytest.approx(
        np.median(np.array(ours) / np.array(theirs))
    )
    assert result["steps_per_epoch"] == 3 and result["threads"] == 1
    json.dumps(result)
    with pytest.raises(ValueError, match="unknown implementations"):
        epoch_seconds(["apex"])
