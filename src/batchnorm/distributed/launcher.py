"""A local launcher: run a function in fresh processes on this machine, as torchrun would,
and collect their results."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

import torch

from batchnorm.distributed.env import shutdown


@dataclass(frozen=True)
class RankFailure:
    """What :func:`launch` returns, with ``strict=False``, for a rank that gave no result."""

    rank: int
    exitcode: int | None
    error: str


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    strict: bool = True,
    threads: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` fresh processes on this machine, as torchrun
    would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT are set; ``fn``
    calls :func:`init_from_env`), and return their results in rank order.

    ``fn`` and its results must be picklable (a module-level function); tensors in the
    results are copied, so they outlive the process that made them. Each process uses
    ``threads`` intra-op threads (default: the CPU count shared out). After ``timeout_s``
    every process still running is killed and TimeoutError is raised, so a hang can never
    outlive the call. A rank that raises or dies makes ``launch`` raise RuntimeError, or,
    with ``strict=False``, gives a :class:`RankFailure` in its place."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"launch: world_size must be a positive int, got {world_size!r}.")
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes, pipes = [], []
    for rank in range(world_size):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_launched,
            args=(fn, tuple(args), rank, world_size, port, threads, sender),
            daemon=True,
        )
        process.start()
        sender.close()  # the child holds the only writer: EOF when it dies
        processes.append(process)
        pipes.append(receiver)
    deadline = time.monotonic() + timeout_s
    results: dict[int, Any] = {}
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            pending = [r for r in range(world_size) if r not in results]
            if left <= 0:
                raise TimeoutError(
                    f"launch: ranks {pending} gave no result within {timeout_s:.0f} s; all "
                    f"processes were killed. Hint: a rank is stuck in a collective, or the "
                    f"work needs a larger timeout_s."
                )
            wait([pipes[r] for r in pending], timeout=left)
            for rank in pending:
                if pipes[rank].poll():
                    try:
                        # Our own child's message (see _launched): as trusted as recv().
                        status, payload = pickle.loads(pipes[rank].recv_bytes())
                    except EOFError:  # died without a word
                        status, payload = "died", "the process exited without a result"
                    except Exception:  # e.g. the result's class cannot be imported here
                        status = "error"
                        payload = f"its result could not be unpickled:\n{traceback.format_exc()}"
                    if status == "ok":
                        results[rank] = payload
                    else:
                        processes[rank].join(5)
                        results[rank] = RankFailure(rank, processes[rank].exitcode, payload)
    finally:
        for process in processes:  # let them leave the group, then make sure they are gone
            process.join(max(0.0, min(5.0, deadline - time.monotonic())))
            if process.is_alive():
                process.kill()
                process.join()
    ordered = [results[r] for r in range(world_size)]
    failures = [r for r in ordered if isinstance(r, RankFailure)]
    if strict and failures:
        details = "\n".join(f"--- rank {f.rank} (exit code {f.exitcode}):\n{f.error}"
                            for f in failures)  # fmt: skip
        raise RuntimeError(f"launch: {len(failures)} of {world_size} ranks failed.\n{details}")
    return ordered


def _launched(fn, args, rank, world_size, port, threads, pipe) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(threads)
    try:
        message: tuple[str, Any] = ("ok", fn(*args))
    except BaseException:  # report everything, KeyboardInterrupt included
        message = ("error", traceback.format_exc())
    # Plain pickle, not pipe.send: multiprocessing's pickler, which torch extends, sends a
    # tensor as a handle to this process's shared memory, gone once this process exits
    # (the parent then fails to open it). Plain pickle copies the tensors' data.
    try:
        data = pickle.dumps(message)
    except Exception:
        failure = f"the result could not be pickled:\n{traceback.format_exc()}"
        data = pickle.dumps(("error", failure))
    pipe.send_bytes(data)
    pipe.close()
    try:
        shutdown()
    except Exception:  # a broken group (a peer died) may not leave cleanly; the result is out
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
