"""Run a function in several CPU processes joined by a Gloo process group (the tests' torchrun).

``run_processes(fn, world_size, workdir, *args)`` spawns ``world_size`` processes; process ``r`` joins
the group through a file store in ``workdir``, calls ``fn(rank, workdir, *args)`` and saves what it
returns to ``workdir / f"rank{r}.pt"``. The parent gets the list of returned values, rank order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # two processes on a two-core machine
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = fn(rank, Path(workdir), *args)
        torch.save(result, Path(workdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalisation: Gloo's worker threads can still hold tensors then, and
    # releasing them without a live interpreter aborts the process now and then (SIGABRT, "terminate
    # called without an active exception"; pytorch/pytorch#179291), after every result was saved.
    os._exit(0)


def run_processes(fn: Callable[..., Any], world_size: int, workdir: Path, *args: Any, timeout: float = 900.0) -> list[Any]:
    """``[fn(0, workdir, *args), ..., fn(world_size - 1, workdir, *args)]``, each run in its own process.

    Raises:
        TimeoutError: the processes did not finish within ``timeout`` seconds (a deadlock: they are killed).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    context = mp.spawn(_entry, args=(fn, world_size, str(workdir), args), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} processes running {fn.__name__} did not finish in {timeout:.0f} s")
    return [torch.load(workdir / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
