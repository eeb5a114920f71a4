"""SGD against SAM: run every analysis of two trained runs that is not yet saved, then draw the figures.

:func:`compare` is what ``sam-landscape compare RUN_A RUN_B --out DIR`` does:

1. analyses, each saved under ``DIR/analyses/`` and reused when finished with the same settings (so a
   rerun only draws; ``--overwrite`` computes them again):
   the Hessian spectrum with its density (``sam-landscape hessian``), a 2D surface and a 1D slice with
   the *same* seeded direction recipe for both runs (``sam-landscape surface``), m-sharpness against m
   (``sam-landscape sharpness``), and the interpolation from A to B on the train and test splits;
2. figures, as PNG and PDF (:mod:`landscape.plot.figures`): ``surface_3d``, ``surface_contours``,
   ``slices_1d``, ``interpolation``, ``hessian``, ``m_sharpness``, ``training_curves``, and
   ``kendall_vs_m`` / ``label_noise`` when a study / label-noise table is given;
3. ``DIR/report.html``: a self-contained report with a summary table and the interactive versions, and
   ``DIR/summary.json``: each side's test accuracy and ``lambda_max``, mean and spread over its seed runs.

:func:`demo` trains SGD and SAM with three seeds each on MNIST-1D (or digits) and runs :func:`compare`
into ``figures/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landscape import surface
from landscape._results import results_complete
from landscape.distributed import check_device_name
from landscape.sharpness import MeasureSettings
from landscape.storage import (
    CorruptFileError,
    atomic_write_json,
    differing_keys,
    read_json,
    read_jsonl,
    remove_stale_temporaries,
)

from .analyses import HessianSettings, Inputs, SurfaceSettings, hessian_analysis, sharpness_analysis, surface_analysis
from .figure_data import error_reduction_table, error_vs_rho_table, load_sweep, snapshot_epochs, spectrum_evolution
from .labels import directory_name, effective_rho, run_label, run_labels, spread
from .trainer import ConfigMismatch, TrainConfig, checkpoint_sha256, load_run_config, resolve_device, train

__all__ = ["CompareConfig", "CompareResult", "compare", "demo", "load_hessian", "load_metrics", "load_noise_table",
           "summary_rows", "run_label", "run_labels"]

FIGURES = ("surface_3d", "surface_contours", "slices_1d", "interpolation", "hessian", "m_sharpness", "training_curves")


# The command-line flag of each CompareConfig field, for errors that name what to change.
_FLAGS = {"surface_steps": "--surface-steps", "slice_steps": "--slice-steps",
          "interpolation_steps": "--interpolation-steps", "span": "--span", "hessian_k": "hessian_k",
          "trace_matvecs": "--trace-matvecs", "density_runs": "--density-runs", "density_steps": "--density-steps",
          "ms": "--m", "rho": "--rho", "seed": "--seed", "device": "--device", "zmax": "--zmax"}


@dataclass
class CompareConfig:
    """How much of each analysis :func:`compare` computes (defaults sized for a CPU run of the digits CNN).

    Checked when made, so that a bad value is refused before hours of analyses; the error names the
    command-line flag (``--surface-steps``) that sets the field.
    """

    surface_steps: int = 31
    slice_steps: int = 51
    interpolation_steps: int = 41
    span: float = 1.0
    hessian_k: int = 5
    trace_matvecs: int = 30
    density_runs: int = 4
    density_steps: int = 40
    ms: tuple[int, ...] = (1, 4, 16, 64, 256)
    rho: float = 0.05
    seed: int = 0
    device: str = "auto"
    zmax: float | None = None

    def __post_init__(self) -> None:
        minimum = {"surface_steps": 2, "slice_steps": 2, "interpolation_steps": 2, "hessian_k": 1,
                   "trace_matvecs": 3, "density_runs": 1, "density_steps": 1, "seed": 0}  # 3: Hutch++ needs a sketch
        for name, least in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{_FLAGS[name]} must be an integer >= {least}; got {value!r}")
        self.ms = tuple(self.ms)
        if not self.ms or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.ms):
            raise ValueError(f"--m takes one or more chunk sizes, integers >= 1; got {list(self.ms)}")
        for name in ("span", "rho") + (("zmax",) if self.zmax is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{_FLAGS[name]} must be a finite number > 0; got {value!r}")
        try:
            check_device_name(self.device)
        except ValueError as error:
            raise ValueError(f"--device: {error}") from None


@dataclass
class CompareResult:
    """Where everything went, and the summary table."""

    out_dir: Path
    figures: dict[str, list[Path]]
    report: Path
    summary: list[dict[str, Any]]


def _check_reusable(path: Path, expected: dict[str, Any]) -> None:
    """A saved analysis is reused only when it was made with these settings from this checkpoint."""
    saved = read_json(path)
    found = {key: _lookup(saved, key) for key in expected}
    differing = sorted(key for key in expected if found[key] != expected[key])
    if differing:
        raise ValueError(f"{path} was computed with other settings or another checkpoint ({', '.join(differing)}: "
                         f"saved {[found[k] for k in differing]}, asked {[expected[k] for k in differing]}); "
                         "pass --overwrite to compute it again, or choose another --out")


def _lookup(saved: dict[str, Any], dotted: str) -> Any:
    value: Any = saved
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def load_hessian(directory: str | Path) -> dict[str, Any]:
    """``hessian.json`` and ``hessian.npz`` of ``sam-landscape hessian`` as one dict (eigenvalues, density)."""
    directory = Path(directory)
    saved = read_json(directory / "hessian.json")
    try:
        with np.load(directory / "hessian.npz") as arrays:
            saved.update({k: arrays[k] for k in arrays.files})
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CorruptFileError(f"{directory / 'hessian.npz'} is truncated or not an .npz file ({error})") from None
    return saved


METRIC_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")  # what the summary and figures read


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every epoch's metrics of a run (``metrics.jsonl``), each with the numbers of :data:`METRIC_KEYS`.

    Raises:
        CorruptFileError: the file holds no epoch, or a line that is not an epoch's metrics (naming the
            line and the keys it lacks).
    """
    path = Path(run_dir) / "metrics.jsonl"
    records = read_jsonl(path)
    if not records:
        raise CorruptFileError(f"{path} holds no epoch's metrics (one JSON object per line with "
                               f"{', '.join(METRIC_KEYS)})")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise CorruptFileError(f"{path}: record {number} is a JSON {type(record).__name__}, not an epoch's metrics")
        missing = [k for k in METRIC_KEYS
                   if isinstance(record.get(k), bool) or not isinstance(record.get(k), (int, float))]
        if missing:
            raise CorruptFileError(f"{path}: record {number} has no number for {', '.join(missing)} (an epoch's "
                                   f"metrics hold {', '.join(METRIC_KEYS)})")
    return records


def load_noise_table(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a label-noise table: ``noise_study.json`` (its ``"table"``) in a directory, or that file.

    Each row has ``optimizer``, ``noise`` (the flipped fraction), ``mean`` (clean test accuracy) and
    optionally ``spread`` over seeds, as :func:`landscape.plot.figures.label_noise` takes them.
    """
    path = Path(path)
    file = path / "noise_study.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: give a noise-study directory or its noise_study.json")
    saved = read_json(file)
    rows = saved.get("table") if isinstance(saved, dict) else None
    missing = [k for k in ("optimizer", "noise", "mean") if not rows or any(k not in r for r in rows)]
    if missing:
        raise ValueError(f"{file} must hold a 'table' of rows with optimizer, noise and mean; missing {missing}")
    return rows


def summary_rows(labels: Sequence[str], hessians: Sequence[dict], sharpness: Sequence[dict],
                 metrics: Sequence[list[dict]]) -> list[dict[str, Any]]:
    """The report's summary: one row per quantity, one column per model."""
    rows = []

    def add(quantity: str, values: Sequence[Any]) -> None:
        rows.append({"quantity": quantity, **dict(zip(labels, values))})

    add("test accuracy", [m[-1]["test_acc"] for m in metrics])
    add("test loss", [m[-1]["test_loss"] for m in metrics])
    add("train loss", [m[-1]["train_loss"] for m in metrics])
    add("lambda_max", [h["lambda_max"] for h in hessians])
    add("lambda_max / lambda_5", [h.get("lambda_max_over_lambda_5") for h in hessians])
    add("Hessian trace", [h["trace"]["value"] if "trace" in h else None for h in hessians])
    curve = [s["measures"]["m_sharpness"] for s in sharpness]
    for i, m in enumerate(curve[0]["m"]):
        add(f"m-sharpness, m = {m} (rho {curve[0]['rho']:g})", [c["value"][i] for c in curve])
    return rows


def seed_summary(label: str, config: TrainConfig, runs: Sequence[Path], test_accuracies: Sequence[float],
                 lambda_maxes: Sequence[float]) -> dict[str, Any]:
    """One entry of ``summary.json``: a side of the comparison over its seeds.

    ``test_accuracy`` is the mean of the final test accuracies (fractions) and ``test_accuracy_spread``
    their sample standard deviation; the same for ``lambda_max``.
    """
    seeds = [load_run_config(run).seed for run in runs]
    return {"label": label, "optimizer": config.optimizer, "rho": effective_rho(config), "seeds": seeds,
            "test_accuracy": float(np.mean(test_accuracies)), "test_accuracy_spread": spread(test_accuracies),
            "lambda_max": float(np.mean(lambda_maxes)), "lambda_max_spread": spread(lambda_maxes),
            "test_accuracies": [float(a) for a in test_accuracies], "lambda_maxes": [float(v) for v in lambda_maxes],
            "dataset": config.dataset, "model": config.model, "epochs": config.epochs,
            "run_dirs": [str(run) for run in runs]}


def _check_seed_runs(runs: Sequence[Path], configs: Sequence[TrainConfig],
                     seeds: tuple[Sequence[str | Path], Sequence[str | Path]]) -> tuple[list[Path], list[Path]]:
    """The extra seed runs of each side, each checked: finished, the main run's settings but the seed, and no
    seed twice."""
    if len(seeds) != 2:
        raise ValueError(f"seeds holds the extra runs of each of the two sides: a pair of lists; got {len(seeds)}")
    checked: list[list[Path]] = []
    for main_run, main_config, side in zip(runs, configs, seeds):
        side = [Path(s) for s in side]
        used = {main_config.seed: main_run}
        for run in side:
            if not (run / "config.json").exists() or not (run / "model.pt").exists():
                raise FileNotFoundError(f"{run} is not a finished run (config.json and model.pt); a seed run of "
                                        f"{main_run} must be one")
            config = load_run_config(run)
            reached = load_metrics(run)[-1]["epoch"]
            if reached != config.epochs:
                raise ValueError(f"{run} stopped at epoch {reached} of {config.epochs}: a seed run must be finished "
                                 "(resume it with sam-landscape train --resume)")
            differ = [k for k in differing_keys(asdict(main_config), asdict(config)) if k not in ("seed", "device")]
            if differ:
                raise ValueError(f"{run} is not another seed of {main_run}: its {', '.join(differ)} differ")
            if config.seed in used:
                raise ValueError(f"{run} and {used[config.seed]} were both trained with seed {config.seed}")
            used[config.seed] = run
        checked.append(side)
    return checked[0], checked[1]


def _lambda_max_of(run: Path, directory: Path, settings: HessianSettings, inputs: Inputs, config: CompareConfig,
                   overwrite: bool, progress: bool, log: Callable[[str], None]) -> float:
    """The top Hessian eigenvalue of a seed run's training loss, by the main runs' Lanczos settings (the same
    ``k`` and tolerance; no trace or density), saved in ``directory`` and reused when there."""
    directory.mkdir(parents=True, exist_ok=True)
    if overwrite or not results_complete(directory, "hessian"):
        log(f"{run}: lambda_max")
        hessian_analysis(run, dataclasses.replace(settings, trace=False, density=False), inputs, directory,
                         resume=not overwrite, overwrite=overwrite, progress=progress)
    else:
        _check_reusable(directory / "hessian.json", {"checkpoint_sha256": checkpoint_sha256(run / "model.pt"),
                                                     "seed": config.seed})
    return float(load_hessian(directory)["lambda_max"])


def compare(
    run_a: str | Path,
    run_b: str | Path,
    out_dir: str | Path,
    config: CompareConfig = CompareConfig(),
    *,
    labels: tuple[str, str] | None = None,
    study_dir: str | Path | None = None,
    noise_study: str | Path | None = None,
    seeds: tuple[Sequence[str | Path], Sequence[str | Path]] = ((), ()),
    sweep_dir: str | Path | None = None,
    spectrum: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> CompareResult:
    """Analyse two runs with the same recipes, then write the figures, the HTML report and ``summary.json``.

    ``seeds``: more runs of each side, trained with the same settings but another seed (for example
    ``((sgd_seed1, sgd_seed2), (sam_seed1, sam_seed2))``). The figures show the two main runs; the summary
    averages over all of a side's runs: ``summary.json`` is ``{"runs": [entry, entry]}``, each entry with
    ``label``, ``optimizer``, ``rho``, ``seeds``, ``test_accuracy`` (the final test accuracy as a fraction,
    the mean over the seeds) and ``test_accuracy_spread`` (their sample standard deviation, 0 for one
    seed), ``lambda_max`` and ``lambda_max_spread`` (the top Hessian eigenvalue of the training loss of
    each seed's model), the per-seed values and the run directories (:func:`seed_summary`).

    ``sweep_dir``: a directory of ``sam-landscape sweep`` with SGD and SAM runs: adds the error reduction of
    SAM over SGD per setting (Foret et al. 2021, Fig. 1 left) and, for a sweep over rho, the test error
    against rho per m (Fig. 3 middle) (:mod:`sam.figure_data`). ``spectrum``: adds the Hessian spectrum of
    both runs at up to 4 epochs of their snapshots (``train --snapshot-every``; Fig. 3 left), with the
    Hessian settings of the comparison, saved under ``out_dir/analyses/spectrum``.

    ``labels`` name the runs in the figures and the report; by default each run's optimizer and rho
    (:func:`run_labels`). Analyses saved under ``out_dir/analyses`` are reused when they were made with
    the same settings from the same checkpoints; ``overwrite=True`` computes every one of them again.
    Everything else the figures need (the metrics, the study and label-noise tables, the settings) is
    read and checked first, before hours of analyses.

    Raises:
        FileNotFoundError: a run directory or its checkpoint is missing.
        ValueError: the two runs are the same run, or hold the same weights; the labels clash; a saved
            analysis was made with other settings (and ``overwrite`` is False); a file to read is corrupt.
    """
    out = Path(out_dir)
    runs = [Path(run_a), Path(run_b)]
    for run in runs:
        if not (run / "config.json").exists():
            raise FileNotFoundError(f"{run} is not a run directory (no config.json); train one with sam-landscape train")
    if runs[0].resolve() == runs[1].resolve():
        raise ValueError(f"compare needs two different runs; got {runs[0]} twice")
    configs = [load_run_config(run) for run in runs]
    labels = run_labels(runs, configs) if labels is None else tuple(labels)
    dirs = [out / "analyses" / directory_name(label) for label in labels]
    if labels[0].lower() == labels[1].lower() or dirs[0] == dirs[1]:
        raise ValueError(f"the two labels must differ (ignoring case: they name directories); got {labels}")
    # what is only read at the end is read and checked before hours of analyses
    plan = _plan(config)
    metrics = [load_metrics(run) for run in runs]
    _check_chunk_sizes(config, runs)
    table = _read_kendall(Path(study_dir)) if study_dir is not None else None
    noise_rows = load_noise_table(noise_study) if noise_study is not None else None
    sweep = load_sweep(sweep_dir) if sweep_dir is not None else None
    reductions = error_reduction_table(sweep_dir, loaded=sweep) if sweep is not None else None
    rho_lines = error_vs_rho_table(sweep_dir, loaded=sweep) if sweep is not None and "rho" in sweep[0] else None
    if spectrum:
        for run in runs:
            if len(snapshot_epochs(run)) < 2:
                raise ValueError(f"{run} holds the weights of fewer than 2 epochs, too few for the spectrum's evolution: "
                                 "train it with --snapshot-every N")
    for run in runs:
        if not (run / "model.pt").exists():
            raise FileNotFoundError(f"{run / 'model.pt'} not found: {run} holds no finished epoch yet")
    replicates = _check_seed_runs(runs, configs, seeds)
    checkpoints = {run: checkpoint_sha256(run / "model.pt") for run in runs}  # without loading model and data
    if checkpoints[runs[0]] == checkpoints[runs[1]]:
        raise ValueError(f"{runs[0]} and {runs[1]} hold the same weights (model.pt has the same SHA-256): "
                         "compare needs two different minima")
    if (out / "sweep.json").exists():
        raise ValueError(f"{out} holds a sweep (sweep.json), whose summary.json compare would replace: choose another --out")
    resolve_device(config.device)  # a device that is not there is named now, not after the first analysis
    remove_stale_temporaries(out)  # figures and report.html a killed compare was writing
    start = time.perf_counter()
    for run, label, directory in zip(runs, labels, dirs):
        directory.mkdir(parents=True, exist_ok=True)
        sha = checkpoints[run]
        if not overwrite and results_complete(directory, "hessian"):
            _check_reusable(directory / "hessian.json", {
                "checkpoint_sha256": sha, "seed": config.seed, "trace.n_matvecs": config.trace_matvecs,
                "density.n_runs": config.density_runs, "density.n_steps": config.density_steps})
        else:  # a lone .npz is a kill between the two files: the analysis resumes from its stages
            log(f"{label}: Hessian spectrum")
            hessian_analysis(run, plan.hessian, plan.inputs, directory, resume=not overwrite, overwrite=overwrite,
                             progress=progress)
        log(f"{label}: 2D surface and 1D slice")  # resumable: a finished grid is read back
        for settings in (plan.surface, plan.slice):
            surface_analysis(run, settings, plan.inputs, directory, overwrite=overwrite, progress=progress,
                             log=lambda line: None)
        if not overwrite and results_complete(directory, "sharpness"):
            _check_reusable(directory / "sharpness.json", {
                "checkpoint_sha256": sha, "settings.ms": list(config.ms), "settings.rho": config.rho,
                "settings.seed": config.seed})
        else:
            log(f"{label}: m-sharpness")
            sharpness_analysis(run, plan.measures, plan.inputs, directory, overwrite=overwrite, progress=progress)
    for split in ("train", "test"):
        log(f"interpolation {labels[0]} -> {labels[1]} ({split})")
        surface_analysis(runs[0], plan.interpolation, dataclasses.replace(plan.inputs, split=split),
                         out / "analyses" / f"interpolation-{split}", interpolate=runs[1], overwrite=overwrite,
                         progress=progress, log=lambda line: None)
    top_of_seeds = [[_lambda_max_of(run, directory / "seeds" / f"seed{load_run_config(run).seed}", plan.hessian,
                                    plan.inputs, config, overwrite, progress, log)
                     for run in side] for side, directory in zip(replicates, dirs)]
    spectra = spectrum_evolution(
        runs, out / "analyses" / "spectrum", settings=dataclasses.replace(plan.hessian, trace=False), inputs=plan.inputs,
        labels=labels, overwrite=overwrite, progress=progress, log=log) if spectrum else None
    log(f"analyses done in {time.perf_counter() - start:.1f} s")

    # imported here: matplotlib and plotly take a second to load, which every other command would pay
    from landscape.plot import figures, interactive
    from landscape.plot.report import Section, write_report

    surfaces = {label: surface.load(d / "surface_2d") for label, d in zip(labels, dirs)}
    slices = {label: surface.load(d / "surface_1d") for label, d in zip(labels, dirs)}
    path_train = surface.load(out / "analyses" / "interpolation-train" / "interpolation")
    path_test = surface.load(out / "analyses" / "interpolation-test" / "interpolation_test")
    hessians = [load_hessian(d) for d in dirs]
    sharpness = [read_json(d / "sharpness.json") for d in dirs]
    by_label = lambda values: dict(zip(labels, values))  # noqa: E731
    curves = by_label([s["measures"]["m_sharpness"] for s in sharpness])

    def draw(module: Any) -> dict[str, Any]:
        """Every figure from ``module``: :mod:`landscape.plot.figures` and :mod:`.interactive` share names."""
        drawn = {
            "surface_3d": module.surface_3d(surfaces, zmax=config.zmax),
            "surface_contours": module.surface_contours(surfaces, zmax=config.zmax),
            "slices_1d": module.slices_1d(slices),
            "interpolation": module.interpolation(path_train, path_test, labels=labels),
            "hessian": module.hessian_spectrum(by_label(hessians)),
            "m_sharpness": module.m_sharpness(curves),
            "training_curves": module.training_curves(by_label(metrics)),
        }
        if table is not None:
            drawn["kendall_vs_m"] = module.kendall_vs_m(table)
        if noise_rows is not None:
            drawn["label_noise"] = module.label_noise(noise_rows)
        if spectra is not None:
            drawn["spectrum_evolution"] = module.spectrum_evolution(spectra)
        if reductions is not None:
            drawn["error_reduction"] = module.error_reduction(reductions)
        if rho_lines is not None:
            drawn["error_vs_rho"] = module.error_vs_rho(rho_lines["lines"], rho_lines["baselines"])
        return drawn

    static, dynamic = draw(figures), draw(interactive)
    written = {name: figures.save_figure(fig, out / name) for name, fig in static.items()}

    a, b = labels
    sections = [
        Section("Loss surfaces", [dynamic["surface_3d"], dynamic["surface_contours"], dynamic["slices_1d"]],
                f"The same seeded filter-normalised directions (seed {config.seed}) around both minima, training loss; "
                "z = log(min(L, zmax) + 0.1) with a shared z-range (Foret et al. 2021, Fig. 1; Li et al. 2018)."),
        Section(f"Interpolation from {a} to {b}", [dynamic["interpolation"]],
                "Loss and accuracy along w_a + t (w_b - w_a), train (solid) and test (dashed); BatchNorm running "
                "statistics are interpolated along the same line, so t = 0 and t = 1 are exactly the two models."),
        Section("Hessian spectrum", [dynamic["hessian"]] + ([dynamic["spectrum_evolution"]] if spectra else []),
                "Top eigenvalues by Lanczos, lambda_max / lambda_5 (Jastrzebski et al. 2020) and the eigenvalue "
                "density by stochastic Lanczos quadrature (Foret et al. 2021, Fig. 3 left)"
                + ("; below, the same at several epochs of training, from the runs' snapshots." if spectra else ".")),
        Section("Sharpness", [dynamic["m_sharpness"]] + ([dynamic["kendall_vs_m"]] if "kendall_vs_m" in dynamic else []),
                f"m-sharpness (one SAM step of radius {config.rho:g} per chunk of m training examples) against m."),
        Section("Training", [dynamic["training_curves"]], "Loss and accuracy per epoch, train and test."),
    ]
    if reductions is not None:
        sections.append(Section(f"Across the settings of {sweep_dir}",
                                [dynamic["error_reduction"]] + ([dynamic["error_vs_rho"]] if rho_lines else []),
                                "Relative test-error reduction of SAM over SGD per setting, mean and standard deviation "
                                "of (e_SGD - e_SAM) / e_SGD over seeds (Foret et al. 2021, Fig. 1 left)"
                                + ("; test error against rho, one line per m (Fig. 3 middle)." if rho_lines else ".")))
    if "label_noise" in dynamic:
        sections.append(Section("Label noise", [dynamic["label_noise"]],
                                "Clean test accuracy after training on symmetrically noisy labels, mean and spread over seeds."))
    summary = summary_rows(labels, hessians, sharpness, metrics)
    entries = [seed_summary(label, cfg, [run, *side], [m[-1]["test_acc"]] + [load_metrics(r)[-1]["test_acc"] for r in side],
                            [float(h["lambda_max"]), *tops])
               for label, cfg, run, side, m, h, tops in zip(labels, configs, runs, replicates, metrics, hessians,
                                                            top_of_seeds)]
    atomic_write_json(out / "summary.json", {"runs": entries})
    if any(replicates):
        summary.append({"quantity": "test accuracy over seeds (mean +- std)",
                        **{e["label"]: f"{e['test_accuracy']:.4f} +- {e['test_accuracy_spread']:.4f} "
                                       f"({len(e['seeds'])} seeds)" for e in entries}})
        summary.append({"quantity": "lambda_max over seeds (mean +- std)",
                        **{e["label"]: f"{e['lambda_max']:.4g} +- {e['lambda_max_spread']:.2g}" for e in entries}})
    report = write_report(out / "report.html", f"{a} vs {b}: {runs[0].name} and {runs[1].name}",
                          ["quantity", *labels], summary, sections,
                          footer=f"sam-landscape compare; settings: {json.dumps(asdict(config))}")
    log(f"wrote {len(written)} figures (PNG and PDF) and {report}")
    return CompareResult(out, written, report, summary)


@dataclass(frozen=True)
class _Plan:
    """The settings of every analysis :func:`compare` runs, made (and so checked) before any of them."""

    inputs: Inputs
    hessian: HessianSettings
    surface: SurfaceSettings
    slice: SurfaceSettings
    interpolation: SurfaceSettings
    measures: MeasureSettings


def _plan(config: CompareConfig) -> _Plan:
    span = (-config.span, config.span)
    return _Plan(
        inputs=Inputs(device=config.device),
        hessian=HessianSettings(k=config.hessian_k, trace_matvecs=config.trace_matvecs, density=True,
                                density_runs=config.density_runs, density_steps=config.density_steps, seed=config.seed),
        surface=SurfaceSettings(dim=2, steps=config.surface_steps, span=span, seed=config.seed),
        slice=SurfaceSettings(dim=1, steps=config.slice_steps, span=span, seed=config.seed),
        interpolation=SurfaceSettings(steps=config.interpolation_steps, span=(-0.5, 1.5), seed=config.seed),
        measures=MeasureSettings(measures=("m_sharpness",), ms=tuple(config.ms), rho=config.rho, seed=config.seed),
    )


def _check_chunk_sizes(config: CompareConfig, runs: Sequence[Path]) -> None:
    """m-sharpness needs chunks no larger than the training split (``train_size`` in each run's config.json)."""
    for run in runs:
        derived = read_json(run / "config.json").get("derived")
        size = derived.get("train_size") if isinstance(derived, dict) else None
        if isinstance(size, int) and max(config.ms) > size:
            raise ValueError(f"--m {max(config.ms)} is more than the {size} training examples of {run}; "
                             f"choose chunk sizes up to {size}")


DEMO_RECIPES: dict[str, dict[str, Any]] = {
    # MNIST-1D's MLP: SAM's minimum is clearly flatter and generalises better (README, "What SAM does here")
    "mnist1d": {"dataset": "mnist1d", "model": "mnist1d_mlp", "epochs": 200, "batch_size": 100, "lr": 0.1,
                "sam_rho": 0.2, "snapshot_every": 50},
    # the 8x8 digits CNN: both reach about 99.5% test accuracy; the difference is within a seed's
    "digits": {"dataset": "digits", "model": "digits_cnn", "epochs": 30, "batch_size": 128, "lr": 0.1,
               "sam_rho": 0.05, "snapshot_every": 10},
}
"""The demo's training settings per dataset (SGD momentum 0.9, weight decay 5e-4, cosine: TrainConfig's); a
snapshot every quarter (third) of training for the spectrum's evolution."""


def demo(out_dir: str | Path = "figures", runs_dir: str | Path = "runs", *, dataset: str = "mnist1d", seeds: int = 3,
         epochs: int | None = None, sam_rho: float | None = None, device: str = "auto",
         config: CompareConfig = CompareConfig(), overwrite: bool = False, progress: bool = True,
         log: Callable[[str], None] = print) -> CompareResult:
    """Train SGD and SAM with ``seeds`` seeds each on a built-in dataset (a finished run is reused), then
    compare the seed-0 runs into ``out_dir``, with every seed in ``summary.json``.

    The default, MNIST-1D with the MLP of its paper (:data:`DEMO_RECIPES`), is a setting where the two
    minima clearly differ: over 3 seeds SAM's test accuracy is higher by more than the seed spread and its
    ``lambda_max`` several times lower (the numbers are in the README). The report shows the Hessian spectrum
    of the seed-0 runs at their snapshots too (``compare(spectrum=True)``).
    """
    if dataset not in DEMO_RECIPES:
        raise ValueError(f"the demo runs on {' or '.join(DEMO_RECIPES)}; got dataset {dataset!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1; got {seeds!r}")
    recipe = dict(DEMO_RECIPES[dataset])
    rho = recipe.pop("sam_rho") if sam_rho is None else sam_rho
    # run directories name what differs from the recipe, so that other settings never meet a finished run
    tags = {"sgd": "", "sam": f"-rho{rho:g}" if rho != DEMO_RECIPES[dataset]["sam_rho"] else ""}
    if epochs is not None and epochs != recipe["epochs"]:
        tags = {k: f"{v}-e{epochs}" for k, v in tags.items()}
        recipe["epochs"] = epochs
        recipe["snapshot_every"] = max(1, epochs // 4)
    sides: dict[str, list[Path]] = {"sgd": [], "sam": []}
    for seed in range(seeds):
        for optimizer in sides:
            run_dir = Path(runs_dir) / f"demo-{dataset}-{optimizer}{tags[optimizer]}-seed{seed}"
            settings = TrainConfig(**{k: v for k, v in recipe.items() if k != "sam_rho"}, optimizer=optimizer,
                                   rho=rho if optimizer == "sam" else None, seed=seed, device=device)
            start = time.perf_counter()
            try:
                result = train(settings, run_dir, resume=True, progress=progress)
            except ConfigMismatch as error:  # e.g. a run of an older recipe, before its snapshots
                raise ConfigMismatch(f"{error}: it was trained by another version of the demo's recipe; remove "
                                     f"it, or give the demo another runs directory (--runs)") from error
            log(f"{optimizer} seed {seed}: test accuracy {result.final['test_acc']:.4f} "
                f"({time.perf_counter() - start:.1f} s)")
            sides[optimizer].append(run_dir)
    result = compare(sides["sgd"][0], sides["sam"][0], out_dir, config, seeds=(sides["sgd"][1:], sides["sam"][1:]),
                     spectrum=recipe["epochs"] >= 2, overwrite=overwrite, progress=progress, log=log)
    for entry in read_json(Path(out_dir) / "summary.json")["runs"]:
        log(f"{entry['label']}: test accuracy {entry['test_accuracy']:.4f} +- {entry['test_accuracy_spread']:.4f}, "
            f"lambda_max {entry['lambda_max']:.3g} +- {entry['lambda_max_spread']:.2g} over {len(entry['seeds'])} seeds")
    return result


def _read_kendall(study_dir: Path) -> list[dict[str, Any]]:
    """The Kendall tau table of a study directory's ``study.json``."""
    path = study_dir / "study.json"
    saved = read_json(path)
    table = saved.get("kendall") if isinstance(saved, dict) else None
    if not isinstance(table, list) or any(not isinstance(row, dict) or "measure" not in row for row in table):
        raise CorruptFileError(f"{path} holds no 'kendall' table (rows with measure, m, tau_...): is it a study's?")
    return table
