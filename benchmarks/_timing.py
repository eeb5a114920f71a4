"""Timing shared by the benchmarks: interleaved rounds, device-synchronised, medians taken by the caller."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["synchronize", "time_steps", "timed_rounds"]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are real (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds of every step once per round, rotating the order each round so that drift
    hits all alike (the CPU time, of all threads, is what a busy shared machine inflates less)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    synchronize(device)
    names = list(steps)
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def time_steps(
    make_step: dict[str, Callable[[], object]], device: torch.device, warmup: int, rounds: int
) -> dict[str, list[float]]:
    """Wall seconds of every step once per round (:func:`timed_rounds` without the CPU times)."""
    return {name: t["wall"] for name, t in timed_rounds(make_step, device, warmup, rounds).items()}
