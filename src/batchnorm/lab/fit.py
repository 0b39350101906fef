"""One training loop for every experiment of the lab: any classifier, any optimizer, our
batch-norm modules or ``torch.nn``'s, CPU or CUDA.

The loop is written so that it adds (almost) nothing to the cost of the model:

* the training set lives on the device as one tensor; each epoch shuffles it once
  (``x[perm]``) and takes mini-batches as slices, views that copy nothing (no DataLoader,
  no per-batch fancy indexing);
* per-step loss and accuracy are written into preallocated device tensors; the host reads
  numbers (``.item()``, a device sync on CUDA) only at evaluations.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm._progress import Progress
from batchnorm.lab.data import Dataset
from batchnorm.lab.probes import Probe

#: Test samples per forward pass in evaluation: bounds memory for large test sets
#: (10 000 MNIST images x 784 features is 31 MB in float32), one pass for ours.
EVAL_CHUNK = 10_000
#: Steps between progress updates (see batchnorm._progress; each costs a little).
PROGRESS_EVERY = 10

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class History:
    """What :func:`fit` measured. Evaluations happen before training (step 0), every
    ``eval_every`` steps and after the last step; lists indexed by evaluation share
    ``steps``."""

    label: str
    steps_per_epoch: int
    batch_size: int
    #: Optimizer steps done at each evaluation.
    steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    #: Mean training mini-batch loss / accuracy since the previous evaluation (None at 0).
    train_loss: list[float | None] = field(default_factory=list)
    train_accuracy: list[float | None] = field(default_factory=list)
    #: Mini-batch loss of every step.
    step_loss: list[float] = field(default_factory=list)
    #: Wall time of the training steps (probes included), and of the evaluations.
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    #: ``Probe.result()`` of each probe, by the probe's name.
    probes: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> list[float]:
        """``steps`` in epochs."""
        return [s / self.steps_per_epoch for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain lists and numbers."""
        return asdict(self)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 100,
    eval_every: int | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    probes: dict[str, Probe] | None = None,
    seed: int = 0,
    progress: bool | Progress | None = None,
    label: str = "",
    shard: Callable[[int], slice] | None = None,
    order: Callable[[torch.Generator], Tensor] | None = None,
) -> History:
    """Train ``model`` with ``optimizer`` on ``data`` for ``steps`` optimizer steps (or
    ``epochs`` passes over the training set) of ``batch_size`` samples, and return its
    :class:`History`.

    Training runs on the device of ``data`` (move both with ``.to(device)`` first). Each
    epoch shuffles the training set with a generator seeded by ``seed`` (two models trained
    with the same seed see the same mini-batches) and uses its ``len // batch_size`` full
    mini-batches. The model is evaluated on the test set in eval mode before training,
    every ``eval_every`` steps (default: once per epoch) and at the end. Progress goes to
    stderr (a live bar on a terminal, a line per tenth of the steps elsewhere) unless
    ``progress`` is False; an open :class:`~batchnorm._progress.Progress` instead counts
    this run's steps on from where it stands (one bar over many runs).

    ``order(generator)``: the order of the training samples for one epoch, a permutation of
    ``range(len(data.x_train))`` (default: ``torch.randperm``); e.g. mini-batches drawn
    from few classes (:func:`batchnorm.lab.variants.few_class_order`).

    Data-parallel training (e.g. a DistributedDataParallel model): ``shard(batch_size)`` is
    the slice of every mini-batch this process trains on; the recorded training loss and
    accuracy are then this process's. Probes attach to the wrapped ``model.module``.
    """
    n = len(data.x_train)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(
            f"fit: batch_size must be an int in 1..{n} (the training-set size), got {batch_size!r}."
        )
    steps_per_epoch = n // batch_size
    if (steps is None) == (epochs is None):
        raise ValueError(f"fit: give exactly one of steps or epochs, got {steps=}, {epochs=}.")
    total = steps if steps is not None else epochs * steps_per_epoch  # type: ignore[operator]
    if not isinstance(total, int) or total < 1:
        raise ValueError(f"fit: steps and epochs must be positive ints, got {steps=}, {epochs=}.")
    eval_every = steps_per_epoch if eval_every is None else eval_every
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"fit: eval_every must be a positive int, got {eval_every!r}.")

    probes = dict(probes or {})
    device = data.x_train.device
    weights = next(model.parameters(), None)
    if weights is not None and weights.device != device:
        raise ValueError(
            f"fit: the model is on {weights.device} and the data on {device}. Hint: "
            f"model.to(device) and data.to(device) before fit."
        )
    history = History(label, steps_per_epoch, batch_size)
    losses = torch.empty(total, device=device)
    correct = torch.empty(total, device=device, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)

    local = range(batch_size)[shard(batch_size)] if shard is not None else range(batch_size)
    for probe in probes.values():
        probe.attach(getattr(model, "module", model))  # DDP wraps the model in .module
    shared = isinstance(progress, Progress)
    own = Progress(label or "training", total, "steps", progress is not False)
    try:
        with nullcontext(progress) if shared else own as bar:  # type: ignore[attr-defined]
            base = bar.done if shared else 0
            _evaluate_into(history, model, data, loss_fn, probes, 0, losses, correct)
            model.train()
            step, last_eval = 0, 0
            started = time.perf_counter()
            while step < total:
                perm = (order or _shuffle(n))(generator).to(device)
                if perm.shape != (n,):
                    raise ValueError(f"fit: order must return {n} indices, got {perm.shape}.")
                xs, ys = data.x_train[perm], data.y_train[perm]
                for start in range(0, steps_per_epoch * batch_size, batch_size):
                    xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
                    if shard is not None:
                        xb, yb = xb[shard(batch_size)], yb[shard(batch_size)]
                    for probe in probes.values():
                        probe.before_step(step + 1, xb, yb)
                    logits = model(xb)
                    loss = loss_fn(logits, yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses[step] = loss.detach()
                    correct[step] = (logits.detach().argmax(1) == yb).sum()
                    step += 1
                    for probe in probes.values():
                        probe.after_step(step)
                    if step % PROGRESS_EVERY == 0:
                        bar.update(base + step)
                    if step % eval_every == 0 or step == total:
                        _synchronize(device)
                        history.train_seconds += time.perf_counter() - started
                        _evaluate_into(
                            history, model, data, loss_fn, probes, step, losses, correct,
                            last_eval, len(local),
                        )  # fmt: skip
                        last_eval = step
                        bar.update(base + step, f"test acc {history.test_accuracy[-1]:.3f}")
                        started = time.perf_counter()
                    if step == total:
                        break
    finally:
        for probe in probes.values():
            probe.detach()
    history.step_loss = losses.cpu().tolist()
    history.probes = {name: probe.result() for name, probe in probes.items()}
    return history


def _shuffle(n: int) -> Callable[[torch.Generator], Tensor]:
    return lambda generator: torch.randperm(n, generator=generator)


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = nn.functional.cross_entropy
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode on ``x, y``; restores the mode."""
    was_training = model.training
    model.eval()
    total_loss = x.new_zeros((), dtype=torch.float64)
    total_correct = torch.zeros((), dtype=torch.long, device=x.device)
    with torch.no_grad():
        for start in range(0, len(x), EVAL_CHUNK):
            xb, yb = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
            logits = model(xb)
            total_loss += loss_fn(logits, yb).double() * len(xb)
            total_correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return total_loss.item() / len(x), total_correct.item() / len(x)


def _evaluate_into(
    history: History,
    model: nn.Module,
    data: Dataset,
    loss_fn: LossFn,
    probes: dict[str, Probe],
    step: int,
    losses: Tensor,
    correct: Tensor,
    last_eval: int = 0,
    samples_per_step: int | None = None,
) -> None:
    started = time.perf_counter()
    for probe in probes.values():
        probe.before_eval(step)
    try:
        test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test, loss_fn)
    finally:
        for probe in probes.values():
            probe.after_eval(step)
    history.steps.append(step)
    history.test_loss.append(test_loss)
    history.test_accuracy.append(test_accuracy)
    if step == 0:
        history.train_loss.append(None)
        history.train_accuracy.append(None)
    else:
        window = slice(last_eval, step)
        history.train_loss.append(losses[window].double().mean().item())
        samples = (step - last_eval) * (samples_per_step or history.batch_size)
        history.train_accuracy.append(correct[window].sum().item() / samples)
    if not math.isfinite(test_loss):
        print(f"warning: {history.label or 'model'}: test loss is {test_loss}", file=sys.stderr)
    history.eval_seconds += time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adam(params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` with its fused implementation (one kernel for all parameters;
    a quarter less time per epoch of the demo on CPU) where this torch has it."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # e.g. torch 2.3 fuses on CUDA only
        return torch.optim.Adam(params, lr=lr)


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, checked: a CUDA device must exist."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {device!r}; expected e.g. 'cpu', 'cuda', 'cuda:1'."
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise ValueError(
                f"device {device!r} requested but this torch sees {count} CUDA device(s) "
                f"(torch {torch.__version__}). Hint: use --device cpu."
            )
    return resolved


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op CPU threads (None: leave as is), then restore.

    The lab's models are small (matrices of 100 x 128): they gain nothing from parallel
    kernels, while on a busy machine the thread pool's synchronisation can make each step
    ten times slower. The commands therefore default to one thread."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
