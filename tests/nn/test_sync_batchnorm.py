"""SyncBatchNorm: parity with single-process BN on the concatenated batch, the protocol
(one all_reduce forward, one backward), faults, conversion, and the distributed helpers.

Multi-process checks run in a few launches of 2 or 3 gloo processes on 127.0.0.1 (one
launch per group of checks, since starting processes is the slow part); each check's
outcome comes back to its own pytest test. Every launch has a hard timeout.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import SkippedLayerWarning, distributed, ops
from batchnorm.distributed import SyncBatchNorm
from conftest import TOLERANCES, assert_close, random_input

#: Process-group timeout of the workers: a desynchronized check fails within this long.
PG_TIMEOUT_S = 10.0
#: Hard limit of one launch (process start-up on a loaded 2-core machine included).
LAUNCH_TIMEOUT_S = 150.0
#: The hung-rank check's process-group timeout, short to keep the suite fast.
HUNG_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------------------
# Parity with torch.nn on the concatenated batch (runs inside each rank)


def _oracle(shape, dtype, **config):
    """torch.nn batch norm for the full batch; ranks above 5 go through BatchNorm1d on the
    flattened spatial dimensions (the same statistics)."""
    kind = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    bn = kind.get(len(shape), nn.BatchNorm1d)(shape[1], dtype=dtype, **config)
    if len(shape) <= 5:
        return bn, bn
    return bn, lambda x: bn(x.flatten(2)).view(x.shape)


def _parity(
    ctx,
    dtype,
    inner,
    sizes,
    *,
    channels_last=False,
    activation=None,
    residual=False,
    steps=2,
    **config,
):
    """Train ``steps`` steps on this rank's share of a global batch of ``sizes`` and compare
    outputs, gradients, running statistics and the step count with torch.nn on all of it."""
    channels, total = inner[0], sum(sizes)
    start, count = sum(sizes[: ctx.rank]), sizes[ctx.rank]
    layer = SyncBatchNorm(channels, dtype=dtype, **config)
    layer.activation, layer.negative_slope = activation, 0.2
    oracle, apply_oracle = _oracle((total, *inner), dtype, **config)
    if oracle.weight is not None:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            oracle.weight.copy_(torch.rand(channels, generator=g, dtype=dtype) + 0.5)
            if oracle.bias is not None:
                oracle.bias.copy_(torch.randn(channels, generator=g, dtype=dtype))
    layer.load_state_dict(oracle.state_dict())
    for step in range(steps):
        shape = (total, *inner)
        x_full = random_input(shape, dtype, channels_last, seed=step, mean=step)
        dy_full = random_input(shape, dtype, seed=100 + step)
        r_full = random_input(shape, dtype, seed=200 + step) if residual else None
        rows = slice(start, start + count)
        x = x_full[rows].clone().requires_grad_()
        r = r_full[rows].clone().requires_grad_() if residual else None
        y = layer(x, r)
        y.backward(dy_full[rows])

        x_ref = x_full.clone().requires_grad_()
        r_ref = r_full.clone().requires_grad_() if residual else None
        y_ref = apply_oracle(x_ref) + (r_ref if residual else 0)
        if activation == "leaky_relu":
            y_ref = F.leaky_relu(y_ref, 0.2)
        elif activation is not None:
            y_ref = getattr(F, activation)(y_ref)
        y_ref.backward(dy_full)

        assert y.shape == x.shape and y.dtype == dtype
        assert_close(y, y_ref[rows].detach(), dtype)
        assert_close(x.grad, x_ref.grad[rows], dtype)
        if residual:
            assert_close(r.grad, r_ref.grad[rows], dtype)
        for mine, theirs in ((layer.weight, oracle.weight), (layer.bias, oracle.bias)):
            if mine is not None:  # local sums; DDP would reduce them
                grad = mine.grad.clone()
                dist.all_reduce(grad)
                assert_close(grad, theirs.grad, dtype)
                mine.grad = theirs.grad = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        mine, theirs = getattr(layer, name), getattr(oracle, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            assert_close(mine, theirs, dtype)


LEAKY_RESIDUAL = {"activation": "leaky_relu", "residual": True}
PARITY_2 = {
    "f64_2d_uneven_3_5": (torch.float64, (3,), (3, 5), {}),
    "f64_3d_uneven_5_3": (torch.float64, (4, 6), (5, 3), {"momentum": None}),
    "f64_4d_channels_last_empty_rank": (torch.float64, (3, 4, 5), (0, 4), {"channels_last": True}),
    "f64_4d_empty_rank_last": (torch.float64, (3, 4, 5), (4, 0), {}),
    "f64_5d_no_affine": (torch.float64, (2, 3, 2, 3), (3, 2), {"affine": False}),
    "f64_6d_no_tracking": (torch.float64, (3, 2, 2, 2, 2), (2, 3), {"track_running_stats": False}),
    "f64_one_sample_each": (torch.float64, (5,), (1, 1), {"bias": False}),
    "f64_leaky_relu_residual": (torch.float64, (4, 3, 3), (3, 5), LEAKY_RESIDUAL),
    "f64_leaky_relu_residual_empty_rank": (torch.float64, (4, 6), (0, 4), LEAKY_RESIDUAL),
    "f64_silu": (torch.float64, (4, 7), (6, 2), {"activation": "silu", "momentum": 0.3}),
    "f32_4d_uneven_3_5": (torch.float32, (6, 5, 5), (3, 5), {}),
    "f32_2d_relu": (torch.float32, (16,), (7, 9), {"activation": "relu"}),
}
PARITY_3 = {
    "f64_4d_3_0_5": (torch.float64, (3, 4, 5), (3, 0, 5), {}),
    "f64_3d_residual": (torch.float64, (5, 4), (2, 6, 1), {"residual": True}),
    "f32_2d_1_2_4": (torch.float32, (8,), (1, 2, 4), {"momentum": None}),
}


def _parity_check(table, name):
    dtype, inner, sizes, config = table[name]
    return lambda ctx: _parity(ctx, dtype, inner, sizes, **config)


# ---------------------------------------------------------------------------------------
# Other checks run inside the ranks


def _large_mean(ctx):
    """Channel means 1e4, std 1, float32: the shifted float64 message keeps the variance
    exact (a float32 E[x²] − E[x]² would lose every digit); compared with float64 BN on the
    same float32 values."""
    sizes = (3, 5)
    g = torch.Generator().manual_seed(11)
    x_full = (torch.randn(sum(sizes), 4, 50, generator=g, dtype=torch.float64) + 1e4).float()
    start = sum(sizes[: ctx.rank])
    layer = SyncBatchNorm(4, momentum=1.0)  # running stats = this batch's statistics
    y = layer(x_full[start : start + sizes[ctx.rank]])
    x64 = x_full.double()
    var, mean = torch.var_mean(x64, dim=(0, 2), correction=1)
    assert_close(layer.running_mean, mean.float(), rtol=1e-6, atol=0)
    assert_close(layer.running_var, var.float(), rtol=1e-5, atol=0)
    y_ref = F.batch_norm(x64, None, None, training=True)[start : start + sizes[ctx.rank]]
    # float32 centering of values near 1e4 costs about eps32 * 1e4 / std, as in single-process
    # BN; the statistics themselves add nothing visible.
    tolerance = 8 * torch.finfo(torch.float32).eps * 1e4
    assert_close(y.double(), y_ref, atol=tolerance, rtol=0)


def _protocol(ctx):
    """One all_reduce forward and one backward of the sizes sync_message_bytes states; none
    in eval mode; a one-off 4-value check on the first step."""
    calls = []
    original = dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append((tensor.numel() * tensor.element_size(), str(op).split(".")[-1]))
        return original(tensor, op=op, group=group, async_op=async_op)

    channels = 6
    expected = distributed.sync_message_bytes(channels, torch.float32)
    fwd, bwd = (expected["forward"], "SUM"), (expected["backward"], "SUM")
    assert expected == {"forward": (2 * channels + 3) * 8, "backward": 2 * channels * 4}
    layer = SyncBatchNorm(channels)
    x = random_input((4, channels, 3), seed=ctx.rank).requires_grad_()
    dist.all_reduce = counting
    try:
        layer(x).sum().backward()
        assert calls == [(32, "MAX"), fwd, bwd], calls
        calls.clear()
        layer(x).sum().backward()
        assert calls == [fwd, bwd], calls
        calls.clear()
        layer.eval()
        layer(x).sum().backward()
        assert calls == [], calls
        layer.train()
        with torch.no_grad():
            layer(x)
        assert calls == [fwd], calls
        calls.clear()
        layer(x.detach()).sum().backward()  # only the weights need gradients: no dx, no sums
        assert calls == [fwd], calls
    finally:
        dist.all_reduce = original


def _expect_error(fn, error, *fragments):
    try:
        fn()
    except error as err:
        for fragment in fragments:
            assert fragment in str(err), (fragment, str(err))
        return
    raise AssertionError(f"expected {error.__name__} with {fragments}, got no error")


def _channel_mismatch(ctx):
    """num_features differ across ranks: ValueError on every rank, naming both counts; the
    group stays usable."""
    channels = 4 if ctx.rank < ctx.world_size - 1 else 5
    layer = SyncBatchNorm(channels)
    _expect_error(lambda: layer(torch.randn(3, channels)), ValueError,
                  "num_features differ", "between 4 and 5", f"has {channels}")  # fmt: skip
    healthy = torch.ones(1)
    dist.all_reduce(healthy)
    assert healthy.item() == ctx.world_size


def _dtype_mismatch(ctx):
    dtype = torch.float32 if ctx.rank == 0 else torch.float64
    layer = SyncBatchNorm(3, dtype=dtype)
    _expect_error(lambda: layer(torch.randn(4, 3, dtype=dtype)), ValueError,
                  "different dtypes", "32", "64")  # fmt: skip


def _dtype_changes_later(ctx):
    """A rank that changes dtype after the first (checked) step: ValueError on every rank,
    not an abort of the process group in the backward's mixed-dtype all_reduce."""
    layer = SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3)
    layer.float()(x).sum().backward()  # agreed: float32 on every rank
    if ctx.rank == 1:
        layer.double()
        x = x.double()
    _expect_error(lambda: layer(x.requires_grad_()).sum().backward(), ValueError,
                  "different dtypes in this step", f"rank {ctx.rank}")  # fmt: skip
    healthy = torch.ones(1)
    dist.all_reduce(healthy)
    assert healthy.item() == ctx.world_size


def _global_single_value(ctx):
    """One value per channel in the whole group is an error on every rank; none in the whole
    group is an empty step that leaves the statistics alone, as torch.nn does."""
    layer = SyncBatchNorm(3)
    layer(torch.randn(2, 3))  # passes the agreement check
    n = 1 if ctx.rank == 0 else 0
    _expect_error(lambda: layer(torch.randn(n, 3)), ValueError,
                  "more than 1 value per channel", "across the")  # fmt: skip
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(torch.randn(0, 3))
    assert y.shape == (0, 3)
    assert torch.equal(layer.running_mean, before["running_mean"])
    assert torch.equal(layer.running_var, before["running_var"])


def article_mlp(in_features=40):
    """The article's model: Dense(128, relu) -> BatchNormalization -> Dense(10)."""
    return nn.Sequential(
        nn.Linear(in_features, 128), nn.ReLU(), nn.BatchNorm1d(128), nn.Linear(128, 10)
    )


def _ddp_training(ctx):
    """DDP + SyncBatchNorm on uneven shares of each batch trains exactly as one process on
    the whole batch; metrics gathered on rank 0; revert gives back torch's BatchNorm1d."""
    torch.manual_seed(0)
    model = article_mlp().double()
    single = copy.deepcopy(model)
    ddp = distributed.wrap_model(model, ctx)
    assert isinstance(ddp.module[2], SyncBatchNorm)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    single_optimizer = torch.optim.Adam(single.parameters(), lr=1e-2)
    batch = 51  # uneven shares: 26 and 25 (2 ranks), 17 each (3 ranks)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(batch, 40, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 10, (batch,), generator=g)
        part = distributed.local_slice(batch, ctx)
        # Sum over the local share / global batch size, times W because DDP averages
        # gradients: the mean loss over the global batch.
        local = F.cross_entropy(ddp(x[part]), labels[part], reduction="sum")
        loss = local * ctx.world_size / batch
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        single_loss = F.cross_entropy(single(x), labels)
        single_optimizer.zero_grad()
        single_loss.backward()
        single_optimizer.step()
    gathered = distributed.gather_on_main(local.item(), ctx)
    if ctx.is_main:
        assert len(gathered) == ctx.world_size
        assert abs(sum(gathered) / batch - single_loss.item()) < 1e-10
    else:
        assert gathered is None
    for key, value in single.state_dict().items():
        assert_close(ddp.module.state_dict()[key], value, torch.float64)
    plain = batchnorm.revert_sync_batchnorm(ddp.module)
    assert type(plain[2]) is nn.BatchNorm1d
    plain.eval(), single.eval()
    x = torch.randn(8, 40, dtype=torch.float64)
    assert_close(plain(x), single(x), torch.float64)


def _local_slice_covers(ctx):
    for total in (0, 1, 5, 51):
        contexts = [
            distributed.DistributedContext(r, ctx.world_size, 0, ctx.device, ctx.backend)
            for r in range(ctx.world_size)
        ]
        shares = [distributed.local_slice(total, c) for c in contexts]
        covered = [i for s in shares for i in range(total)[s]]
        assert covered == list(range(total))
        assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


CHECKS = {
    2: {
        **{f"parity_{n}": _parity_check(PARITY_2, n) for n in PARITY_2},
        "large_mean": _large_mean,
        "protocol": _protocol,
        "channel_mismatch": _channel_mismatch,
        "dtype_mismatch": _dtype_mismatch,
        "dtype_changes_later": _dtype_changes_later,
        "global_single_value": _global_single_value,
        "ddp_training": _ddp_training,
        "local_slice": _local_slice_covers,
    },
    3: {
        **{f"parity_{n}": _parity_check(PARITY_3, n) for n in PARITY_3},
        "protocol": _protocol,
        "channel_mismatch": _channel_mismatch,
    },
}


def _run_checks(world_size, backend=None):
    """Worker: join the group from torchrun-style variables, run every check (with
    ``backend``: the parity checks only, every local computation forced onto it), report
    each outcome (None or a traceback) rather than stopping at the first failure."""
    ctx = distributed.init_from_env(timeout_s=PG_TIMEOUT_S)
    assert (ctx.world_size, ctx.backend, ctx.device.type) == (world_size, "gloo", "cpu")
    checks = CHECKS[world_size]
    forced = contextlib.nullcontext()
    if backend is not None:
        checks = {name: check for name, check in checks.items() if name.startswith("parity_")}
        forced = ops.use_backend(backend, lenient=True)
    outcomes = {}
    with forced:
        for name, check in checks.items():
            try:
                check(ctx)
                outcomes[name] = None
            except Exception:
                outcomes[name] = traceback.format_exc()
    return outcomes


_launched: dict[tuple[int, str | None], list] = {}


def _outcomes(world_size, backend=None):
    """Launch the group of checks once per world size (and forced backend); keep the
    outcomes."""
    if (world_size, backend) not in _launched:
        _launched[world_size, backend] = distributed.launch(
            _run_checks, world_size, (world_size, backend), timeout_s=LAUNCH_TIMEOUT_S
        )
    return _launched[world_size, backend]


def _failures(outcomes):
    return "\n".join(
        f"rank {r} {name}:\n{error}"
        for r, by_name in enumerate(outcomes)
        for name, error in by_name.items()
        if error
    )


#: The kernel backends SyncBatchNorm's local statistics and sums can run on (the Triton
#: kernels too, when the interpreter suite runs this file with TRITON_INTERPRET=1).
KERNEL_BACKENDS = [
    name for name in ops.available_backends("cpu") if not ops.backend_named(name).operator
]


@pytest.mark.parametrize("check", list(CHECKS[2]))
def test_two_ranks(check):
    assert not _failures([{check: o[check]} for o in _outcomes(2)])


@pytest.mark.parametrize("check", list(CHECKS[3]))
def test_three_ranks(check):
    assert not _failures([{check: o[check]} for o in _outcomes(3)])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_two_ranks_parity_on_each_kernel_backend(backend):
    """The parity checks with each kernel backend forced: the cross-process reduction is a
    step of the one core, so every backend's kernels compute SyncBatchNorm's local parts."""
    failures = _failures(_outcomes(2, backend))
    assert not failures, failures


# ---------------------------------------------------------------------------------------
# launch: results holding tensors


def _tensor_result(kind):
    """A result made of tensors, which must outlive the rank that made them (sent through
    shared memory, they vanished when the rank exited and the parent crashed)."""
    rank = int(os.environ["RANK"])
    values = torch.arange(6, dtype=torch.float64) + 10 * rank
    if kind == "tensor":
        return values
    return {"rank": rank, "values": values, "column": values.view(2, 3)[:, 1],
            "ids": [torch.tensor([rank])]}  # fmt: skip


@pytest.mark.parametrize("kind", ["tensor", "dict"])
def test_launch_returns_tensors_intact(kind):
    results = distributed.launch(_tensor_result, 3, (kind,), timeout_s=LAUNCH_TIMEOUT_S)
    assert len(results) == 3
    for rank, result in enumerate(results):
        values = torch.arange(6, dtype=torch.float64) + 10 * rank
        if kind == "tensor":
            assert torch.equal(result, values)
            continue
        assert result["rank"] == rank and torch.equal(result["values"], values)
        assert torch.equal(result["column"], values[1::3])
        assert torch.equal(result["ids"][0], torch.tensor([rank]))


# ---------------------------------------------------------------------------------------
# Faults: a rank that dies, a rank that hangs


def _step(layer):
    layer(torch.randn(4, 3, requires_grad=True)).sum().backward()


def _fault_worker(kind, timeout_s):
    """Rank 1 dies (or stops answering) after one good step; rank 0 reports how its next
    step ended and how long that took."""
    ctx = distributed.init_from_env(timeout_s=timeout_s)
    layer = SyncBatchNorm(3)
    _step(layer)
    if ctx.rank == 1:
        if kind == "dead":
            os._exit(3)
        time.sleep(timeout_s + 1)
        return None
    start = time.monotonic()
    try:
        _step(layer)
    except RuntimeError as err:
        return {"error": str(err), "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


def _raise_on_rank_0():
    raise KeyError("boom")


def test_faults_end_in_errors_within_the_timeouts():
    """A dead rank and a hung one make the survivor raise within the process group's
    timeout; launch reports a failing rank and kills a stuck one at its own timeout. The
    four launches run at once to keep the suite fast."""
    with ThreadPoolExecutor(4) as pool:
        dead = pool.submit(distributed.launch, _fault_worker, 2, ("dead", PG_TIMEOUT_S),
                           timeout_s=LAUNCH_TIMEOUT_S, strict=False)  # fmt: skip
        hung = pool.submit(distributed.launch, _fault_worker, 2, ("hung", HUNG_TIMEOUT_S),
                           timeout_s=LAUNCH_TIMEOUT_S, strict=False)  # fmt: skip
        failing = pool.submit(distributed.launch, _raise_on_rank_0, 1, timeout_s=LAUNCH_TIMEOUT_S)
        start = time.monotonic()
        stuck = pool.submit(distributed.launch, time.sleep, 1, (600,), timeout_s=2.0)
        with pytest.raises(TimeoutError, match=r"ranks \[0\] gave no result within 2 s"):
            stuck.result()
        assert time.monotonic() - start < 30  # killed, not waited for
        with pytest.raises(RuntimeError, match="(?s)rank 0 .*KeyError: 'boom'"):
            failing.result()
        dead, hung = dead.result(), hung.result()
    assert isinstance(dead[1], distributed.RankFailure) and dead[1].exitcode == 3
    for result, limit in ((dead[0], PG_TIMEOUT_S), (hung[0], HUNG_TIMEOUT_S)):
        assert result["error"] is not None, "the surviving rank did not notice"
        assert "SyncBatchNorm(3): the all_reduce of batch statistics failed" in result["error"]
        assert "Hint:" in result["error"]
        assert result["elapsed"] < limit + 5, result
    assert hung[0]["elapsed"] > 0.5 * HUNG_TIMEOUT_S, hung  # it did wait for the timeout


# ---------------------------------------------------------------------------------------
# One process


def test_constructor_and_state_dict_match_torch():
    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    # torch's arguments, in torch's order, then our keyword-only convention switch.
    assert list(ours) == [*theirs, "unbiased_running_var"]
    assert ours["unbiased_running_var"].kind is inspect.Parameter.KEYWORD_ONLY
    assert all(ours[k].default == theirs[k].default for k in theirs if k != "self")
    for config in ({}, {"affine": False}, {"track_running_stats": False}, {"bias": False}):
        a = SyncBatchNorm(5, eps=1e-3, momentum=None, dtype=torch.float64, **config)
        b = nn.SyncBatchNorm(5, eps=1e-3, momentum=None, dtype=torch.float64, **config)
        assert a.state_dict().keys() == b.state_dict().keys()
        for key, value in b.state_dict().items():
            assert a.state_dict()[key].shape == value.shape
            assert a.state_dict()[key].dtype == value.dtype
        b.load_state_dict(a.state_dict())
        a.load_state_dict(b.state_dict())
    assert isinstance(a, torch.nn.modules.batchnorm._BatchNorm)


SHAPES = [(6, 3), (4, 3, 5), (2, 3, 2, 2), (2, 3, 2, 2, 2), (2, 3, 2, 1, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_without_a_process_group_it_is_plain_batch_norm(shape, monkeypatch):
    def no_collectives(*args, **kwargs):
        raise AssertionError("collective call without a process group")

    monkeypatch.setattr(dist, "all_reduce", no_collectives)
    layer = SyncBatchNorm(3, dtype=torch.float64)
    oracle, apply_oracle = _oracle(shape, torch.float64)
    for training in (True, False):
        layer.train(training), oracle.train(training)
        x = random_input(shape, torch.float64, seed=len(shape)).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = layer(x), apply_oracle(x_ref)
        dy = random_input(shape, torch.float64, seed=9)
        y.backward(dy), y_ref.backward(dy)
        assert_close(y, y_ref.detach())
        assert_close(x.grad, x_ref.grad)
        assert_close(layer.running_var, oracle.running_var)


def test_world_size_one_makes_no_collective_call(tmp_path, monkeypatch):
    calls = []
    original = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: calls.append(1) or original(*a, **k))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))  # fmt: skip
    try:
        layer, plain = SyncBatchNorm(4), batchnorm.BatchNorm1d(4)
        x = random_input((5, 4, 3)).requires_grad_()
        layer(x).sum().backward()
        y = plain(x.detach())
        assert calls == []
        assert_close(layer.running_mean, plain.running_mean)
        torch.testing.assert_close(layer(x.detach()), plain(x.detach()), **TOLERANCES[y.dtype])
    finally:
        dist.destroy_process_group()


def test_bad_inputs_name_the_layer():
    layer = SyncBatchNorm(4)
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4\): expected an input of shape"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match="expected 4 channels in dimension 1"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        layer([1.0, 2.0])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4))  # no process group: the local rule


class _VariantLayer(batchnorm.BatchNorm2d):
    """Stands in for a variant with its own forward (ghost, renorm, ...)."""

    def forward(self, input, residual=None):
        return super().forward(input, residual) * 2


def _zoo():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        batchnorm.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.3),
        _VariantLayer(4),
        nn.Sequential(batchnorm.BatchNorm2d(4, momentum=None, bias=False)),
        nn.SyncBatchNorm(4, affine=False),
        nn.Flatten(),
        nn.BatchNorm1d(64, eps=1e-3),
    ).double()


def test_convert_and_revert_keep_classes_options_state_and_outputs():
    model, expected = _zoo(), _zoo()
    model[1].weight.requires_grad_(False)
    for m in (model, expected):
        m(random_input((5, 3, 4, 4), torch.float64))  # move the running statistics
    x = random_input((6, 3, 4, 4), torch.float64, seed=3)
    with pytest.warns(SkippedLayerWarning, match="3: kept _VariantLayer, .* has its own forward"):
        converted = batchnorm.convert_sync_batchnorm(model, process_group="pg")
    kinds = [type(converted[i]) for i in (1, 2, 3, 5, 7)] + [type(converted[4][0])]
    assert kinds == [SyncBatchNorm, SyncBatchNorm, _VariantLayer, SyncBatchNorm, SyncBatchNorm,
                     SyncBatchNorm]  # fmt: skip
    assert converted[2].activation == "leaky_relu" and converted[2].negative_slope == 0.3
    assert converted[1].activation is None and converted[1].process_group == "pg"
    assert converted[1].weight.requires_grad is False
    assert converted[4][0].momentum is None and converted[4][0].bias is None
    assert converted[1].original_class is nn.BatchNorm2d
    # Without a process group the converted model computes what the original did.
    assert_close(converted(x), expected(x))
    for key, value in expected.state_dict().items():
        assert_close(converted.state_dict()[key], value)

    back = batchnorm.revert_sync_batchnorm(converted)
    assert [type(m) for m in back.modules()] == [type(m) for m in _zoo().modules()]
    assert back[2].activation == "leaky_relu" and back[7].eps == 1e-3
    assert back[1].weight.requires_grad is False
    back.eval(), expected.eval()
    assert_close(back(x), expected(x))


def test_convert_a_bare_layer_and_revert_by_input_rank():
    assert type(batchnorm.convert_sync_batchnorm(nn.BatchNorm3d(2))) is SyncBatchNorm
    for shape, kind in (((4, 2), batchnorm.BatchNorm1d), ((2, 2, 3, 3), batchnorm.BatchNorm2d)):
        layer = SyncBatchNorm(2)
        layer(torch.randn(shape))
        plain = batchnorm.revert_sync_batchnorm(layer)
        assert type(plain) is kind and plain.activation is None
        assert torch.equal(plain.running_mean, layer.running_mean)
    with pytest.raises(ValueError, match="has not run yet.*original_class"):
        batchnorm.revert_sync_batchnorm(nn.Sequential(SyncBatchNorm(2)))
    layer = SyncBatchNorm(2)
    layer(torch.randn(2, 2, 1, 1, 1, 2))
    with pytest.raises(ValueError, match="last saw a 6-D input"):
        batchnorm.revert_sync_batchnorm(layer)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        batchnorm.convert_sync_batchnorm("model")


@pytest.mark.parametrize("shape", [(4, 2), (2, 2, 3, 3), (2, 2, 3, 3, 2)])
def test_revert_keeps_a_fused_activation_in_a_batch_norm_act(shape):
    """A SyncBatchNorm with an activation reverts to BatchNormActNd, whether it was built
    directly (the class chosen by the input rank) or converted from a plain BatchNormNd."""
    kind = {2: batchnorm.BatchNormAct1d, 4: batchnorm.BatchNormAct2d,
            5: batchnorm.BatchNormAct3d}[len(shape)]  # fmt: skip
    plain = {2: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}
    x = random_input(shape, torch.float64)
    built = SyncBatchNorm(2, dtype=torch.float64)
    converted = batchnorm.convert_sync_batchnorm(plain[len(shape)](2, dtype=torch.float64))
    for layer in (built, converted):
        layer.activation, layer.negative_slope = "leaky_relu", 0.2
        layer(x)  # the input rank, and running statistics that are not the initial ones
        back = batchnorm.revert_sync_batchnorm(layer)
        assert type(back) is kind
        assert (back.activation, back.negative_slope) == ("leaky_relu", 0.2)
        for key, value in layer.state_dict().items():
            assert torch.equal(back.state_dict()[key], value)
        assert_close(back(x), layer(x))
        back.eval(), layer.eval()
        assert_close(back(x), layer(x))
        assert back(x).min() < 0  # leaky_relu's slope, not relu


def test_init_from_env_without_torchrun_says_how_to_start(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node=2"):
        distributed.init_from_env()
