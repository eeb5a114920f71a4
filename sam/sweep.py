"""Hyperparameter sweeps: train every point of a product of grids, resumably, and tabulate what they reach.

``sam-landscape sweep --out DIR --grid optimizer=sgd,sam --grid rho=0.05,0.1 --grid seed=0,1,2 --epochs 20``
trains one run per point of the product of the grids. A grid key is any training option (a
:class:`~sam.trainer.TrainConfig` field), spelled as its flag without the dashes (``label-noise``) or as the
field (``label_noise``); its values are converted to the field's type (``none`` for an optional one,
``true``/``false`` for a switch, ``0.5:0.75`` for a list such as ``lr_milestones``). Every other setting
is the base config (the train flags, or ``--preset``'s). Written into ``DIR``:

* ``sweep.json``: the recipe, ``{"base": ..., "grid": [[key, values], ...]}`` (the base without the grid's
  keys). A rerun with another recipe is refused, naming the keys that differ, unless ``--overwrite``
  (``overwrite=True``) replaces it: runs whose config is unchanged are then kept, a run directory holding
  another config (or a run that cannot be continued: its ``state.pt`` or ``model.pt`` deleted) is trained
  again from scratch, and run directories of points no longer in the grid are left on disk, out of the
  summary.
* ``runs/NAME``: one trainer run directory per point (``sam-landscape train`` could have made it), named
  after its grid values in the grid's order, e.g. ``optimizer=sam,rho=0.05,seed=1``. A finished run
  (``model.pt``, every epoch in ``metrics.jsonl``, ``state.pt`` at the last epoch if kept) is not
  retrained; any other continues from its last finished epoch (``train(..., resume=True)``), so a killed
  sweep is resumed by running the same command again.
* ``summary.csv`` and ``summary.json`` (``{"recipe", "rows"}``): one row per finished run, in grid order:
  ``run``, its grid values, then the last line of its ``metrics.jsonl`` (``epoch``, ``train_loss``,
  ``train_acc``, ``test_loss``, ``test_acc``, ...; a metric named like a training option is prefixed with
  ``final_``: ``final_lr``). With ``--hessian`` also ``lambda_max``, ``trace`` and ``trace_std_error`` of
  the training loss (:func:`sam.analyses.hessian_analysis` with ``k=1``: Lanczos and Hutch++ of
  :mod:`landscape.hessian`, saved as the run's ``hessian.json``, resumable like the training).

With ``jobs > 1`` the points run in that many worker processes (``spawn``), each with an equal share of
the CPU threads. A run that fails (diverges, holds another config, a corrupt file) does not stop the
others: its error is logged with its name, the summary is written with the runs that finished, and
:class:`SweepFailed` (exit code 1 on the command line) names every failed run.

Example:
    >>> from sam.trainer import TrainConfig
    >>> grid = parse_grid(["optimizer=sgd,sam", "label-noise=0,0.2"])
    >>> grid
    [('optimizer', ['sgd', 'sam']), ('label_noise', [0.0, 0.2])]
    >>> [name for name, _ in sweep_points(TrainConfig(epochs=2), grid)]
    ['optimizer=sgd,label_noise=0.0', 'optimizer=sgd,label_noise=0.2', 'optimizer=sam,label_noise=0.0', 'optimizer=sam,label_noise=0.2']
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from landscape.progress import progress_bar
from landscape.storage import (
    CorruptFileError,
    atomic_write_json,
    atomic_write_text,
    differing_keys,
    load_weights,
    read_json,
    remove_stale_temporaries,
)

from ._checks import at_least
from .analyses import HessianSettings, Inputs, hessian_analysis
from .trainer import DEFAULT_MODELS, TrainConfig, final_metrics, load_run_config, train

__all__ = [
    "HESSIAN",
    "Grid",
    "SweepFailed",
    "SweepResult",
    "format_summary",
    "grid_keys",
    "parse_grid",
    "parse_grid_spec",
    "run_sweep",
    "summary_rows",
    "sweep_points",
]

Grid = list[tuple[str, list[Any]]]
"""The grids of a sweep: ``(TrainConfig field, values)`` pairs in the order their product runs."""

HESSIAN = HessianSettings(k=1)
"""What ``--hessian`` computes per run: lambda_max (Lanczos, tol 1e-3) and the trace (Hutch++, 99 products)."""

_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_FIRST_METRICS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")


# ------------------------------------------------------------------------------------------------ grids


def grid_keys() -> tuple[str, ...]:
    """The keys a grid accepts: every :class:`~sam.trainer.TrainConfig` field (dashes work for underscores)."""
    return _FIELDS


def _field_name(key: str, where: str) -> str:
    name = key.strip().replace("-", "_")
    if name not in _FIELDS:
        raise ValueError(f"{where}: unknown key {key!r}; valid keys are the training options "
                         f"{', '.join(_FIELDS)} (with dashes or underscores)")
    return name


def _field_type(name: str) -> tuple[Any, bool]:
    """The type of a TrainConfig field without ``None``, and whether ``None`` is allowed."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _convert(name: str, text: str, where: str) -> Any:
    """``text`` as a value of the field ``name``, or an error naming the grid spec and what is accepted."""
    kind, optional = _field_type(name)
    word = text.strip()
    if optional and word.lower() in (*_NONE, *(("auto",) if kind is bool else ())):
        return None
    try:
        if kind is bool:
            if word.lower() in _TRUE:
                return True
            if word.lower() in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(word)
        if kind is float:
            return float(word)
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            return [item(part) for part in word.split(":")]
        return word
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number"}.get(kind) or (
            "integers separated by ':' (e.g. 5:6:7)" if typing.get_args(kind) == (int,)
            else "numbers separated by ':' (e.g. 0.5:0.75)")
        raise ValueError(f"{where}: {name} takes {wanted}{' or none' if optional else ''}; got {text!r}") from None


def parse_grid_spec(spec: str) -> tuple[str, list[Any]]:
    """One ``--grid KEY=V1,V2,...`` as ``(field, values)``, each value of the field's type.

    Example:
        >>> parse_grid_spec("label-noise=0,0.2")
        ('label_noise', [0.0, 0.2])
        >>> parse_grid_spec("rho=none,0.1")
        ('rho', [None, 0.1])
        >>> parse_grid_spec("seed=0,x")
        Traceback (most recent call last):
        ...
        ValueError: --grid seed=0,x: seed takes an integer; got 'x'
    """
    key, sep, text = spec.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--grid takes KEY=V1,V2,... (e.g. rho=0.05,0.1); got {spec!r}")
    where = f"--grid {spec}"
    name = _field_name(key, where)
    words = text.split(",")
    if not text.strip() or any(not w.strip() for w in words):
        raise ValueError(f"{where}: give one or more values separated by commas, none of them empty")
    values = [_convert(name, w, where) for w in words]
    _check_distinct(name, values, where)
    return name, values


def _check_distinct(name: str, values: Sequence[Any], where: str) -> None:
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise ValueError(f"{where}: {name} value {value!r} is given twice")
        seen.append(value)


def parse_grid(specs: Sequence[str]) -> Grid:
    """Every ``--grid`` as ``[(field, values), ...]`` in the order given; a key may appear once.

    Example:
        >>> parse_grid(["seed=0,1", "label_noise=0.2", "label-noise=0.4"])
        Traceback (most recent call last):
        ...
        ValueError: --grid label-noise=0.4: label_noise is already in the grid (--grid label_noise=0.2): give its values once
    """
    grid: Grid = []
    given: dict[str, str] = {}
    for spec in specs:
        name, values = parse_grid_spec(spec)
        if name in given:
            raise ValueError(f"--grid {spec}: {name} is already in the grid (--grid {given[name]}): give its values once")
        given[name] = spec
        grid.append((name, values))
    return grid


def _as_grid(grid: Grid | Mapping[str, Sequence[Any]]) -> Grid:
    """A grid given in Python (a mapping or pairs, keys with dashes or underscores), checked like ``--grid``."""
    pairs = list(grid.items()) if isinstance(grid, Mapping) else list(grid)
    if not pairs:
        raise ValueError(f"a sweep needs at least one grid (--grid KEY=V1,V2,...; keys: {', '.join(_FIELDS)})")
    checked: Grid = []
    for key, values in pairs:
        where = f"grid {key}"
        name = _field_name(key, where)
        if any(name == other for other, _ in checked):
            raise ValueError(f"{where}: {name} is already in the grid: give its values once")
        values = [values] if isinstance(values, (str, bytes)) else list(values)
        if not values:
            raise ValueError(f"{where}: give at least one value")
        _check_distinct(name, values, where)
        checked.append((name, values))
    return checked


def _format_value(value: Any) -> str:
    """A grid value as it appears in a run name: short, exact for numbers, safe in a file name."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "_".join(_format_value(v) for v in value)
    return _UNSAFE.sub("_", str(value))


def sweep_points(base: TrainConfig, grid: Grid | Mapping[str, Sequence[Any]]) -> list[tuple[str, TrainConfig]]:
    """The ``(run name, TrainConfig)`` of every point of the product of the grids, the first grid slowest.

    The name lists the grid values in the grid's order, ``key=value`` joined by commas (floats as
    ``repr`` gives them, ``none``, ``true``/``false``, lists joined by ``_``, other characters that a
    file name should not hold as ``_``).

    Raises:
        ValueError: a grid is empty or repeats a key or value, a key is not a training option, a point is
            not a valid TrainConfig (the message names the point), or two points get the same name.

    Example:
        >>> points = sweep_points(TrainConfig(), {"optimizer": ["sam"], "rho": [0.05, 0.1], "seed": [1]})
        >>> [(name, config.rho) for name, config in points]
        [('optimizer=sam,rho=0.05,seed=1', 0.05), ('optimizer=sam,rho=0.1,seed=1', 0.1)]
    """
    checked = _as_grid(grid)
    keys = [name for name, _ in checked]
    points = []
    names: dict[str, tuple[Any, ...]] = {}
    for values in itertools.product(*(values for _, values in checked)):
        name = ",".join(f"{k}={_format_value(v)}" for k, v in zip(keys, values))
        if name in names:
            raise ValueError(f"grid points {names[name]} and {values} both get the run name {name!r}; "
                             "give values that differ in letters, digits, '.', '+' or '-'")
        if len(name.encode()) > 255:
            raise ValueError(f"the run name {name[:60]}... is longer than a file name may be (255 bytes): "
                             "sweep fewer keys at once")
        names[name] = values
        changes = dict(zip(keys, values))
        if "dataset" in changes and "model" not in changes and base.model == DEFAULT_MODELS[base.dataset]:
            changes["model"] = None  # the base had its dataset's own model: each point takes its dataset's
        try:
            config = dataclasses.replace(base, **changes)
        except (ValueError, TypeError) as error:
            raise ValueError(f"grid point {name}: {error}") from None
        points.append((name, config))
    return points


# ----------------------------------------------------------------------------------------------- recipe


def _recipe(base: TrainConfig, grid: Grid) -> dict[str, Any]:
    keys = {name for name, _ in grid}
    recipe = {"base": {k: v for k, v in dataclasses.asdict(base).items() if k not in keys},
              "grid": [[name, list(values)] for name, values in grid]}
    return json.loads(json.dumps(recipe))  # as it reads back from sweep.json (tuples as lists)


def _flat_recipe(recipe: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``{"base.epochs": 2, "grid.seed": [0, 1], "grid order": ["seed"]}``: the keys a difference is named by."""
    base, grid = recipe.get("base"), recipe.get("grid")
    if not isinstance(base, dict) or not isinstance(grid, list) or not all(
            isinstance(g, list) and len(g) == 2 and isinstance(g[0], str) for g in grid):
        raise CorruptFileError(f"{path} holds no sweep recipe ({{'base': {{...}}, 'grid': [[key, values], ...]}}); "
                               "pass --overwrite to replace it, or choose another --out")
    flat = {f"base.{k}": v for k, v in base.items()}
    flat.update({f"grid.{name}": values for name, values in grid})
    flat["grid order"] = [name for name, _ in grid]
    return flat


def _check_recipe(recipe: dict[str, Any], path: Path) -> None:
    """A sweep directory holds one recipe: another one is an error naming what differs."""
    if not path.exists():
        return
    stored = read_json(path)
    if not isinstance(stored, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(stored).__name__}, not a sweep recipe; pass --overwrite to "
                               "replace it, or choose another --out")
    saved, current = _flat_recipe(stored, path), _flat_recipe(recipe, path)
    keys = differing_keys(saved, current)
    if keys:
        details = "; ".join(f"{k}: saved {saved.get(k, 'nothing')!r}, given {current.get(k, 'nothing')!r}" for k in keys)
        raise ValueError(f"{path} holds a sweep with another recipe ({details}); pass --overwrite to replace it (runs "
                         "whose config is unchanged are kept, others trained again), or choose another --out")


# ------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class _Task:
    """One point to run, as a worker process receives it."""

    name: str
    config: TrainConfig
    run_dir: Path
    overwrite: bool
    hessian: HessianSettings | None
    progress: bool


def _saved_config_differs(run_dir: Path, config: TrainConfig) -> list[str] | None:
    """The fields in which the run saved in ``run_dir`` differs from ``config`` (``None``: no run there)."""
    if not (run_dir / "config.json").exists():
        return None
    saved, mine = dataclasses.asdict(load_run_config(run_dir)), dataclasses.asdict(config)
    return [k for k in mine if mine[k] != saved[k]]


def _finished(run_dir: Path, config: TrainConfig) -> bool:
    """Whether ``run_dir`` holds this very run with every epoch done: its weights, its metrics up to the last
    epoch, and (unless deleted to save space) its resume state at the last epoch."""
    if not (run_dir / "model.pt").exists() or _saved_config_differs(run_dir, config) != []:
        return False
    try:
        final_metrics(run_dir, config.epochs)
    except (CorruptFileError, FileNotFoundError):
        return False
    state_path = run_dir / "state.pt"
    if not state_path.exists():
        return True
    state = load_weights(state_path, mmap=True)
    if not isinstance(state, dict) or "epoch" not in state:
        raise CorruptFileError(f"{state_path} is not a resume checkpoint of the trainer (no 'epoch')")
    return int(state["epoch"]) >= config.epochs


def _train_point(task: _Task) -> bool:
    """Train (or continue) the point's run unless it is finished; whether anything was trained.

    With ``task.overwrite`` a run that can be neither kept nor continued (another config, an unreadable
    config, weights or metrics whose ``state.pt`` was deleted, a last ``state.pt`` whose ``model.pt`` was
    deleted) is trained again from scratch; without it, that is an error naming the run and ``--overwrite``.
    """
    try:
        differing = _saved_config_differs(task.run_dir, task.config)
    except CorruptFileError:
        if not task.overwrite:
            raise
        differing = ["config.json (unreadable)"]
    if differing and not task.overwrite:
        raise ValueError(f"{task.run_dir} holds a run with another config (differs in {', '.join(differing)}); "
                         "pass --overwrite to train it again from scratch")
    if differing == [] and _finished(task.run_dir, task.config):
        remove_stale_temporaries(task.run_dir)  # train() cleans the directories it trains in
        return False
    again = bool(differing)
    if not again:
        try:
            train(task.config, task.run_dir, resume=True, progress=task.progress)
        except FileExistsError:  # weights or metrics without their state.pt: nothing to continue from
            if not task.overwrite:
                raise
            again = True
        if not again and not _finished(task.run_dir, task.config):
            if not task.overwrite:
                raise CorruptFileError(f"{task.run_dir} holds every epoch in state.pt but no model.pt (deleted?); "
                                       "pass --overwrite to train it again from scratch")
            again = True
    if again:
        train(task.config, task.run_dir, overwrite=True, progress=task.progress)
    return True


def _hessian_point(task: _Task, trained: bool) -> None:
    """The run's lambda_max and trace in its ``hessian.json``: kept when computed for this checkpoint with these
    settings, continued when interrupted, computed again when the run was just trained (or ``overwrite``)."""
    assert task.hessian is not None
    inputs = Inputs(split="train", device=task.config.device)
    try:
        hessian_analysis(task.run_dir, task.hessian, inputs, resume=not trained, overwrite=trained, progress=False)
    except ValueError:  # other settings, another checkpoint, a corrupt file: --overwrite computes it again
        if trained or not task.overwrite:
            raise
        hessian_analysis(task.run_dir, task.hessian, inputs, overwrite=True, progress=False)


def _run_point(task: _Task) -> dict[str, Any]:
    """Train and analyse one point; ``{"trained", "seconds", "final", "error"}``, the error as one line.

    Never raises an ``Exception``: a failed run is reported, and the sweep goes on with the others.
    """
    start = time.perf_counter()
    trained = False
    try:
        trained = _train_point(task)
        if task.hessian is not None:
            _hessian_point(task, trained)
        final = final_metrics(task.run_dir, task.config.epochs)
    except Exception as error:  # noqa: BLE001 - any failure of one run is reported and the others go on
        message = " ".join(str(error).split()) or type(error).__name__
        return {"trained": trained, "seconds": time.perf_counter() - start, "final": None,
                "error": f"{type(error).__name__}: {message}"}
    return {"trained": trained, "seconds": time.perf_counter() - start, "final": final, "error": None}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _run_parallel(tasks: list[_Task], jobs: int, done: Callable[[_Task, dict[str, Any]], None]) -> None:
    """Run ``tasks`` in ``jobs`` spawned processes of ``cpus // jobs`` threads each; ``done`` as each finishes.

    On an interruption the runs not started are cancelled and the parent waits for those running (each is
    resumable from its last epoch).
    """
    threads = max(1, _cpu_count() // jobs)
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    try:
        futures: dict[Future[dict[str, Any]], _Task] = {pool.submit(_run_point, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as error:  # noqa: BLE001 - a worker that died (killed, out of memory)
                outcome = {"trained": False, "seconds": 0.0, "final": None,
                           "error": f"{type(error).__name__}: {' '.join(str(error).split())}"}
            done(futures[future], outcome)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- summary


def summary_rows(runs_dir: str | Path, points: Sequence[tuple[str, TrainConfig]], keys: Sequence[str], *,
                 hessian: bool = False) -> list[dict[str, Any]]:
    """One row per finished run, read from its files: ``run``, the grid values, the last metrics.

    Args:
        runs_dir: the directory holding the runs (``DIR/runs``).
        points: ``(name, config)`` of the runs, in the order of the rows.
        keys: the grid's keys (the TrainConfig fields that vary).
        hessian: add ``lambda_max``, ``trace`` and ``trace_std_error`` from each run's ``hessian.json``.

    Returns:
        Rows ``{"run": name, KEY: value for each key, then every entry of the last line of the run's
        metrics.jsonl}`` (``epoch``, ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` first; an entry
        named like a training option is prefixed with ``final_``: the last learning rate is ``final_lr``).

    Raises:
        CorruptFileError: a run's ``metrics.jsonl`` does not end with its last epoch, or its ``hessian.json``
            holds no ``lambda_max``.
    """
    rows = []
    for name, config in points:
        run_dir = Path(runs_dir) / name
        final = final_metrics(run_dir, config.epochs)
        row: dict[str, Any] = {"run": name, **{k: getattr(config, k) for k in keys}}
        for key in (*[k for k in _FIRST_METRICS if k in final], *[k for k in final if k not in _FIRST_METRICS]):
            row[f"final_{key}" if key in _FIELDS or key == "run" else key] = final[key]
        if hessian:
            row.update(_hessian_columns(run_dir / "hessian.json"))
        rows.append(row)
    return rows


def _hessian_columns(path: Path) -> dict[str, Any]:
    saved = read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("lambda_max"), (int, float)):
        raise CorruptFileError(f"{path} holds no lambda_max: it is not a result of the Hessian analysis")
    trace = saved.get("trace") if isinstance(saved.get("trace"), dict) else {}
    return {"lambda_max": saved["lambda_max"], "trace": trace.get("value"), "trace_std_error": trace.get("std_error")}


def _write_csv(path: Path, rows: list[dict[str, Any]], first: Sequence[str]) -> None:
    """``rows`` as CSV: the union of their columns in order of appearance; ``None`` empty, lists as JSON."""
    columns = list(dict.fromkeys([*first, *(k for row in rows for k in row)]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v
                         for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary as aligned text: one line per run, its name and final accuracies (and lambda_max, trace).

    Example:
        >>> print(format_summary([{"run": "seed=0", "train_acc": 0.99, "test_acc": 0.9512, "test_loss": 0.17}]))
        run       train_acc  test_acc  test_loss
        seed=0       0.9900    0.9512     0.1700
    """
    columns = [c for c in ("train_acc", "test_acc", "test_loss", "lambda_max", "trace") if any(c in r for r in rows)]
    width = max([3, *(len(str(r["run"])) for r in rows)])
    lines = [f"{'run':<{width}}" + "".join(f"  {c:>9}" for c in columns)]
    for row in rows:
        cells = "".join(f"  {_fmt(row.get(c)):>9}" for c in columns)
        lines.append(f"{row['run']:<{width}}{cells}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


# ---------------------------------------------------------------------------------------------- running


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the summary rows (finished runs, grid order), the runs it trained (or
    continued), those that failed (name: error) and the files it wrote."""

    rows: list[dict[str, Any]]
    trained: list[str]
    failed: dict[str, str]
    out_dir: Path
    files: list[Path] = field(default_factory=list)


class SweepFailed(RuntimeError):
    """Some runs of a sweep failed; the others finished and are in the summary (``.result``)."""

    def __init__(self, result: SweepResult) -> None:
        self.result = result
        failures = "; ".join(f"{name}: {error}" for name, error in result.failed.items())
        total = len(result.rows) + len(result.failed)
        super().__init__(f"{len(result.failed)} of {total} runs failed ({failures}); the summary in {result.out_dir} "
                         "holds the others: fix the cause and rerun the same command to train what is missing")


def run_sweep(
    base: TrainConfig,
    grid: Grid | Mapping[str, Sequence[Any]],
    out_dir: str | Path,
    *,
    jobs: int = 1,
    hessian: HessianSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Train every point of the sweep that is not finished, then write ``summary.csv`` and ``summary.json``.

    Args:
        base: every setting the grids leave alone.
        grid: ``[(key, values), ...]`` (:func:`parse_grid`) or ``{key: values}``; keys are TrainConfig fields.
        out_dir: the sweep directory (``sweep.json``, ``runs/NAME``, the summary).
        jobs: how many runs train at once, each in its own process (1: in this process).
        hessian: also compute, per run, the Hessian analysis with these settings on the training split
            (:data:`HESSIAN` for ``--hessian``) and add ``lambda_max`` and ``trace`` to the summary.
        overwrite: accept a recipe that differs from the one in ``out_dir/sweep.json`` (see the module).
        progress: one line per finished run (a bar on a terminal); with ``jobs=1`` also each run's epochs.
        log: where the failure of a run is reported (one line naming it).

    Returns:
        The summary rows, the names of the runs trained or continued by this call, and the files written.

    Raises:
        ValueError: the grid or a point is invalid, or ``out_dir`` holds a sweep with another recipe and
            ``overwrite`` is False (the message names the differing keys).
        SweepFailed: some runs failed; the others ran and the summary was written with them.
    """
    at_least("jobs", jobs, 1)
    checked = _as_grid(grid)
    points = sweep_points(base, checked)
    keys = [name for name, _ in checked]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a sweep directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # a summary a killed sweep was writing
    recipe = _recipe(base, checked)
    recipe_path = out / "sweep.json"
    if not overwrite:
        _check_recipe(recipe, recipe_path)
    atomic_write_json(recipe_path, recipe)

    tasks = [_Task(name, config, out / "runs" / name, overwrite, hessian, progress and jobs == 1)
             for name, config in points]
    outcomes: dict[str, dict[str, Any]] = {}
    bar = progress_bar(total=len(tasks), desc="sweep", unit="run", enabled=progress, lines="each")

    def done(task: _Task, outcome: dict[str, Any]) -> None:
        outcomes[task.name] = outcome
        if outcome["error"] is not None:
            log(f"sweep: run {task.name} failed: {outcome['error']}")
            bar.set_postfix_str(f"{task.name}: failed")
        else:
            how = f"trained in {outcome['seconds']:.1f} s" if outcome["trained"] else "finished before"
            bar.set_postfix_str(f"{task.name}: test_acc {outcome['final']['test_acc']:.4f} ({how})")
        bar.update(1)

    if jobs == 1:
        for task in tasks:
            done(task, _run_point(task))
    else:
        _run_parallel(tasks, jobs, done)
    bar.close()

    finished = [(name, config) for name, config in points if outcomes[name]["error"] is None]
    rows = summary_rows(out / "runs", finished, keys, hessian=hessian is not None)
    first = ["run", *keys, *_FIRST_METRICS]
    _write_csv(out / "summary.csv", rows, first)
    atomic_write_json(out / "summary.json", {"recipe": recipe, "rows": rows})
    result = SweepResult(rows=rows, trained=[name for name, _ in points if outcomes[name]["trained"]],
                         failed={name: outcomes[name]["error"] for name, _ in points if outcomes[name]["error"]},
                         out_dir=out, files=[out / "summary.csv", out / "summary.json", recipe_path])
    if result.failed:
        raise SweepFailed(result)
    return result
