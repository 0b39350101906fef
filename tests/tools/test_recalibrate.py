"""batchnorm.recalibrate (PreciseBN): running statistics become the exact float64 statistics
of every value each BN layer received, in one process and across 2 gloo processes."""

from __future__ import annotations

import copy
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from conftest import random_input

# The acceptance bound: recalibrated statistics equal a one-pass float64 oracle.
RECALIBRATION_TOL = 1e-6
# A 2-process run starts two Python interpreters that import torch; never wait forever.
DISTRIBUTED_TIMEOUT_S = 120
BATCH_SIZES = [(7, 16, 5), (9, 4)]  # per rank: unequal batch sizes, weighted by size


def make_model(seed: int = 0) -> nn.Module:
    """torch.nn and our BN, momentum=None among them, a BN after dropout and one in 2-D."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        batchnorm.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(6, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6, momentum=None),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 8),
        batchnorm.BatchNorm1d(8, momentum=0.3),
        nn.Linear(8, 3),
    )


def batches(sizes, seed):
    return [
        (random_input((n, 3, 4, 4), seed=seed + i, mean=3.0, std=2.0), torch.zeros(n))
        for i, n in enumerate(sizes)
    ]


def oracle(model: nn.Module, data) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run each batch with only the BN layers in training mode, capture every BN's inputs
    with forward pre-hooks, then one float64 var_mean over their concatenation."""
    model = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            m.train()
            m.register_forward_pre_hook(
                lambda _m, i, name=name: seen.setdefault(name, []).append(i[0])
            )
    with torch.no_grad():
        for x, _ in data:
            model(x)
    stats = {}
    for name, xs in seen.items():
        x = torch.cat(xs).double()
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=1)
        stats[name] = (mean, var)
    return stats


def assert_matches(model, expected):
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            mean, var = expected[name]
            torch.testing.assert_close(
                m.running_mean.double(), mean, rtol=RECALIBRATION_TOL, atol=RECALIBRATION_TOL
            )
            torch.testing.assert_close(
                m.running_var.double(), var, rtol=RECALIBRATION_TOL, atol=RECALIBRATION_TOL
            )


def test_population_statistics_modes_and_momentum(capsys):
    model = make_model()
    model.train()
    model[3].eval()  # a submodule in its own mode: must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    counters = {
        n: m.num_batches_tracked.clone()
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm)
    }
    momenta = [m.momentum for m in model.modules() if isinstance(m, _BatchNorm)]
    data = batches(BATCH_SIZES[0], seed=0)
    expected = oracle(model, data)

    def no_grad_hook(module, inputs):
        assert not torch.is_grad_enabled()

    model[1].register_forward_pre_hook(no_grad_hook)
    assert batchnorm.recalibrate(model, data) is model
    assert_matches(model, expected)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert [m.momentum for m in model.modules() if isinstance(m, _BatchNorm)] == momenta
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            assert torch.equal(m.num_batches_tracked, counters[name])
    assert all(p.grad is None for p in model.parameters())
    assert "recalibrate: 3/3 batches (100 %)" in capsys.readouterr().err


def test_num_batches_and_plain_tensors():
    model = make_model()
    data = [x for x, _ in batches(BATCH_SIZES[0], seed=0)]
    expected = oracle(model, [(x, None) for x in data[:2]])
    batchnorm.recalibrate(model, iter(data), num_batches=2, progress=False)
    assert_matches(model, expected)


def test_large_mean_is_stable_in_float32():
    """Values around 1e4 with unit spread: E[x²]-E[x]² would lose every digit in float32."""
    model = nn.Sequential(nn.BatchNorm1d(4))
    data = [(random_input((50, 4), seed=s, mean=1e4), None) for s in range(4)]
    expected = oracle(model, data)
    batchnorm.recalibrate(model, data, progress=False)
    assert_matches(model, expected)


def test_errors_and_warnings():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        batchnorm.recalibrate([1], [])
    with pytest.raises(ValueError, match="num_batches must be a positive int or None"):
        batchnorm.recalibrate(make_model(), [], num_batches=0)
    with pytest.warns(UserWarning, match="no batch-norm layer with running statistics"):
        batchnorm.recalibrate(nn.Linear(2, 2), [])
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"3 batch-norm layer\(s\) received no data"):
        batchnorm.recalibrate(model, [], progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a failing batch leaves the model as it was
    data = batches([4], seed=0) + [(torch.ones(2, 5), None)]
    with pytest.raises(RuntimeError):
        batchnorm.recalibrate(model, data, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training


# --------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=__import__("datetime").timedelta(seconds=60),
    )  # fmt: skip
    try:
        model = make_model()
        batchnorm.recalibrate(model, batches(BATCH_SIZES[rank], seed=10 * rank), progress=False)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_merge_statistics(tmp_path):
    if not dist.is_available():  # some torch builds (e.g. macOS wheels) lack it; ours has it
        pytest.skip("torch.distributed is not built in this torch")
    context = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DISTRIBUTED_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process recalibration did not finish in {DISTRIBUTED_TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    model = make_model()
    everything = batches(BATCH_SIZES[0], seed=0) + batches(BATCH_SIZES[1], seed=10)
    expected = oracle(model, everything)
    for rank in range(2):
        model.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True))
        assert_matches(model, expected)


def test_progress_on_a_non_terminal_is_a_few_plain_lines(capsys):
    """Captured stderr is not a terminal: no carriage returns, a line per tenth at most."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    data = [torch.randn(4, 4) for _ in range(200)]
    batchnorm.recalibrate(model, data)
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines) and 1 <= len(lines) <= 10, lines
    assert lines[0].startswith("recalibrate: 20/200 batches (10 %)")
    assert lines[-1].startswith("recalibrate: 200/200 batches (100 %)")
    batchnorm.recalibrate(model, iter(data))  # unknown length: 1, 2, 5 ... and the end
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        f"recalibrate: {n} batches" for n in (1, 2, 5, 10, 20, 50, 100, 200)
    ]
    batchnorm.recalibrate(model, data, progress=False)
    assert capsys.readouterr().err == ""
