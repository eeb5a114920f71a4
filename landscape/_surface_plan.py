"""How a surface's grid points are evaluated, and the timing that chooses it on the first points.

A grid point is evaluated by one of these methods:

* the plain loop: one forward pass per point, the perturbed parameters ``w + a d1 + b d2`` written into
  buffers allocated once;
* the loop with the 4-D parameters (convolution kernels) kept channels-last, so that the convolutions run
  in NHWC (on the CPU oneDNN's native layout: no reorder of the activations around every convolution, and
  max-pooling's fast kernel); the values are the same up to rounding;
* batched: ``Q`` points per vmapped pass (:func:`landscape.surface.evaluate_points`).

Which is fastest depends on the model, the data and the device (a small CNN on 2 CPU cores ran batched at
0.58-1.17x the loop's speed, ``benchmarks/RESULTS.md``), so by default it is timed. The first points of
the grid are evaluated by every candidate in turn, each timed (synchronised on a GPU) on its own points,
which are kept as part of the grid:

1. the loop on :data:`LOOP_POINTS` points, the first untimed (a warm-up: first-call costs);
2. the loop channels-last likewise, when some parameter is 4-D;
3. batched passes: one untimed pass of 2 points (vmap's first call is slow), then ``Q = 2, 4, 8, ...``
   while the time per point keeps falling by at least 5% a doubling, from ``Q = 4`` on stays within 1.5x
   the fastest loop's (on 2 CPU cores a small CNN's passes cost 1.5-2x the channels-last loop's per point:
   timing more of them would cost more than they could win), memory allows (on a GPU the measured peak
   of the last pass against half the free memory; on the CPU the stacked parameters against 1 GiB) and a
   pass takes at most 1/:data:`ZONE_SHARE` of the grid.

The fastest per point evaluates the rest, saved in blocks of about :data:`SAVE_SECONDS` of work. A
candidate the model does not support (a kernel ``view``-ed as contiguous, data-dependent control flow
under vmap, out of memory) is skipped and named. Grids of fewer than :data:`TIMED_FROM` points are not
timed (the candidates would take most of them): they take the former default, the loop on the CPU and
memory-sized passes on a GPU, so that they are reproducible bit for bit.

The choice is a :class:`Plan`; its :meth:`Plan.record` is saved with the grid (a resumed run reuses a timed
choice) and returned in the surface's ``meta["evaluation"]``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .objective import _synchronize

__all__ = ["LOOP", "LOOP_POINTS", "TIMED_FROM", "ZONE_SHARE", "Method", "Plan", "time_first_points", "timed"]

LOOP_POINTS = 5  # per loop candidate: one warm-up point, then four timed
TIMED_FROM = 64  # grids with fewer points are not timed
ZONE_SHARE = 8  # a timed batched pass takes at most 1/8 of the grid's points
GROWTH = 0.95  # a larger Q is tried while the last doubling cut the time per point to 95% or less
BEHIND = 1.5  # ... and, from Q = 4 on, while it is within 1.5x the fastest loop's time per point
SAVE_SECONDS = 2.0  # after timing, points are saved in blocks of about this much work
MAX_POINTS_PER_PASS = 256
CPU_STACK_BYTES = 2**30  # the stacked parameters of one CPU pass stay under 1 GiB
TOLERATED = (RuntimeError, NotImplementedError, ValueError)  # a candidate the model does not support


@dataclass(frozen=True)
class Method:
    """One way to evaluate points: ``points_per_pass`` 1 is the loop."""

    points_per_pass: int = 1
    channels_last: bool = False

    @property
    def batched(self) -> bool:
        return self.points_per_pass > 1

    @property
    def name(self) -> str:
        if self.batched:
            return f"batched Q={self.points_per_pass}"
        return "loop, channels-last" if self.channels_last else "loop"


LOOP = Method()


@dataclass
class Plan:
    """The method for a grid's points and how it was chosen.

    Attributes:
        method: the method.
        points_per_save: points evaluated between two saves of the grid (and two read-backs of the values);
            a multiple of the points of one pass over every process.
        chosen_by: ``"timing"``, ``"argument"`` (``batched=`` / ``points_per_pass=``) or ``"default"`` (a grid
            too small to time).
        device: the device type the choice was made for.
        seconds_per_point: the timed candidates, by name (empty when not timed).
        skipped: candidates that failed (the model does not support them, or ran out of memory), with why.
    """

    method: Method
    points_per_save: int
    chosen_by: str
    device: str
    seconds_per_point: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The plan as JSON: saved with the grid and returned in the surface's ``meta["evaluation"]``."""
        return {"method": "batched" if self.method.batched else "loop",
                "points_per_pass": self.method.points_per_pass, "channels_last": self.method.channels_last,
                "points_per_save": self.points_per_save, "chosen_by": self.chosen_by, "device": self.device,
                "seconds_per_point": dict(self.seconds_per_point), "skipped": dict(self.skipped)}

    @classmethod
    def from_record(cls, record: Any) -> Plan | None:
        """The plan of a saved :meth:`record`; ``None`` if it is not one."""
        try:
            method = Method(int(record["points_per_pass"]), bool(record["channels_last"]))
            plan = cls(method, int(record["points_per_save"]), str(record["chosen_by"]), str(record["device"]),
                       {str(k): float(v) for k, v in record.get("seconds_per_point", {}).items()},
                       {str(k): str(v) for k, v in record.get("skipped", {}).items()})
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        return plan if method.points_per_pass >= 1 and plan.points_per_save >= 1 else None


def timed(method: Method, run: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``run()`` and its wall-clock seconds, synchronised with ``device``.

    The one clock of the timing: tests replace it to force a choice.
    """
    _synchronize(device)
    start = time.perf_counter()
    out = run()
    _synchronize(device)
    return out, time.perf_counter() - start


class _PeakMemory:
    """The peak device memory one batched pass adds, per point: caps the next ``Q`` on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)

    def cap(self, points: int, cpu_cap: int) -> int:
        """The largest ``Q`` whose pass fits half the free memory at the measured bytes per point."""
        if self.device.type != "cuda":
            return cpu_cap
        per_point = max((torch.cuda.max_memory_allocated(self.device) - self.start) / points, 1)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(min(MAX_POINTS_PER_PASS, max(1, 0.5 * free // per_point)))


def cpu_points_per_pass_cap(param_bytes: int) -> int:
    """The largest ``Q`` whose stacked parameters stay under :data:`CPU_STACK_BYTES`."""
    return int(min(MAX_POINTS_PER_PASS, max(1, CPU_STACK_BYTES // max(param_bytes, 1))))


def loop_candidates(batched: bool | None, has_4d: bool) -> list[Method]:
    """The loop methods to time: none when ``batched=True``, the channels-last loop only with 4-D parameters."""
    if batched:
        return []
    return [LOOP, Method(1, True)] if has_4d else [LOOP]


def time_first_points(
    todo: np.ndarray,
    grid_size: int,
    loops: Sequence[Method],
    evaluate: Callable[[Method, np.ndarray, bool], tuple[np.ndarray, np.ndarray]],
    commit: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
    device: torch.device,
    replicas: int,
    cpu_cap: int,
    share: Callable[[Any], Any] = lambda value: value,
) -> tuple[Plan, int]:
    """Evaluate the first points of ``todo`` with every candidate, timed, and choose the fastest per point.

    Args:
        todo: the grid indices to evaluate, in order; the candidates take them from the front.
        grid_size: the grid's number of points (a batched pass takes at most 1/:data:`ZONE_SHARE` of it).
        loops: the loop methods to time, first to last (the first is required: its failure is raised).
        evaluate: ``(method, index, tolerate) -> (loss, accuracy)`` at ``todo``'s indices ``index``;
            with ``tolerate``, a failure of the method raises one of :data:`TOLERATED` on every process.
        commit: stores the values of evaluated indices (and saves the grid).
        device: where the work runs (timed with synchronisation).
        replicas: processes sharing every pass (each evaluates its share of ``Q * replicas`` points).
        cpu_cap: the largest ``Q`` on the CPU (:func:`cpu_points_per_pass_cap`).
        share: rank 0's value on every process (each candidate's time and the next cap: all the processes
            take the same decisions).

    Returns:
        The plan (``chosen_by="timing"``) and how many points of ``todo`` the timing evaluated.
    """
    timing = _Timing(todo, evaluate, commit, device, replicas, cpu_cap, share)
    for position, method in enumerate(loops):
        timing.loop(method, tolerate=position > 0)
    timing.batched(grid_size, tolerate=bool(loops))
    return timing.plan(loops[0] if loops else Method(2)), timing.used


class _Timing:
    """The candidates of :func:`time_first_points`, each on the next points of ``todo``, and their times."""

    def __init__(self, todo: np.ndarray, evaluate: Callable[[Method, np.ndarray, bool], tuple[np.ndarray, np.ndarray]],
                 commit: Callable[[np.ndarray, np.ndarray, np.ndarray], None], device: torch.device, replicas: int,
                 cpu_cap: int, share: Callable[[Any], Any]) -> None:
        self.todo, self.evaluate, self.commit, self.share = todo, evaluate, commit, share
        self.device, self.replicas, self.cpu_cap = device, replicas, cpu_cap
        self.used = 0
        self.seconds: dict[Method, float] = {}
        self.skipped: dict[str, str] = {}

    @property
    def left(self) -> int:
        return self.todo.size - self.used

    def run(self, method: Method, count: int, tolerate: bool) -> tuple[float, int] | None:
        """Evaluate the next ``count`` points with ``method`` and keep them: (rank 0's seconds, the largest
        ``Q`` memory allows after it); ``None`` if the method failed (tolerated) and was skipped."""
        index = self.todo[self.used : self.used + count]
        memory = _PeakMemory(self.device)
        try:
            (values, accs), took = timed(method, lambda: self.evaluate(method, index, tolerate), self.device)
        except TOLERATED as error:
            if not tolerate:
                raise
            first = str(error).splitlines()[0] if str(error) else ""
            self.skipped[method.name] = f"{type(error).__name__}: {first}"[:300]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        self.commit(index, values, accs)
        self.used += index.size
        return self.share((took, memory.cap(index.size // self.replicas, self.cpu_cap)))

    def loop(self, method: Method, tolerate: bool) -> None:
        """One untimed point per process (first-call costs: new kernels for a new layout), then the timed ones."""
        if self.left == 0 or self.run(method, min(self.replicas, self.left), tolerate) is None:
            return
        count = min((LOOP_POINTS - 1) * self.replicas, self.left)
        result = self.run(method, count, tolerate) if count else None
        if result is not None:
            self.seconds[method] = result[0] / count

    def batched(self, grid_size: int, tolerate: bool) -> None:
        """``Q = 2, 4, 8, ...`` while the time per point falls by 5% a doubling, from ``Q = 4`` on stays within
        :data:`BEHIND` times the fastest loop's, memory allows and a pass takes at most 1/:data:`ZONE_SHARE` of
        the grid; first one untimed pass of 2 (vmap's first call costs far more than a pass: 0.6 s for a small
        CNN). Only ``Q = 2`` may fail untolerated: ``tolerate`` is whether
        a loop was timed before."""
        q, cap, previous = 2, self.cpu_cap, None
        if cap < 2 or self.left < 4 * self.replicas or self.run(Method(q), q * self.replicas, tolerate) is None:
            return
        while q <= cap and q * self.replicas <= grid_size // ZONE_SHARE and self.left >= q * self.replicas:
            count = q * self.replicas
            result = self.run(Method(q), count, tolerate or q > 2)
            if result is None:
                return
            now = self.seconds[Method(q)] = result[0] / count
            cap = result[1]
            if previous is not None and now > GROWTH * previous:
                return
            if q >= 4 and now > BEHIND * min((t for m, t in self.seconds.items() if not m.batched), default=np.inf):
                return  # far behind a loop (a CNN on the CPU): larger passes would cost more than they could win
            previous, q = now, 2 * q

    def plan(self, fallback: Method) -> Plan:
        """The fastest per point, saved every :data:`SAVE_SECONDS` of work; ``fallback`` if nothing was timed
        (too few points left)."""
        if not self.seconds:
            return Plan(fallback, _pass_points(fallback, self.replicas), "timing", self.device.type, {}, self.skipped)
        best = min(self.seconds, key=self.seconds.__getitem__)
        per_pass = self.seconds[best] * _pass_points(best, self.replicas)
        blocks = max(1, math.ceil(SAVE_SECONDS / max(per_pass, 1e-9)))
        return Plan(best, blocks * _pass_points(best, self.replicas), "timing", self.device.type,
                    {m.name: t for m, t in self.seconds.items()}, self.skipped)


def _pass_points(method: Method, replicas: int) -> int:
    """Points of one pass over every process."""
    return method.points_per_pass * replicas
