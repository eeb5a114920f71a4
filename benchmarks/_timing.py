"""Timing shared by the benchmarks: interleaved rounds, device-synchronised, medians taken by the caller."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["ratios_to_loops", "synchronize", "time_steps", "timed_rounds"]


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


def ratios_to_loops(times: dict[str, dict[str, list[float]]], loop: str, hand: str) -> dict[str, dict[str, object]]:
    """Every contender's wall and CPU medians of :func:`timed_rounds`' ``times``, and its speed-ups over the
    contenders ``loop`` and ``hand`` (their median time over its own)."""
    wall = {name: statistics.median(t["wall"]) for name, t in times.items()}
    cpu = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    return {name: {"wall_s": wall[name], "wall_s_all": times[name]["wall"], "cpu_s": cpu[name],
                   "x_loop": wall[loop] / wall[name], "x_autograd_loop": wall[hand] / wall[name],
                   "x_loop_cpu": cpu[loop] / cpu[name]} for name in times}
