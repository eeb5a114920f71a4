"""Loss surfaces around a minimum: 1D and 2D slices and interpolations (Li et al., NeurIPS 2018).

.. math::

    f(\\alpha) = L(w + \\alpha d),\\qquad f(\\alpha, \\beta) = L(w + \\alpha d_1 + \\beta d_2),

with ``L`` the whole-dataset objective of :mod:`landscape.objective` (eval mode, batch-size-weighted
sums) and ``d`` filter-normalised random directions (:mod:`landscape.directions`) unless given. Loss and
accuracy are computed at every grid point.

How the points are evaluated (``batched=``, ``points_per_pass=``):

* batched: the parameters of ``Q`` points are stacked along a new leading dimension and the model runs
  under ``torch.vmap`` with the buffers shared, so one pass over a data batch serves ``Q`` points;
* the loop: one forward pass per point (the parameters written into buffers allocated once, the values
  read from the device once per block), optionally with convolution kernels channels-last.

By default (``batched=None, points_per_pass=None``) the method is chosen by timing: the first points of
the grid are evaluated by the loop, the channels-last loop (with 4-D parameters) and batched passes of
``Q = 2, 4, 8, ...`` (growing while the time per point falls and memory allows), each timed on its own
points, which stay part of the grid; the fastest per point evaluates the rest (on 2 CPU cores a small CNN
is fastest in the channels-last loop, on a GPU batched passes; ``benchmarks/RESULTS.md``). The choice is
in ``meta["evaluation"]`` (method, ``Q``, the seconds per point of every candidate) and saved with the
grid, and a resumed run reuses it. The methods agree up to floating-point rounding. Grids of fewer than
64 points are not timed: the loop on the CPU, memory-sized passes on a GPU. ``batched=False`` (the loop,
the reference path), ``points_per_pass=Q`` (``Q`` points per pass; 1: the loop) or ``batched=True`` (only
batched passes, ``Q`` timed) narrow the choice; :mod:`landscape._surface_plan` has the details.

With ``path=``, the grid is saved (``.npz`` + ``.json``, atomically) after every block of points (one pass,
or about 2 seconds of work once timed) and a later call with the same recipe resumes where it stopped; a
different recipe in an existing file is an error.

With ``distributed=True`` (every process of a ``torchrun`` job makes the same call) the grid points are
split across the processes: each round hands every process its own block of points, evaluated on the
whole dataset, and gathers the values; rank 0 alone reads and writes the resumable file, and every
process returns the whole surface.

Models and data beyond ``(x, y)`` tensors: every function here also takes the keyword options of
:class:`~landscape.objective.Objective` (``forward``, ``weight``, ``target``, ``params``, ``stream``,
``memory_budget``), and ``loss_fn=None`` for a model that computes its own loss (Hugging Face style);
the batch protocol is :mod:`landscape.batches`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import _surface_plan as _plan
from . import distributed as _distributed
from ._checks import check_int
from .directions import _check_same_layout, difference, random_direction, random_plane
from .batches import batch_size, nbytes, take, tensors_of
from .objective import Data, LossFn, Objective, Params, _training_flags, _upcast, evaluation_objective
from .progress import progress_bar
from .storage import CorruptFileError, atomic_write, atomic_write_json, differing_keys, read_json

_CPU_EXAMPLE_POINTS_PER_CALL = 1024
_CPU_DEFAULT_POINTS_PER_PASS = 8  # batched=True on a grid too small to time (the measured Q = 4-32 were alike)

__all__ = ["SurfaceResult", "RecipeMismatchError", "slice_1d", "slice_2d", "interpolate", "evaluate_points", "grid_points", "load"]


@dataclass
class SurfaceResult:
    """A loss surface on a grid.

    Attributes:
        coords: one 1-D array per axis.
        loss: loss at every grid point, shaped like the grid (``"ij"`` indexing: ``loss[i, j]`` is at
            ``(coords[0][i], coords[1][j])``).
        accuracy: accuracy at every grid point, same shape; NaN when the targets are not class indices
            (regression, soft labels).
        meta: ``{"recipe": ..., "evaluation": ..., **info}``: the recipe (the directions, ranges, data and
            model) and how the points were evaluated (loop or batched, points per pass, and with the timed
            default the seconds per point of every candidate; :mod:`landscape._surface_plan`); :func:`load`
            returns the saved JSON, which also has ``points_done`` and ``points_total``.
        computed: grid points evaluated by the call that returned it (0 when a saved grid was complete).
    """

    coords: list[np.ndarray]
    loss: np.ndarray
    accuracy: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    computed: int = 0


class RecipeMismatchError(ValueError):
    """The file at ``path`` holds a surface of another recipe; ``differing`` names the keys that differ."""

    def __init__(self, path: Path, differing: list[str]) -> None:
        self.path, self.differing = path, differing
        super().__init__(f"{path} holds a surface with a different recipe (differs in {differing}); choose another "
                         "path, or delete the file to start again")

    def __reduce__(self) -> tuple[Any, ...]:  # rank 0 hands it to the other ranks pickled
        return type(self), (self.path, self.differing)


def grid_points(coords: Sequence[np.ndarray]) -> np.ndarray:
    """All grid points as a ``(P, d)`` array in ``"ij"`` order (the last axis varies fastest)."""
    mesh = np.meshgrid(*coords, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


class _PointWriter:
    """``w + sum_j a_j d_j`` at one point after another, written into buffers allocated once.

    The tensors that no direction moves (with ``ignore="biasbn"``: biases and BatchNorm parameters) are
    passed as they are. With ``channels_last``, the 4-D tensors (convolution kernels) are kept in the
    channels-last layout, so that the convolutions run in NHWC (:mod:`landscape._surface_plan`).
    """

    def __init__(self, origin: Params, directions: list[Params], channels_last: bool = False) -> None:
        moving = _moving(origin, directions)
        layout = (lambda t: torch.channels_last if channels_last and t.ndim == 4 else torch.contiguous_format)
        self.names = list(origin)
        self.fixed = {n: w.contiguous(memory_format=layout(w)) for n, w in origin.items() if n not in moving}
        self.moved = [n for n in origin if n in moving]
        self.origin = [origin[n] for n in self.moved]
        self.directions = [[d[n] for n in self.moved] for d in directions]
        self.buffers = [torch.empty_like(w, memory_format=layout(w)) for w in self.origin]

    def at(self, point: Sequence[float]) -> Params:
        """The tensors at ``point`` (the same buffers every call: use them before the next call)."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.origin)
            for a, d in zip(point, self.directions):
                if a != 0.0:
                    torch._foreach_add_(self.buffers, d, alpha=a)
        values = {**self.fixed, **dict(zip(self.moved, self.buffers))}
        return {n: values[n] for n in self.names}


def _moving(tensors: Params, directions: list[Params]) -> set[str]:
    """The names of ``tensors`` along which some direction is nonzero (one device synchronisation)."""
    names = list(tensors)
    flags = torch.stack([torch.stack([d[name].any() for d in directions]).any() for name in names]).tolist() if names else []
    return {name for name, flag in zip(names, flags) if flag}


def _block_params(origin: Params, directions: list[Params], points: Tensor) -> tuple[Params, dict[str, int | None]]:
    """``w + sum_j a_j d_j`` for a ``(Q, d)`` block of points, and the ``in_dims`` of ``torch.vmap`` for it.

    A tensor that some direction moves is stacked along a new dim 0 (``in_dims`` 0). One that no direction
    moves (with ``ignore="biasbn"``: every bias and BatchNorm parameter) is the same at every point and is
    passed once, unstacked (``None``), as the buffers are: no ``Q`` copies in memory. (It barely changes the
    time: vmap still batches a layer whose input is batched; 87.7 against 88.8 ms per point for the digits
    CNN on 2 CPU cores, Q = 8.)
    """
    moving = _moving(origin, directions) or set(origin)  # vmap needs one stacked input; a zero direction has none
    out, dims = {}, {}
    for name, w in origin.items():
        if name not in moving:
            out[name], dims[name] = w, None
            continue
        shape = (points.shape[0],) + (1,) * w.ndim
        value = w.unsqueeze(0).expand(points.shape[0], *w.shape).clone()
        for j, d in enumerate(directions):
            value = value + points[:, j].reshape(shape) * d[name].unsqueeze(0)
        out[name], dims[name] = value, 0
    return out, dims


def _block_buffers(
    objective: Objective, buffer_directions: list[Params] | None, points: Tensor,
) -> tuple[Params | None, dict[str, int | None] | None]:
    """The buffers at a ``(Q, d)`` block of points, with the ``in_dims`` as in :func:`_block_params`: floating
    buffers moved along ``buffer_directions`` with the coordinates clamped to ``[0, 1]`` (between the
    endpoints only: extrapolated running variances could turn negative), the others (e.g.
    ``num_batches_tracked``) kept; ``None`` keeps them all fixed."""
    if buffer_directions is None:
        return None, None
    moving = {k: b for k, b in objective.buffers.items() if k in buffer_directions[0]}
    stacked, dims = _block_params(moving, buffer_directions, points.clamp(0.0, 1.0))
    return {**objective.buffers, **stacked}, {**{k: None for k in objective.buffers}, **dims}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (both paths, so that a grid never mixes precisions); off for ``None``."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _point_values(objective: Objective) -> Any:
    """``(params, batch, buffers) -> (loss, correct, counted)`` of one point, for ``torch.vmap`` over points.

    ``correct`` is NaN where accuracy is not defined (:mod:`landscape.batches`); whether it is does not
    depend on the point, so every point of a block agrees.
    """
    protocol = objective.protocol

    def values(params: Params, batch: Any, buffers: Params | None) -> tuple[Tensor, Tensor, Tensor]:
        output = _upcast(objective.forward(params, batch, buffers))
        loss = protocol.loss(output, batch).double()
        counts = protocol.accuracy_counts(output, batch)
        if counts is None:
            nan = torch.full((), float("nan"), dtype=torch.float64, device=loss.device)
            return loss, nan, nan
        return loss, counts[0].double(), counts[1].double()

    return values


@torch.no_grad()
def _evaluate_block(
    objective: Objective, origin: Params, directions: list[Params], points: Tensor, autocast_dtype: torch.dtype | None,
    buffer_directions: list[Params] | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss and accuracy at a ``(Q, d)`` block of points, with one vmapped pass per data batch."""
    stacked, param_dims = _block_params(origin, directions, points)
    buffers, buffer_dims = _block_buffers(objective, buffer_directions, points)
    sums = torch.zeros(3, points.shape[0], dtype=torch.float64, device=objective.device)  # loss, correct, counted
    autocast = _autocast(objective.device, autocast_dtype)
    at_points = torch.vmap(_point_values(objective), in_dims=(param_dims, None, buffer_dims))
    # On the CPU, Q points multiply each call's activations by Q: the data are cut so that one call stays
    # near 1024 example-points, a cache-sized working set (measured: 128 examples x 8 points ran 2.8x
    # faster per point than 1437 x 8). On a GPU the batch stays whole: Q was sized against its memory by the
    # timed passes (landscape._surface_plan) or by _auto_points_per_pass.
    rows = max(32, _CPU_EXAMPLE_POINTS_PER_CALL // points.shape[0]) if objective.device.type == "cpu" else None
    with autocast:
        for weight, batch in objective.weighted_batches():
            n = batch_size(batch)
            pieces = [batch] if rows is None or rows >= n else [take(batch, slice(s, s + rows)) for s in range(0, n, rows)]
            for piece in pieces:
                share = 1.0 if len(pieces) == 1 else float(objective.protocol.terms(piece)) / float(objective.protocol.terms(batch))
                if share == 0:
                    continue
                loss, correct, counted = at_points(stacked, piece, buffers)
                sums[0] += (weight * share) * loss
                sums[1] += correct
                sums[2] += counted
    objective._reduce([sums])
    accuracy = sums[1] / sums[2]
    return sums[0], accuracy


@torch.no_grad()
def _evaluate_loop(
    objective: Objective, origin: Params, directions: list[Params], points: np.ndarray,
    autocast_dtype: torch.dtype | None, buffer_directions: list[Params] | None = None, channels_last: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss and accuracy at ``(B, d)`` points, one forward pass per point and data batch.

    The values stay on the device until the caller reads them, once per block (no synchronisation per
    point); ``progress(1)`` is called as each point's work is queued.
    """
    at = _PointWriter(origin, directions, channels_last)
    moving_buffers = None
    if buffer_directions is not None:
        floating = {k: b for k, b in objective.buffers.items() if k in buffer_directions[0]}
        moving_buffers = _PointWriter(floating, buffer_directions)
    values = _point_values(objective)
    sums = torch.zeros(3, len(points), dtype=torch.float64, device=objective.device)  # loss, correct, counted
    with _autocast(objective.device, autocast_dtype):
        for i, point in enumerate(np.asarray(points, dtype=float).tolist()):
            params = at.at(point)
            buffers = None
            if moving_buffers is not None:
                buffers = {**objective.buffers, **moving_buffers.at([min(max(a, 0.0), 1.0) for a in point])}
            for weight, batch in objective.weighted_batches():
                loss, correct, counted = values(params, batch, buffers)
                sums[0, i] += weight * loss
                sums[1, i] += correct
                sums[2, i] += counted
            if progress is not None:
                progress(1)
    objective._reduce([sums])
    return sums[0], sums[1] / sums[2]


def evaluate_points(
    objective: Objective,
    directions: list[Params],
    points: np.ndarray,
    *,
    origin: Params | None = None,
    batched: bool = True,
    autocast_dtype: torch.dtype | None = None,
    buffer_directions: list[Params] | None = None,
    channels_last: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of ``objective`` at ``origin + sum_j points[p, j] directions[j]`` for every ``p``.

    ``batched=True`` evaluates all the points in one vmapped pass per data batch (the caller chooses how
    many points to pass at once); ``batched=False`` evaluates them one at a time, with the 4-D parameters
    channels-last if ``channels_last`` (the same values up to rounding; faster convolutions on the CPU).
    ``buffer_directions`` (one dict of floating buffers per direction) moves the buffers along with the
    parameters, with the coordinates clamped to ``[0, 1]``; by default they stay fixed. The values are read
    from the device once. ``progress(n)`` is told of every ``n`` points done (each point of the loop).
    """
    origin = objective.params if origin is None else origin
    if batched and len(points) > 1:
        pts = torch.as_tensor(points, dtype=objective.dtype, device=objective.device)
        loss, accuracy = _evaluate_block(objective, origin, directions, pts, autocast_dtype, buffer_directions)
    else:
        loss, accuracy = _evaluate_loop(objective, origin, directions, points, autocast_dtype, buffer_directions,
                                        channels_last, progress)
    both = torch.stack([loss, accuracy]).cpu().numpy()
    if progress is not None and batched and len(points) > 1:  # the loop counted its points one by one
        progress(len(points))
    return both[0], both[1]


def _axis(name: str, steps: object, span: object) -> np.ndarray:
    """``steps`` evenly spaced coordinates over ``span = (low, high)``, after checking both."""
    steps = check_int(name.replace("span", "steps"), steps, 2)
    try:
        low, high = (float(v) for v in span)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (low, high); got {span!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"{name} must be finite with low < high; got {span!r}")
    return np.linspace(low, high, steps)


def _is_number_pair(value: object) -> bool:
    try:
        return np.shape(value) == (2,) and np.asarray(value, dtype=float).shape == (2,)
    except (TypeError, ValueError):
        return False


def _given_directions(objective: Objective, given: object, count: int, name: str) -> list[Params]:
    """User-given directions on the objective's device and dtype, checked against its parameters."""
    if isinstance(given, dict) or not isinstance(given, Sequence) or len(given) != count:
        raise ValueError(f"{name} must be a tuple of {count} parameter dicts; got {type(given).__name__}"
                         + (f" of length {len(given)}" if isinstance(given, Sequence) and not isinstance(given, dict) else ""))
    for i, d in enumerate(given):
        _check_same_layout("the model's trainable parameters", objective.params, f"{name}[{i}]" if count > 1 else name, d)
    return [{k: d[k].to(objective.device, objective.dtype) for k in objective.params} for d in given]


def _subset(objective: Objective) -> dict[str, Any]:
    """``{"params": [names]}`` when only some trainable parameters move (``params=``), else nothing (so the
    recipes of whole-model surfaces stay as they were)."""
    trainable = [n for n, p in objective.model.named_parameters() if p.requires_grad]
    return {} if sorted(trainable) == sorted(objective.params) else {"params": sorted(objective.params)}


def _data_fingerprint(objective: Objective) -> str:
    """SHA-256 of the objective's data, independent of how they are batched: one digest per tensor of the
    batch structure (inputs, then target, for an ``(x, y)`` pair), over every batch in order."""
    digests: list[Any] = []
    for batch in objective.source:
        parts = tensors_of(batch)
        digests = digests or [hashlib.sha256() for _ in parts]
        for digest, t in zip(digests, parts):
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return hashlib.sha256("".join(d.hexdigest() for d in digests).encode()).hexdigest()


def _fingerprint(tensors: Sequence[Params]) -> str:
    digest = hashlib.sha256()
    for d in tensors:
        for name in sorted(d):
            digest.update(name.encode())
            digest.update(d[name].detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _compute_surface(
    objective: Objective,
    directions: list[Params],
    coords: list[np.ndarray],
    recipe: dict[str, Any],
    *,
    path: str | Path | None,
    batched: bool | None,
    points_per_pass: int | None,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    buffer_directions: list[Params] | None = None,
    distributed: bool = False,
    info: dict[str, Any] | None = None,
) -> SurfaceResult:
    """The grid of ``coords`` around the objective's parameters: resumed from ``path``, the method given,
    saved or timed on the first points (:func:`_given_plan`, :mod:`landscape._surface_plan`), then the rest
    in blocks, each saved."""
    distributed = distributed and _distributed.active()
    info = dict(info or {})
    clash = sorted(set(info) & {"recipe", "points_done", "points_total", "evaluation"})
    if clash:
        raise ValueError(f"info may not set {clash}: the saved file keeps those")
    shape = tuple(len(c) for c in coords)
    points = grid_points(coords)
    loss = np.full(points.shape[0], np.nan)
    accuracy = np.full(points.shape[0], np.nan)
    if autocast_dtype is not None and (autocast_dtype not in (torch.bfloat16, torch.float16) or objective.dtype != torch.float32):
        raise ValueError(f"autocast_dtype must be torch.bfloat16 or torch.float16 with dtype float32 (autocast leaves "
                         f"float64 alone); got autocast_dtype={autocast_dtype}, dtype={objective.dtype}")
    recipe = {**recipe, "coords": [c.tolist() for c in coords], "n_examples": objective.n_examples,
              "data_sha256": _data_fingerprint(objective),
              "dtype": str(objective.dtype).removeprefix("torch."),
              "autocast": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch.")}
    npz_path = json_path = None
    if path is not None:
        npz_path = Path(path).with_suffix(".npz")
        json_path = npz_path.with_suffix(".json")
    writer = not distributed or _distributed.is_main()
    stored = _stored(npz_path, json_path, recipe, writer, distributed)
    done = np.zeros(points.shape[0], dtype=bool)
    saved_record = None
    if stored is not None:
        loss, accuracy, done, saved_record = stored
    done_before = done.copy()
    todo = np.flatnonzero(~done)
    replicas = _distributed.world_size() if distributed else 1
    plan = _given_plan(objective, directions, autocast_dtype, batched, points_per_pass,
                       _plan.Plan.from_record(saved_record), points.shape[0], replicas, distributed)
    record = plan.record() if plan is not None and todo.size else saved_record  # a complete grid keeps its own
    if npz_path is not None and writer and (stored is None or _json_behind(json_path, done) or record != saved_record):
        _save(npz_path, json_path, loss.reshape(shape), accuracy.reshape(shape), done.reshape(shape), coords, recipe,
              info, record)
    bar = progress_bar(total=points.shape[0], initial=points.shape[0] - todo.size, unit="pt",
                       desc=_description(recipe, len(coords), npz_path), enabled=progress and writer)

    def evaluate(method: _plan.Method, index: np.ndarray, tolerate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if distributed:
            return _evaluate_shared(objective, directions, points[index], method, autocast_dtype, buffer_directions,
                                    tolerate)
        return _evaluate_passes(objective, directions, points[index], method, autocast_dtype, buffer_directions,
                                bar.update)

    def commit(index: np.ndarray, values: np.ndarray, accs: np.ndarray) -> None:
        loss[index], accuracy[index], done[index] = values, accs, True
        if npz_path is not None and writer:
            _save(npz_path, json_path, loss.reshape(shape), accuracy.reshape(shape), done.reshape(shape), coords,
                  recipe, info, record)
        if distributed:  # else counted as the points are done
            bar.update(index.size)

    if plan is None and todo.size:
        share = _distributed.broadcast_object if distributed else (lambda value: value)
        plan, used = _plan.time_first_points(
            todo, points.shape[0], _plan.loop_candidates(batched, _has_4d(objective)), evaluate, commit,
            objective.device, replicas, _plan.cpu_points_per_pass_cap(nbytes(objective.params)), share)
        todo, record = todo[used:], plan.record()
    if plan is not None:
        for start in range(0, todo.size, plan.points_per_save):
            index = todo[start : start + plan.points_per_save]
            commit(index, *evaluate(plan.method, index))
    bar.close()
    return SurfaceResult([np.asarray(c) for c in coords], loss.reshape(shape), accuracy.reshape(shape),
                         {"recipe": recipe, "evaluation": record, **info}, computed=int(np.count_nonzero(~done_before)))


def _stored(npz_path: Path | None, json_path: Path | None, recipe: dict[str, Any], writer: bool,
            distributed: bool) -> tuple[Any, ...] | None:
    """What :func:`_read_saved` finds at ``npz_path``; under ``distributed``, rank 0 reads it and every process
    learns its content, or its problem."""
    stored, problem = None, None
    if npz_path is not None and writer:
        try:
            stored = _read_saved(npz_path, json_path, recipe)
        except Exception as error:  # noqa: BLE001 - any failure must reach every rank, or they wait forever
            if not distributed:
                raise
            problem = error
    if distributed:
        stored, problem = _distributed.broadcast_object((stored, problem))
    if problem is not None:
        raise problem
    return stored


def _given_plan(
    objective: Objective, directions: list[Params], autocast_dtype: torch.dtype | None, batched: bool | None,
    points_per_pass: int | None, saved: _plan.Plan | None, grid_size: int, replicas: int, distributed: bool,
) -> _plan.Plan | None:
    """The plan that needs no timing: the arguments', a saved timed one, or a small grid's default; ``None``:
    time the first points (:mod:`landscape._surface_plan`)."""
    device = objective.device.type
    if batched is False or points_per_pass is not None:
        q = 1 if batched is False else check_int("points_per_pass", points_per_pass, 1)
        return _plan.Plan(_plan.Method(q), q * replicas, "argument", device)
    if saved is not None and saved.chosen_by == "timing" and saved.device == device and (
            batched is None or saved.method.batched):
        per_pass = saved.method.points_per_pass * replicas
        return _plan.Plan(saved.method, max(per_pass, saved.points_per_save // per_pass * per_pass), saved.chosen_by,
                          saved.device, saved.seconds_per_point, saved.skipped)
    if grid_size >= _plan.TIMED_FROM:
        return None
    if device == "cuda":
        q = _auto_points_per_pass(objective, directions, autocast_dtype)
        if distributed:  # the same rounds on every process
            q = _distributed.broadcast_object(q)
    else:
        q = _CPU_DEFAULT_POINTS_PER_PASS if batched else 1
    return _plan.Plan(_plan.Method(q), q * replicas, "default", device)


def _has_4d(objective: Objective) -> bool:
    """Whether the channels-last loop is worth timing: some parameter is a 4-D (convolution) kernel."""
    return any(t.ndim == 4 for t in (*objective.params.values(), *objective.fixed.values()))


def _evaluate_passes(
    objective: Objective, directions: list[Params], points: np.ndarray, method: _plan.Method,
    autocast_dtype: torch.dtype | None, buffer_directions: list[Params] | None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at ``points`` with ``method``: one loop over them, or vmapped passes of ``Q`` points."""
    if not method.batched:
        return evaluate_points(objective, directions, points, batched=False, autocast_dtype=autocast_dtype,
                               buffer_directions=buffer_directions, channels_last=method.channels_last,
                               progress=progress)
    q = method.points_per_pass
    parts = [evaluate_points(objective, directions, points[s : s + q], batched=True, autocast_dtype=autocast_dtype,
                             buffer_directions=buffer_directions, progress=progress)
             for s in range(0, len(points), q)]
    return np.concatenate([v for v, _ in parts]), np.concatenate([a for _, a in parts])


def _description(recipe: dict[str, Any], dims: int, npz_path: Path | None) -> str:
    """What a progress line says is computed: ``surface: 2D grid of loss and accuracy (surface_2d_test)``."""
    what = "interpolation" if recipe.get("kind") == "interpolation" else f"{dims}D {'grid' if dims == 2 else 'slice'}"
    return f"surface: {what} of loss and accuracy" + (f" ({npz_path.stem})" if npz_path is not None else "")


def _read_saved(npz_path: Path, json_path: Path, recipe: dict[str, Any]) -> tuple[Any, ...] | None:
    """The flat loss, accuracy and done-mask saved at ``npz_path`` under the same recipe, and how its points
    were evaluated (:meth:`landscape._surface_plan.Plan.record`, or ``None``); ``None`` if nothing is saved.
    The ``.npz`` holds the recipe itself, so a run killed between writing it and its ``.json`` resumes (and
    rewrites the ``.json``).

    Raises:
        FileExistsError: a lone ``.json``, or an ``.npz`` that is not a surface saved here.
        RecipeMismatchError: the saved recipe differs (naming the keys).
    """
    if not npz_path.exists():
        if json_path.exists():
            raise FileExistsError(f"{json_path} exists without its pair; move it away (it is not overwritten)")
        return None
    saved = _read_npz(npz_path)
    if saved is None:
        raise FileExistsError(f"{npz_path} is not a surface saved by landscape.surface; move it away "
                              "(it is not overwritten)")
    loss, accuracy, done, saved_recipe, _, evaluation = saved
    if saved_recipe is None:
        raise FileExistsError(f"{npz_path} was saved by an earlier version of landscape.surface, whose recipe "
                              "lacks the data and buffer hashes; delete it (or pass --overwrite) to recompute")
    if saved_recipe != recipe:
        raise RecipeMismatchError(npz_path, differing_keys(saved_recipe, recipe))
    return loss.ravel(), accuracy.ravel(), done.ravel(), evaluation


def _json_behind(json_path: Path, done: np.ndarray) -> bool:
    """Whether the ``.json`` must be written again from the ``.npz``, which holds the recipe and the values:
    it is missing, unreadable, not an object (``[]``), or counts other points (a run killed between
    writing the two). Never raises: any file there is replaced by a correct one."""
    try:
        saved = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, a directory we cannot read, not UTF-8, not JSON
        return True
    return not isinstance(saved, dict) or saved.get("points_done") != int(np.count_nonzero(done))


def _read_npz(npz_path: Path) -> tuple[Any, ...] | None:
    """``(loss, accuracy, done, recipe, coords, evaluation)`` from a saved ``.npz``; ``None`` if it is not a
    surface.

    A file of an earlier version holds only the values and coordinates: its ``recipe`` is ``None`` (it is
    in the ``.json``) and NaN marks the points not done. ``evaluation`` (how the points were evaluated) is
    ``None`` in files written before it was saved.
    """
    try:
        with np.load(npz_path) as stored:
            files = set(getattr(stored, "files", ()))
            if not {"loss", "accuracy"} <= files:
                return None
            loss, accuracy = stored["loss"].copy(), stored["accuracy"].copy()
            coords = [stored[f"coords_{i}"] for i in range(loss.ndim)]
            if "recipe" not in files:
                return loss, accuracy, ~np.isnan(loss), None, coords, None
            evaluation = json.loads(str(stored["evaluation"])) if "evaluation" in files else None
            return loss, accuracy, stored["done"].astype(bool), json.loads(str(stored["recipe"])), coords, evaluation
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile):  # not an npz of ours
        return None


def _evaluate_shared(
    objective: Objective, directions: list[Params], points: np.ndarray, method: _plan.Method,
    autocast_dtype: torch.dtype | None, buffer_directions: list[Params] | None, tolerate: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at ``points``, each process evaluating its contiguous share, gathered everywhere.

    The shares differ in size by at most one; each is padded to the largest for ``all_gather``. With
    ``tolerate`` (a timed candidate), a failure of the method on any process raises on every process
    (one of :data:`landscape._surface_plan.TOLERATED`) instead of leaving the others waiting.
    """
    replicas = _distributed.world_size()
    mine = _distributed.shard(points.shape[0])
    width = -(-points.shape[0] // replicas)
    block = torch.full((width, 3), float("nan"), dtype=torch.float64, device=objective.device)  # loss, acc, failed
    block[:, 2] = 0
    failure: BaseException | None = None
    if mine.stop > mine.start:
        try:
            values, accs = _evaluate_passes(objective, directions, points[mine], method, autocast_dtype,
                                            buffer_directions)
            block[: mine.stop - mine.start, :2] = torch.as_tensor(np.stack([values, accs], axis=1),
                                                                 device=objective.device)
        except _plan.TOLERATED as error:
            if not tolerate:
                raise
            failure, block[:, 2] = error, 1
    gathered = [torch.empty_like(block) for _ in range(replicas)]
    torch.distributed.all_gather(gathered, block)
    if any(bool(g[:, 2].any()) for g in gathered):  # the same error on every process, naming the first that failed
        reasons: list[Any] = [None] * replicas
        mine_failed = None if failure is None else f"{type(failure).__name__}: {failure}"
        torch.distributed.all_gather_object(reasons, mine_failed)
        first = next(r for r, reason in enumerate(reasons) if reason is not None)
        raise RuntimeError(f"process {first}: {reasons[first]}") from failure
    shares = [_distributed.shard(points.shape[0], r, replicas) for r in range(replicas)]
    parts = [g[: share.stop - share.start, :2] for g, share in zip(gathered, shares)]
    joined = torch.cat(parts).cpu().numpy()
    return joined[:, 0], joined[:, 1]


def _auto_points_per_pass(objective: Objective, directions: list[Params], autocast_dtype: torch.dtype | None) -> int:
    """How many grid points fit in one vmapped pass, for a grid too small to time (on a larger one the
    timed passes measure their own memory: :mod:`landscape._surface_plan`).

    A GPU's (the only caller's): the peak memory of a two-point pass over the first batch, measured, against
    half the free memory, capped at 256.
    """
    device = objective.device
    batch = objective.source.first()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    probe, dims = _block_params(objective.params, directions, torch.zeros(2, len(directions), dtype=objective.dtype, device=device))
    autocast = _autocast(device, autocast_dtype)
    with torch.no_grad(), _training_flags(objective.model, objective.train_mode), autocast:
        torch.vmap(_point_values(objective), in_dims=(dims, None, None))(probe, batch, None)
    torch.cuda.synchronize(device)
    per_point = max((torch.cuda.max_memory_allocated(device) - start) / 2, 1)
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(256, max(1, 0.5 * free // per_point)))


def _save(npz_path: Path, json_path: Path, loss: np.ndarray, accuracy: np.ndarray, done: np.ndarray,
          coords: list[np.ndarray], recipe: dict[str, Any], info: dict[str, Any],
          evaluation: dict[str, Any] | None = None) -> None:
    """The grid so far, atomically: ``.npz`` (values, done-mask, coordinates, the recipe and how the points
    are evaluated), then a ``.json`` with the recipe, progress, ``evaluation`` and ``info``. Points not done
    hold NaN."""
    arrays = {"loss": loss, "accuracy": accuracy, "done": done, "recipe": np.array(json.dumps(recipe)),
              **{f"coords_{i}": c for i, c in enumerate(coords)}}
    extra = {}
    if evaluation is not None:
        arrays["evaluation"] = np.array(json.dumps(evaluation))
        extra["evaluation"] = evaluation
    atomic_write(npz_path, lambda f: np.savez(f, **arrays))
    atomic_write_json(json_path, {"recipe": recipe, "points_done": int(np.count_nonzero(done)),
                                  "points_total": int(done.size), **extra, **info})


def slice_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    direction: Params | None = None,
    steps: int = 51,
    span: tuple[float, float] = (-1.0, 1.0),
    *,
    seed: int = 0,
    norm: str = "filter",
    ignore: str = "biasbn",
    path: str | Path | None = None,
    batched: bool | None = None,
    points_per_pass: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    model_id: str | None = None,
    progress: bool = True,
    distributed: bool = False,
    info: dict[str, Any] | None = None,
    **objective_options: Any,
) -> SurfaceResult:
    """``L(w + alpha d)`` for ``steps`` values of ``alpha`` in ``span`` (Li et al. 2018, Sec. 4).

    ``direction`` defaults to a seeded Gaussian direction with filter normalisation and zero on
    biases/BatchNorm parameters (``norm``, ``ignore``: :func:`landscape.directions.normalize_direction`).
    ``model_id`` (e.g. the checkpoint's SHA-256) is part of the saved recipe, and so are the data's SHA-256
    and, when ``model_id`` is not given, that of the parameters and buffers. ``info`` (a JSON-able dict,
    e.g. the eigenvalues of given Hessian directions) is saved in the ``.json`` beside the recipe from the
    first write on and returned in ``meta``. ``distributed=True``: every
    process of a ``torchrun`` job makes this call and evaluates its share of the points (module docstring).
    ``batched=None`` and ``points_per_pass=None`` (default): the loop or ``Q`` points per vmapped pass,
    whichever is fastest on the first points, timed (module docstring; the choice is ``meta["evaluation"]``);
    ``batched=False``: the plain loop; ``points_per_pass=Q``: ``Q`` points per pass, untimed.
    """
    coords = [_axis("span", steps, span)]
    objective = evaluation_objective(model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size,
                                     **objective_options)
    if direction is None:
        direction = random_direction(objective.params, seed=seed, norm=norm, ignore=ignore)
        recipe = {"kind": "random", "seed": seed, "norm": norm, "ignore": ignore}
    else:
        [direction] = _given_directions(objective, [direction], 1, "direction")
        recipe = {"kind": "given", "directions_sha256": _fingerprint([direction])}
    recipe["model"] = model_id or _fingerprint([objective.params, objective.buffers])
    recipe.update(_subset(objective))
    return _compute_surface(objective, [direction], coords, recipe, path=path, batched=batched,
                            points_per_pass=points_per_pass, autocast_dtype=autocast_dtype, progress=progress,
                            distributed=distributed, info=info)


def slice_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    directions: tuple[Params, Params] | None = None,
    steps: tuple[int, int] = (51, 51),
    span: tuple[tuple[float, float], tuple[float, float]] = ((-1.0, 1.0), (-1.0, 1.0)),
    *,
    seed: int = 0,
    norm: str = "filter",
    ignore: str = "biasbn",
    orthogonal: bool = False,
    path: str | Path | None = None,
    batched: bool | None = None,
    points_per_pass: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    model_id: str | None = None,
    progress: bool = True,
    distributed: bool = False,
    info: dict[str, Any] | None = None,
    **objective_options: Any,
) -> SurfaceResult:
    """``L(w + alpha d1 + beta d2)`` on a ``steps[0] x steps[1]`` grid (Li et al. 2018, Sec. 4 and 6).

    ``directions`` default to two seeded filter-normalised Gaussian directions
    (:func:`landscape.directions.random_plane`); the SGD and SAM minima get the same recipe when called
    with the same ``seed``, ``norm`` and ``ignore``. ``result.loss[i, j]`` is at
    ``(coords[0][i], coords[1][j])``. ``steps=n`` and ``span=(low, high)`` apply to both axes. The saved
    recipe and ``info``: as in :func:`slice_1d`. ``distributed=True``: the points are split across the processes of
    a ``torchrun`` job, every one of which makes this call (module docstring).
    """
    steps = (steps, steps) if np.ndim(steps) == 0 else steps  # one number: the same on both axes
    span = (span, span) if _is_number_pair(span) else span
    if np.ndim(steps) != 1 or len(steps) != 2 or not (isinstance(span, (Sequence, np.ndarray)) and len(span) == 2):
        raise ValueError(f"steps must be (n1, n2) or n, and span ((low1, high1), (low2, high2)) or (low, high); "
                         f"got steps={steps!r}, span={span!r}")
    coords = [_axis("span[0]", steps[0], span[0]), _axis("span[1]", steps[1], span[1])]
    objective = evaluation_objective(model, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size,
                                     **objective_options)
    if directions is None:
        directions = random_plane(objective.params, seed=seed, norm=norm, ignore=ignore, orthogonal=orthogonal)
        recipe = {"kind": "random", "seed": seed, "norm": norm, "ignore": ignore, "orthogonal": orthogonal}
    else:
        directions = _given_directions(objective, directions, 2, "directions")
        recipe = {"kind": "given", "directions_sha256": _fingerprint(list(directions))}
    recipe["model"] = model_id or _fingerprint([objective.params, objective.buffers])
    recipe.update(_subset(objective))
    return _compute_surface(objective, list(directions), coords, recipe, path=path, batched=batched,
                            points_per_pass=points_per_pass, autocast_dtype=autocast_dtype, progress=progress,
                            distributed=distributed, info=info)


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    data: Data,
    steps: int = 51,
    span: tuple[float, float] = (-0.5, 1.5),
    *,
    path: str | Path | None = None,
    batched: bool | None = None,
    points_per_pass: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    buffers: str = "interpolate",
    distributed: bool = False,
    info: dict[str, Any] | None = None,
    **objective_options: Any,
) -> SurfaceResult:
    """``L(w_a + t (w_b - w_a))`` for ``t`` in ``span`` (Goodfellow et al. 2015; Li et al. 2018, Sec. 3).

    ``buffers="interpolate"`` (default) moves the floating buffers (BatchNorm running statistics) along
    the same line, ``b_a + s (b_b - b_a)`` with ``s = clamp(t, 0, 1)`` (beyond the endpoints the buffers
    stay at the nearer model's: extrapolated running variances could turn negative), so ``t = 0`` and
    ``t = 1`` are the two models (up to rounding of ``w_a + (w_b - w_a)``);
    ``"a"`` keeps ``model_a``'s buffers at every ``t`` (then with BatchNorm ``t = 1`` is ``model_b``'s
    weights with ``model_a``'s statistics). ``distributed=True``: as in :func:`slice_2d`.
    """
    if buffers not in ("interpolate", "a"):
        raise ValueError(f"buffers must be 'interpolate' or 'a'; got {buffers!r}")
    coords = [_axis("span", steps, span)]
    objective = evaluation_objective(model_a, loss_fn, data, dtype=dtype, device=device, batch_size=batch_size,
                                     **objective_options)
    theirs = dict(model_b.named_parameters())
    if set(theirs) != set(objective.params) | set(objective.fixed) or any(
            theirs[k].shape != t.shape for k, t in objective.params.items()):
        raise ValueError("model_a and model_b must have the same parameters (names and shapes)")
    other = {name: theirs[name].detach().to(objective.device, objective.dtype) for name in objective.params}
    direction = difference(other, objective.params)
    buffer_directions = None
    fingerprinted = [objective.params, other, objective.buffers]
    if buffers == "interpolate":
        theirs = {name: b.detach().to(objective.device) for name, b in model_b.named_buffers()}
        moving = [k for k, b in objective.buffers.items() if b.is_floating_point()]
        if set(theirs) != set(objective.buffers) or any(theirs[k].shape != objective.buffers[k].shape for k in moving):
            raise ValueError("model_a and model_b must have the same buffers (names and shapes) to interpolate them; "
                             "pass buffers='a' to keep model_a's")
        buffer_directions = [{k: theirs[k].to(objective.dtype) - objective.buffers[k] for k in moving}]
        fingerprinted.append(buffer_directions[0])
    recipe = {"kind": "interpolation", "models": _fingerprint(fingerprinted),
              "buffers": "interpolate, clamped to [0, 1]" if buffers == "interpolate" else buffers, **_subset(objective)}
    return _compute_surface(objective, [direction], coords, recipe, path=path, batched=batched,
                            points_per_pass=points_per_pass, autocast_dtype=autocast_dtype, progress=progress,
                            buffer_directions=buffer_directions, distributed=distributed, info=info)


def load(path: str | Path) -> SurfaceResult:
    """A surface saved with ``path=`` (``PATH.npz`` + ``PATH.json``), e.g. by ``sam-landscape surface``.

    ``meta`` is the ``.json`` (recipe, progress and any ``info``); points not yet evaluated hold NaN.
    Files from earlier versions (no recipe inside the ``.npz``) are read with their ``.json``.

    Raises:
        FileNotFoundError: the ``.npz`` is missing.
        ValueError: it is not a surface saved by this module, or its ``.json`` is not an object.
    """
    path = Path(path)
    npz_path, json_path = path.with_suffix(".npz"), path.with_suffix(".json")
    if not npz_path.exists():
        raise FileNotFoundError(f"{npz_path} not found: no saved surface at {path}")
    saved = _read_npz(npz_path)
    if saved is None or (saved[3] is None and not json_path.exists()):  # an earlier version's recipe is in its .json
        raise ValueError(f"{npz_path} is not a surface saved by landscape.surface")
    loss, accuracy, done, recipe, coords, _ = saved
    meta = read_json(json_path) if json_path.exists() else {
        "recipe": recipe, "points_done": int(np.count_nonzero(done)), "points_total": int(done.size)}
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{json_path} holds a JSON {type(meta).__name__}, not the surface's metadata (an object "
                               "with recipe and points_done); rerun the surface command to write it again")
    return SurfaceResult(coords, loss, accuracy, meta)
