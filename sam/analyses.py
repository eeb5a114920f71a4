"""The analyses of a saved run, written as files: what ``sam-landscape hessian``, ``surface`` and
``sharpness`` do, callable from Python (``compare`` calls them too).

Each function rebuilds the run's model and data (:func:`sam.trainer.load_run`), runs the analysis of
:mod:`landscape` on the chosen split and writes plain files beside the run (or into ``out_dir``):

* :func:`hessian_analysis`: ``hessian.json`` (eigenvalues, trace, settings) and ``hessian.npz`` (arrays,
  the eigenvalue density). Its stages (top eigenpairs, trace, each SLQ run of the density) are saved in
  ``hessian.partial.pt`` as they finish, so ``resume=True`` continues an interrupted analysis from the
  last finished stage; the result equals an uninterrupted one bit for bit on the CPU.
* :func:`surface_analysis`: one resumable grid per run (``surface_2d``, ``surface_1d``, ``interpolation``
  with ``_hessian``/``_pca`` and ``_test`` suffixes, :mod:`landscape.surface`) and, with ``plot=True``,
  its figures.
* :func:`sharpness_analysis`: ``sharpness.json`` and per-chunk values in ``sharpness.npz``.

Results are never overwritten unless ``overwrite=True``. Under ``torchrun`` every process calls the same
function; the data or the grid points are split across them and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import pickle
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landscape import distributed, hessian, surface
from landscape._results import result_paths, save_results
from landscape.density import concatenate_slq, slq_nodes
from landscape.density import spectral_density as density_on_grid
from landscape.objective import Objective
from landscape.progress import progress_bar
from landscape.sharpness import MeasureSettings, measure_all, sharpness_objective
from landscape.storage import (
    CorruptFileError,
    atomic_torch_save,
    differing_keys,
    load_weights,
    read_json,
    remove_stale_temporaries,
)

from ._checks import at_least, one_of
from .subjects import Subject, run_subject
from .trainer import resolve_device

__all__ = [
    "Inputs",
    "HessianSettings",
    "SurfaceSettings",
    "Saved",
    "SurfaceAnalysis",
    "hessian_analysis",
    "surface_analysis",
    "sharpness_analysis",
    "surface_file_name",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Inputs:
    """Which data an analysis uses, which parameters it moves, and how it evaluates them.

    ``params``: names or shell-style patterns (``"classifier.*"``) of the parameters to analyse (default:
    every trainable one). ``stream``: read the data again on every pass, one batch on the device at a
    time (default: when they exceed ``memory_budget`` bytes; :mod:`landscape.data`).
    """

    split: str = "train"
    batch_size: int = 2048
    dtype: str = "float32"
    device: str = "auto"
    params: tuple[str, ...] | None = None
    stream: bool | None = None
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        one_of("split", self.split, SPLITS)
        one_of("dtype", self.dtype, DTYPES)
        at_least("batch_size", self.batch_size, 1)
        if self.params is not None and not self.params:
            raise ValueError("params, when given, must name at least one parameter or pattern")
        if self.memory_budget is not None:
            at_least("memory_budget", self.memory_budget, 1)
        distributed.check_device_name(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def objective_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~landscape.objective.Objective` these inputs set."""
        patterns = self.params

        def chosen(name: str) -> bool:
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns or ())

        return {"batch_size": self.batch_size, "params": chosen if patterns is not None else None,
                "stream": self.stream, "memory_budget": self.memory_budget}

    def recipe(self) -> dict[str, Any]:
        """What of these inputs changes the numbers (not whether the data are streamed, nor the budget)."""
        return {"split": self.split, "batch_size": self.batch_size, "dtype": self.dtype,
                "params": list(self.params) if self.params is not None else None}


@dataclass(frozen=True)
class HessianSettings:
    """What :func:`hessian_analysis` computes: top eigenpairs, the trace and the eigenvalue density."""

    k: int = 5
    which: str = "LA"
    tol: float = 1e-3
    method: str = "lanczos"
    max_matvecs: int | None = None
    trace: bool = True
    trace_method: str = "hutch++"
    trace_matvecs: int = 99
    density: bool = False
    density_runs: int = 10
    density_steps: int = 80
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("k", "trace_matvecs", "density_runs", "density_steps"):
            at_least(name, getattr(self, name), 1)
        at_least("seed", self.seed, 0)
        if self.max_matvecs is not None:
            at_least("max_matvecs", self.max_matvecs, 1)
        one_of("which", self.which, ("LA", "SA", "LM"))
        one_of("method", self.method, hessian.METHODS)
        one_of("trace_method", self.trace_method, hessian.TRACE_METHODS)
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0; got {self.tol}")
        if self.method == "power" and self.which != "LM":
            raise ValueError("method power finds largest-magnitude eigenvalues: use it with which LM (--which LM)")
        if self.trace_method == "hutch++" and self.trace_matvecs < 3:
            raise ValueError(f"trace_matvecs must be >= 3 for hutch++ (a third sketches the top subspace); "
                             f"got {self.trace_matvecs}")


@dataclass(frozen=True)
class SurfaceSettings:
    """The slice :func:`surface_analysis` computes (see :func:`landscape.surface.slice_2d`)."""

    dim: int = 2
    steps: int = 51
    span: tuple[float, float] = (-1.0, 1.0)
    directions: str = "random"
    norm: str = "filter"
    ignore: str = "biasbn"
    orthogonal: bool = False
    interpolate_buffers: str = "interpolate"
    points_per_pass: int | None = None
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("dim", self.dim, (1, 2))
        at_least("steps", self.steps, 2)
        at_least("seed", self.seed, 0)
        if self.points_per_pass is not None:
            at_least("points_per_pass", self.points_per_pass, 1)
        one_of("directions", self.directions, ("random", "hessian", "pca"))
        one_of("norm", self.norm, ("filter", "layer", "model", "none"))
        one_of("ignore", self.ignore, ("biasbn", "none"))
        one_of("interpolate_buffers", self.interpolate_buffers, ("interpolate", "a"))
        if len(self.span) != 2 or not float(self.span[0]) < float(self.span[1]):
            raise ValueError(f"span must be (low, high) with low < high; got {self.span}")


@dataclass
class Saved:
    """What an analysis wrote (or found complete): its files and its scalars."""

    json_path: Path
    npz_path: Path
    scalars: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    computed: bool = True


@dataclass
class SurfaceAnalysis:
    """The surfaces :func:`surface_analysis` computed (one per run, by label) and the files it wrote."""

    results: dict[str, surface.SurfaceResult]
    paths: dict[str, Path]
    figures: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- Hessian


def hessian_analysis(
    checkpoint: str | Path | Subject,
    settings: HessianSettings = HessianSettings(),
    inputs: Inputs = Inputs(),
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Saved:
    """Top Hessian eigenvalues, trace and eigenvalue density of a run's training (or test) loss.

    Writes ``hessian.json`` and ``hessian.npz`` into ``out_dir`` (default: the run directory). Each stage
    (eigenpairs, trace, every SLQ run) is saved in ``hessian.partial.pt`` when it finishes.

    Args:
        checkpoint: a run directory, or a weights file inside one, or a :class:`~sam.subjects.Subject`
            (a user's own model and data).
        settings: what to compute.
        inputs: split, batch size, dtype, device, parameters, streaming.
        out_dir: where to write (default: the run directory; required for a model without one).
        overwrite: replace finished or interrupted results.
        resume: continue an interrupted analysis with the same settings (a finished one is returned as
            it is).
        progress: show progress.

    Raises:
        FileExistsError: results exist and neither ``overwrite`` nor (for an interrupted one, or a finished
            one with the same settings) ``resume`` was given.
        ValueError: ``resume`` was given and the saved results were made with other settings.
    """
    device = resolve_device(inputs.device)
    subject = as_subject(checkpoint, device)
    out = _output_directory(subject, out_dir)
    json_path, npz_path = result_paths(out, "hessian")
    partial_path = out / "hessian.partial.pt"
    recipe = {**dataclasses.asdict(settings), **inputs.recipe(), "device": str(device),
              "checkpoint_sha256": subject.identity, "processes": distributed.world_size()}
    if distributed.is_main():
        remove_stale_temporaries(out)
    finished = _finished_hessian(json_path, npz_path, partial_path, recipe, overwrite=overwrite, resume=resume)
    if finished is not None:
        return finished
    state = _hessian_state(partial_path, recipe, overwrite=overwrite, resume=resume)

    # Under torchrun each process holds a contiguous shard; one product is one all_reduce over them.
    objective = Objective(subject.model, subject.loss_fn, subject.data(inputs.split, shard=True), device=device,
                          dtype=inputs.torch_dtype, distributed=True, hvp_method=state.get("hvp_method", "auto"),
                          **inputs.objective_options())
    state["hvp_method"] = objective.hvp_method  # a resumed run takes the same products
    op = objective.hessian_operator()
    show = progress and distributed.is_main()
    # One line per finished stage in a log (the solvers' own bars count products or converged pairs).
    stages = progress_bar(total=_hessian_stages(settings), initial=_hessian_stages(settings, state), desc="hessian",
                          unit="stages", enabled=show, lines="each")

    def stage_done(name: str, value: Any, used: int, began: float, what: str) -> None:
        state[name] = value
        state["matvecs"] = state.get("matvecs", 0) + op.n_matvecs - used
        state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - began
        if distributed.is_main():
            atomic_torch_save(state, partial_path)
        stages.set_postfix_str(f"{what}; {state['matvecs']} Hessian-vector products so far")
        stages.update(1)

    problem = (subject.model, subject.loss_fn, objective.source)  # not read again: the operator is given
    if "eigen" not in state:
        used, began = op.n_matvecs, time.perf_counter()
        eig = hessian.top_eigenvalues(*problem, k=settings.k, which=settings.which, tol=settings.tol,
                                      max_matvecs=settings.max_matvecs, method=settings.method, seed=settings.seed,
                                      progress=show, operator=op)
        stage_done("eigen", {"summary": eig.to_dict(), "eigenvalues": eig.eigenvalues.double().cpu(),
                             "residuals": eig.residuals.double().cpu()}, used, began,
                   f"{settings.method} top-{settings.k} {settings.which} eigenvalues done, first "
                   f"{float(eig.eigenvalues[0]):.6g} (converged: {eig.converged})")
    if settings.trace and "trace" not in state:
        used, began = op.n_matvecs, time.perf_counter()
        trace = hessian.hessian_trace(*problem, method=settings.trace_method, n_matvecs=settings.trace_matvecs,
                                      seed=settings.seed, progress=show, operator=op)
        stage_done("trace", {"value": trace.value, "std_error": trace.std_error, "n_matvecs": trace.n_matvecs,
                             "method": settings.trace_method}, used, began,
                   f"trace ({settings.trace_method}) done, {trace.value:.6g} +- {trace.std_error:.2g}")
    if settings.density:  # one stage per SLQ run: each has its own seeded start vector
        runs = dict(state.get("slq_runs", {}))
        for index in range(settings.density_runs):
            if index in runs:
                continue
            used, began = op.n_matvecs, time.perf_counter()
            one = slq_nodes(op, n_runs=1, n_steps=settings.density_steps, seed=settings.seed, first_run=index,
                            progress=False)
            runs[index] = {"nodes": torch.from_numpy(one.nodes), "weights": torch.from_numpy(one.weights),
                           "n_nodes": torch.from_numpy(one.n_nodes), "n_matvecs": one.n_matvecs}
            stage_done("slq_runs", dict(runs), used, began,
                       f"density (SLQ) run {index + 1} of {settings.density_runs} done")
    stages.close()

    scalars, arrays = _hessian_results(state, settings, inputs, subject, objective, op.shape[0], recipe)
    if not distributed.is_main():
        return Saved(json_path, npz_path, scalars, arrays)
    save_results(out, "hessian", scalars, arrays, overwrite=True)  # what was there was checked above
    partial_path.unlink(missing_ok=True)  # after the .json, the commit point: a kill before leaves it to resume
    return Saved(json_path, npz_path, scalars, arrays)


def _hessian_stages(settings: HessianSettings, state: dict[str, Any] | None = None) -> int:
    """How many stages the analysis has (eigenpairs, trace, each SLQ run), or of those, how many ``state`` holds."""
    if state is None:
        return 1 + int(settings.trace) + (settings.density_runs if settings.density else 0)
    return (int("eigen" in state) + int(settings.trace and "trace" in state)
            + (len(state.get("slq_runs", {})) if settings.density else 0))


def _decided_on_main(decide: Callable[[], Any]) -> Any:
    """``decide()`` on rank 0 (which alone reads and writes the files), its value or error on every rank.

    Any exception is sent to the other ranks (as a ``RuntimeError`` naming it when it cannot be pickled),
    or they would wait forever for rank 0; rank 0 raises its own, with its traceback.
    """
    value, problem = None, None
    if distributed.is_main():
        try:
            value = decide()
        except Exception as error:  # noqa: BLE001 - every rank must learn it, whatever it is
            problem = error
    if not distributed.active():
        if problem is not None:
            raise problem
        return value
    sent = problem
    if problem is not None:
        try:
            pickle.dumps(problem)
        except Exception:  # noqa: BLE001 - an exception holding a lock, a file, a lambda ...
            sent = RuntimeError(f"{type(problem).__name__} on rank 0: {problem}")
    value, sent = distributed.broadcast_object((value, sent))
    if problem is not None:
        raise problem
    if sent is not None:
        raise sent
    return value


def _finished_hessian(json_path: Path, npz_path: Path, partial_path: Path, recipe: dict[str, Any], *,
                      overwrite: bool, resume: bool) -> Saved | None:
    """The saved results when they are complete and ``resume`` keeps them; clears them for ``overwrite``."""

    def decide() -> Saved | None:
        if overwrite:
            for path in (json_path, npz_path, partial_path):
                path.unlink(missing_ok=True)
            return None
        if not json_path.exists():  # the commit point: a lone .npz is a kill between the two files
            return None  # the analysis resumes from its stages (or starts) and writes both again
        partial_path.unlink(missing_ok=True)  # a kill after the .json, before the stages were deleted
        if not resume:
            raise FileExistsError(f"{json_path} already exists; pass --overwrite to replace it "
                                  "(or --resume to keep it when its settings are the same)")
        saved = read_json(json_path)
        if not isinstance(saved, dict) or not isinstance(saved.get("recipe"), dict):
            raise CorruptFileError(f"{json_path} holds no 'recipe' object (the settings it was computed with): it is "
                                   "not a result of sam-landscape hessian, or was edited; pass --overwrite to compute "
                                   "it again")
        differing = differing_keys(saved["recipe"], recipe)
        if differing:
            raise ValueError(f"{json_path} holds results of other settings (differs in {differing}); "
                             "pass --overwrite to replace them, or --out DIR to write elsewhere")
        return Saved(json_path, npz_path, saved, _read_arrays(npz_path), computed=False)

    return _decided_on_main(decide)


def _read_arrays(npz_path: Path) -> dict[str, np.ndarray]:
    if not npz_path.exists():
        raise CorruptFileError(f"{npz_path} is missing beside {npz_path.with_suffix('.json')} (it is written first); "
                               "pass --overwrite to compute both again")
    try:
        with np.load(npz_path) as stored:
            return {k: stored[k] for k in stored.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CorruptFileError(f"{npz_path} is truncated or not an .npz file ({error}); "
                               "pass --overwrite to compute it again") from None


def _hessian_state(partial_path: Path, recipe: dict[str, Any], *, overwrite: bool, resume: bool) -> dict[str, Any]:
    """The stages an interrupted analysis saved (empty for a fresh start), after checking its recipe."""

    def decide() -> dict[str, Any]:
        if not partial_path.exists():
            return {"recipe": recipe}
        if overwrite:
            partial_path.unlink()
            return {"recipe": recipe}
        if not resume:
            raise FileExistsError(f"{partial_path} holds an interrupted Hessian analysis; pass --resume to "
                                  "continue it, or --overwrite to start again")
        state = load_weights(partial_path)
        if not isinstance(state, dict) or not isinstance(state.get("recipe"), dict):
            raise CorruptFileError(f"{partial_path} is not a partial Hessian analysis; pass --overwrite to start again")
        differing = differing_keys(state["recipe"], recipe)
        if differing:
            raise ValueError(f"{partial_path} was started with other settings (differs in {differing}); "
                             "pass the same flags to resume it, or --overwrite to start again")
        return state

    return _decided_on_main(decide)


def _hessian_results(state: dict[str, Any], settings: HessianSettings, inputs: Inputs, subject: Subject,
                     objective: Objective, n_parameters: int, recipe: dict[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``hessian.json``'s scalars and ``hessian.npz``'s arrays from the finished stages."""
    eigen = state["eigen"]
    values = eigen["eigenvalues"].tolist()
    scalars: dict[str, Any] = {
        "checkpoint": subject.source, "checkpoint_sha256": subject.identity, "split": inputs.split,
        "n_examples": objective.n_examples, "n_loss_terms": objective.n_terms, "n_parameters": n_parameters, "dtype": inputs.dtype,
        "device": recipe["device"], "hvp_method": state["hvp_method"], "seed": settings.seed,
        "eigen": eigen["summary"], "processes": distributed.world_size(), "lambda_max": values[0], "recipe": recipe,
    }
    if len(values) >= 5 and settings.which == "LA":
        scalars["lambda_max_over_lambda_5"] = values[0] / values[4]
    arrays = {"eigenvalues": np.asarray(values), "residuals": eigen["residuals"].numpy()}
    if settings.trace:
        scalars["trace"] = state["trace"]
    if settings.density:
        runs = state["slq_runs"]
        slq = concatenate_slq([_slq_run(runs[i], n_parameters) for i in range(settings.density_runs)])
        density = density_on_grid(slq)
        scalars["density"] = {"n_runs": settings.density_runs, "n_steps": settings.density_steps,
                              "sigma_squared": density.sigma_squared, "n_matvecs": density.n_matvecs}
        arrays.update(density_grid=density.grid, density=density.density,
                      density_nodes=np.asarray(density.nodes, dtype=np.float64),
                      density_weights=np.asarray(density.weights, dtype=np.float64))
    scalars["total_matvecs"] = state.get("matvecs", 0)
    scalars["seconds"] = state.get("seconds", 0.0)  # of the stages, summed over interruptions
    return scalars, arrays


def _slq_run(saved: dict[str, Any], dim: int) -> Any:
    from landscape.density import SLQResult

    return SLQResult(nodes=saved["nodes"].numpy(), weights=saved["weights"].numpy(), n_nodes=saved["n_nodes"].numpy(),
                     n_matvecs=int(saved["n_matvecs"]), dim=dim)


# ------------------------------------------------------------------------------------------- sharpness


def sharpness_analysis(
    checkpoint: str | Path | Subject,
    measures: MeasureSettings = MeasureSettings(),
    inputs: Inputs = Inputs(),
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Saved:
    """Every sharpness measure of :func:`landscape.sharpness.measure_all` for a run, as ``sharpness.json``
    (values, settings) and ``sharpness.npz`` (per-chunk values).

    ``sharpness.json`` is written last: a ``sharpness.npz`` without it is the trace of a run killed between
    the two, and is replaced.

    Raises:
        FileExistsError: ``sharpness.json`` exists and ``overwrite`` is False.
    """
    device = resolve_device(inputs.device)
    subject = as_subject(checkpoint, device)
    out = _output_directory(subject, out_dir)
    json_path, npz_path = result_paths(out, "sharpness")
    remove_stale_temporaries(out)
    if json_path.exists() and not overwrite:  # done, whether or not its .npz is there: never replaced silently
        what = "" if npz_path.exists() else f" (without {npz_path.name}, which is written before it)"
        raise FileExistsError(f"{json_path} already exists{what}; pass --overwrite to replace it")
    start = time.perf_counter()
    objective = sharpness_objective(subject.model, subject.loss_fn, subject.data(inputs.split),
                                    dtype=inputs.torch_dtype, device=device, **inputs.objective_options())
    loss, accuracy = objective.loss_and_accuracy()
    result = measure_all(objective, measures, progress=progress)
    per_chunk = result.pop("per_chunk")
    scalars = {"checkpoint": subject.source, "checkpoint_sha256": subject.identity, "split": inputs.split,
               "n_examples": objective.n_examples, "n_loss_terms": objective.n_terms, "dtype": inputs.dtype,
               "device": str(device), "params": inputs.recipe()["params"], "loss": loss,
               "accuracy": accuracy if math.isfinite(accuracy) else None, **result,
               "seconds": time.perf_counter() - start}
    save_results(out, "sharpness", scalars, per_chunk, overwrite=True)  # checked above; a lone .npz is unfinished
    return Saved(json_path, npz_path, scalars, per_chunk)


# --------------------------------------------------------------------------------------------- surface


def surface_file_name(settings: SurfaceSettings, split: str, interpolation: bool) -> str:
    """The grid's file stem: one per kind of directions and split, so no two kinds share a file.

    Example:
        >>> surface_file_name(SurfaceSettings(dim=1, directions="hessian"), "test", interpolation=False)
        'surface_1d_hessian_test'
        >>> surface_file_name(SurfaceSettings(), "train", interpolation=True)
        'interpolation'
    """
    kind = "" if interpolation or settings.directions == "random" else f"_{settings.directions}"
    name = "interpolation" if interpolation else f"surface_{settings.dim}d{kind}"
    return name + ("_test" if split == "test" else "")


def surface_analysis(
    checkpoint: str | Path | Subject,
    settings: SurfaceSettings = SurfaceSettings(),
    inputs: Inputs = Inputs(),
    out_dir: str | Path | None = None,
    *,
    compare: Sequence[str | Path | Subject] = (),
    interpolate: str | Path | Subject | None = None,
    overwrite: bool = False,
    plot: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SurfaceAnalysis:
    """A resumable loss surface around a run (and the same recipe around each of ``compare``), or the
    interpolation from it to ``interpolate``.

    Each run's grid goes to ``out_dir`` (default: that run's directory; with several runs and an
    ``out_dir``, a folder per run in it), named by :func:`surface_file_name`. A rerun resumes a grid; one
    with another recipe is refused (``overwrite=True`` starts it again). Hessian and PCA directions are
    kept in ``NAME.directions.pt`` beside the grid and read back on resume. ``plot=True`` draws the
    surfaces (:func:`landscape.plot.write_surface_report`).

    Raises:
        ValueError: ``compare`` and ``interpolate`` together, a saved grid of another recipe, or too few
            snapshots for PCA directions.
    """
    if compare and interpolate is not None:
        raise ValueError("use either --compare or --interpolate, not both")
    device = resolve_device(inputs.device)
    main_process = distributed.is_main()
    progress = progress and main_process
    common = dict(points_per_pass=settings.points_per_pass, autocast_dtype=torch.bfloat16 if settings.bf16 else None,
                  dtype=inputs.torch_dtype, device=device, progress=progress, distributed=True,
                  **inputs.objective_options())
    subjects = [as_subject(checkpoint, device), *(as_subject(c, device) for c in compare)]
    other = as_subject(interpolate, device) if interpolate is not None else None
    name = surface_file_name(settings, inputs.split, interpolate is not None)
    labels = [subject.name for subject in subjects]
    if len(set(labels)) < len(labels):  # --compare a/seed0 b/seed0 --out DIR: keep the two apart
        labels = [f"{i}-{label}" for i, label in enumerate(labels)]
    analysis = SurfaceAnalysis({}, {})
    for subject, label in zip(subjects, labels):
        out = _output_directory(subject, out_dir)
        if out_dir is not None and len(subjects) > 1:
            out = out / label
        path = out / name
        if main_process:
            remove_stale_temporaries(out)
            if overwrite:
                for suffix in (".npz", ".json", ".directions.pt"):
                    path.with_suffix(suffix).unlink(missing_ok=True)
        distributed.barrier()
        try:
            result = _one_surface(subject, other, inputs.split, settings, path, common, log)
        except surface.RecipeMismatchError as error:
            raise ValueError(f"{error.path} holds a surface with a different recipe (differs in {error.differing}); "
                             "pass --overwrite to compute it again, or --out DIR to write elsewhere") from None
        analysis.results[label], analysis.paths[label] = result, path
        if main_process:
            what = (f"computed {result.computed} of {result.loss.size} points" if result.computed
                    else f"all {result.loss.size} points were already computed")
            log(f"{subject.home or subject.source}: loss {np.nanmin(result.loss):.4g} to {np.nanmax(result.loss):.4g}; "
                f"{what}; {path.with_suffix('.npz')}")
    if plot and main_process:
        where = _output_directory(subjects[0], out_dir)
        other_label = other.name if other is not None else None
        # named after what they show, so that A --compare B and A --compare C keep their own figures
        shown = [*labels, other_label] if other_label else labels
        stem = where / (name if len(shown) == 1 else f"{name}_{'_vs_'.join(shown)}")
        from landscape.plot import write_surface_report

        remove_stale_temporaries(where)
        analysis.figures = write_surface_report(analysis.results, stem, split=inputs.split, other=other_label)
    return analysis


def _one_surface(subject: Subject, other: Subject | None, split: str, settings: SurfaceSettings, path: Path,
                 common: dict[str, Any], log: Callable[[str], None]) -> surface.SurfaceResult:
    span = tuple(settings.span)
    data = subject.data(split)
    model, loss_fn = subject.model, subject.loss_fn
    if other is not None:
        return surface.interpolate(model, other.model, loss_fn, data, steps=settings.steps, span=span, path=path,
                                   buffers=settings.interpolate_buffers, **common)
    if settings.directions != "random":
        given, info = _given_surface_directions(settings, subject, split, common, path)
        path_coords = [c for point in info.get("coordinates", []) for c in point]
        if distributed.is_main() and path_coords and not span[0] <= min(path_coords) <= max(path_coords) <= span[1]:
            log(f"note: the training path spans {min(path_coords):.3g} to {max(path_coords):.3g} along the PCA "
                f"directions, beyond --span {span[0]:g} {span[1]:g}; widen --span to draw all of it")
        if settings.dim == 1:
            return surface.slice_1d(model, loss_fn, data, given[0], steps=settings.steps, span=span, path=path,
                                    model_id=subject.identity, info={settings.directions: info}, **common)
        return surface.slice_2d(model, loss_fn, data, tuple(given), steps=(settings.steps, settings.steps),
                                span=(span, span), path=path, model_id=subject.identity,
                                info={settings.directions: info}, **common)
    if settings.dim == 1:
        return surface.slice_1d(model, loss_fn, data, steps=settings.steps, span=span, seed=settings.seed,
                                norm=settings.norm, ignore=settings.ignore, path=path, model_id=subject.identity,
                                **common)
    return surface.slice_2d(model, loss_fn, data, steps=(settings.steps, settings.steps), span=(span, span),
                            seed=settings.seed, norm=settings.norm, ignore=settings.ignore,
                            orthogonal=settings.orthogonal, path=path, model_id=subject.identity, **common)


def _given_surface_directions(settings: SurfaceSettings, subject: Subject, split: str, common: dict[str, Any],
                              path: Path) -> tuple[list, dict]:
    """Hessian or PCA directions and what to save about them, computed once per surface file.

    They are kept in ``PATH.directions.pt`` beside the grid: a resumed run reads them back instead of
    running Lanczos (or the PCA) again, whose last bits may differ on a GPU and would then not match the
    SHA-256 of the directions in the saved recipe.
    """
    dtype, device = common["dtype"], common["device"]
    store = path.with_suffix(".directions.pt")
    settings_key = {"directions": settings.directions, "dim": settings.dim, "seed": settings.seed,
                    "dtype": str(dtype).removeprefix("torch."), "checkpoint_sha256": subject.identity, "split": split}

    def saved_directions() -> dict[str, Any] | None:
        if not (store.exists() and path.with_suffix(".npz").exists()):
            return None
        saved = load_weights(store)
        return saved if isinstance(saved, dict) and saved.get("settings") == settings_key else None  # else: recompute

    saved = _decided_on_main(saved_directions)  # rank 0 decides: the other ranks may not see its files
    if saved is not None:
        return [{k: v.to(device, dtype) for k, v in d.items()} for d in saved["directions"]], saved["info"]
    given, info = _surface_directions(settings, subject, split, common)
    if distributed.is_main() and not path.with_suffix(".npz").exists():
        atomic_torch_save({"directions": [dict(d) for d in given], "info": info, "settings": settings_key}, store)
    distributed.barrier()
    return list(given), info


def _surface_directions(settings: SurfaceSettings, subject: Subject, split: str, common: dict[str, Any]
                        ) -> tuple[Any, dict]:
    """The directions for ``directions="hessian"`` or ``"pca"``, and what the JSON records about them."""
    from landscape import directions as dirs

    dtype, device = common["dtype"], common["device"]
    options = {k: common[k] for k in ("batch_size", "params", "stream", "memory_budget")}
    if settings.directions == "hessian":
        eig = hessian.top_eigenvalues(subject.model, subject.loss_fn, subject.data(split, shard=True), k=settings.dim,
                                      seed=settings.seed, dtype=dtype, device=device, progress=common["progress"],
                                      distributed=True, **options)
        return dirs.eigenvector_directions(eig.eigenvectors), {"eigenvalues": eig.eigenvalues.tolist()}
    if subject.snapshots is None:
        raise ValueError("--directions pca needs the weight snapshots of a training run (train --snapshot-every N); "
                         f"{subject.source} is not a run")
    snapshots = sorted(subject.snapshots.glob("epoch_*.pt"))
    if len(snapshots) < settings.dim + 1:
        raise ValueError(f"--directions pca needs at least {settings.dim + 1} weight snapshots in "
                         f"{subject.snapshots} (train with --snapshot-every N); found {len(snapshots)}")
    names = list(Objective(subject.model, subject.loss_fn, subject.data(split), dtype=dtype, device=device,
                           check=False, hvp_method="double_backward", **options).params)

    def load(path: Path) -> dict:  # memory-mapped on the CPU: pca_directions moves one block at a time
        state = load_weights(path, mmap=True)
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"{path} does not hold the model's parameters (missing {missing[:3]})")
        return {n: state[n] for n in names}

    final = {n: p.detach().to(device, dtype) for n, p in subject.model.named_parameters() if n in names}
    pca = dirs.pca_directions([load(p) for p in snapshots], final, n_components=settings.dim)
    trajectory = {"snapshots": [p.name for p in snapshots], "coordinates": pca.coordinates.tolist(),
                  "explained_variance_ratio": pca.explained_variance_ratio.tolist()}
    return pca.directions, trajectory


# ------------------------------------------------------------------------------------------- subjects


def as_subject(run: str | Path | Subject, device: torch.device) -> Subject:
    """``run`` itself if it is a :class:`~sam.subjects.Subject`, else the saved run at that path."""
    return run if isinstance(run, Subject) else run_subject(run, device=device)


def _output_directory(subject: Subject, out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if subject.home is None:
        raise ValueError(f"{subject.source} is not a run directory: say where the results go with --out DIR")
    return subject.home
