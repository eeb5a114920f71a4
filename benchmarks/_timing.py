"""Timing shared by the benchmarks: interleaved rounds, device-synchronised, medians taken by the caller."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["synchronize", "time_steps"]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are real (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    make_step: dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int
) -> dict[str, list[float]]:
    """Time every step once per round, rotating the order each round so that drift hits all alike."""
    for step in make_step.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    names = list(make_step)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            make_step[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times
