"""The data of the paper's sweep and training-dynamics figures, read from a sweep directory and from runs.

What :mod:`landscape.plot.figures` and :mod:`landscape.plot.interactive` draw (``sam-landscape plot``):

* :func:`error_reduction_table`: Foret et al. 2021, Fig. 1 left. For every SAM setting of a sweep, its
  relative test-error reduction over the base optimizer's run that matches it on every other grid key,
  seed by seed, ``r_s = (e_SGD,s - e_SAM,s) / e_SGD,s``, then the mean and the sample standard deviation
  of ``r_s`` over the seeds both sides share.
* :func:`error_vs_rho_table`: Fig. 3 middle. Test error against rho, one line per ``m`` (the examples
  that share one perturbation: m-SAM's ``m``, SAM's whole batch), mean and spread over seeds; the base
  optimizer's runs as horizontal baselines.
* :func:`spectrum_evolution`: Fig. 3 left. The Hessian's top eigenvalues and eigenvalue density (Lanczos
  and stochastic Lanczos quadrature of :func:`sam.analyses.hessian_analysis`) of the training loss at
  several epochs of each run, from the snapshots ``train --snapshot-every N`` saves.

A test error is ``1 - test_acc`` of the run's last epoch. Runs that the sweep repeats exactly (SGD at
every rho of a grid crossed with ``optimizer``) are counted once per seed.

Example:
    >>> rows = error_reduction_table("sweeps/mnist1d")  # doctest: +SKIP
    >>> [(r["setting"], round(100 * r["reduction"], 1)) for r in rows]  # doctest: +SKIP
    [('label_noise=0.0', 7.5), ('label_noise=0.2', 12.1)]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landscape.storage import CorruptFileError, read_json

from .analyses import HessianSettings, Inputs, hessian_analysis
from .labels import directory_name, display_name, effective_m, effective_rho, run_label, spread
from .optim import BASE_OPTIMIZERS
from .trainer import TrainConfig, final_metrics, load_run_config

__all__ = [
    "SPECTRUM",
    "SweepRun",
    "error_reduction_table",
    "error_vs_rho_table",
    "load_sweep",
    "snapshot_epochs",
    "spectrum_evolution",
]

SPECTRUM = HessianSettings(k=5, trace=False, density=True, density_runs=4, density_steps=60)
"""What :func:`spectrum_evolution` computes per epoch: the top 5 eigenvalues and the density (4 SLQ runs of 60 steps)."""

_NOT_A_SETTING = ("seed",)  # grid keys that repeat a setting rather than make a new one


@dataclass(frozen=True)
class SweepRun:
    """One finished run of a sweep: its name, full config, grid values and final test error."""

    name: str
    config: TrainConfig
    values: dict[str, Any]
    test_error: float

    @property
    def is_baseline(self) -> bool:
        """Trained by a base optimizer alone (SGD, Adam, ...), not a SAM variant."""
        return self.config.optimizer in BASE_OPTIMIZERS


def load_sweep(sweep_dir: str | Path) -> tuple[list[str], list[SweepRun]]:
    """The grid keys and the finished runs of the sweep in ``sweep_dir`` (from its ``summary.json``).

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no ``summary.json`` (no sweep, or one that never finished a run).
        CorruptFileError: the summary is not a sweep's, or a row names a run without a config or last epoch.
    """
    out = Path(sweep_dir)
    path = out / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {out} is not a sweep directory (sam-landscape sweep --out {out} ...)")
    saved = read_json(path)
    recipe = saved.get("recipe") if isinstance(saved, dict) else None
    rows = saved.get("rows") if isinstance(saved, dict) else None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("grid"), list) or not isinstance(rows, list):
        raise CorruptFileError(f"{path} holds no sweep summary ({{'recipe': {{'grid': ...}}, 'rows': [...]}})")
    keys = [entry[0] for entry in recipe["grid"] if isinstance(entry, list) and entry and isinstance(entry[0], str)]
    runs = []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("run"), str):
            raise CorruptFileError(f"{path}: a row names no run ({str(row)[:80]})")
        run_dir = out / "runs" / row["run"]
        config = load_run_config(run_dir)
        final = final_metrics(run_dir, config.epochs)
        runs.append(SweepRun(row["run"], config, {k: getattr(config, k) for k in keys}, 1.0 - float(final["test_acc"])))
    if not runs:
        raise ValueError(f"{path} lists no finished run: rerun the sweep to train them")
    return keys, runs


def _format(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:g}"
    return f"{key}={value}"


def _setting_label(values: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(_format(k, values[k]) for k in keys) or "all runs"


def _one_per_seed(runs: Sequence[SweepRun]) -> dict[int, SweepRun]:
    """The runs by seed; the first of runs with the same seed (a sweep repeats SGD at every rho)."""
    by_seed: dict[int, SweepRun] = {}
    for run in runs:
        by_seed.setdefault(run.config.seed, run)
    return by_seed


def _sam_optimizers(runs: Sequence[SweepRun]) -> list[str]:
    return list(dict.fromkeys(r.config.optimizer for r in runs if not r.is_baseline))


def error_reduction_table(sweep_dir: str | Path, *, loaded: tuple[list[str], list[SweepRun]] | None = None
                          ) -> list[dict[str, Any]]:
    """SAM's relative test-error reduction over SGD for every setting of a sweep (Foret et al. 2021, Fig. 1 left).

    A setting is a SAM variant's runs with the same values of every grid key but ``seed``. Its baseline
    is the runs of its base optimizer (``base_optimizer``, SGD by default) with the same values of every
    grid key but ``optimizer`` and ``seed``. With ``e`` the test error of a seed's last epoch, the seed's
    reduction is ``r_s = (e_base - e_SAM) / e_base`` (NaN where the baseline makes no error), and the
    row holds their mean and sample standard deviation over the seeds both sides ran.

    ``loaded``: what :func:`load_sweep` returned for ``sweep_dir``, when the caller has read it already.

    Returns:
        Rows sorted by ``reduction``, each with ``setting`` (its grid values but the seed), ``optimizer``,
        ``baseline``, ``seeds``, ``reduction``, ``reduction_spread``, ``reductions`` (per seed),
        ``error``, ``error_spread``, ``baseline_error``, ``baseline_error_spread`` (fractions), ``runs``
        and ``baseline_runs`` (names under ``sweep_dir/runs``).

    Raises:
        ValueError: the sweep holds no SAM run, or no SAM setting has a baseline run with a seed in common
            (the message says which grid to add).
    """
    keys, runs = load_sweep(sweep_dir) if loaded is None else loaded
    varying = [k for k in keys if k not in _NOT_A_SETTING]
    shown = [k for k in varying if k != "optimizer" or len(_sam_optimizers(runs)) > 1]
    matched_on = [k for k in varying if k != "optimizer"]
    settings: dict[tuple, list[SweepRun]] = {}
    for run in runs:
        if not run.is_baseline:
            settings.setdefault(tuple(run.values[k] for k in varying), []).append(run)
    if not settings:
        raise ValueError(f"{sweep_dir} holds no SAM run: sweep --grid optimizer=sgd,sam (or another SAM variant)")
    table = []
    for members in settings.values():
        first = members[0]
        baseline = [r for r in runs if r.is_baseline and r.config.optimizer == first.config.base_optimizer
                    and all(r.values[k] == first.values[k] for k in matched_on)]
        sam_by_seed, base_by_seed = _one_per_seed(members), _one_per_seed(baseline)
        seeds = sorted(set(sam_by_seed) & set(base_by_seed))
        if not seeds:
            continue
        errors = [sam_by_seed[s].test_error for s in seeds]
        base_errors = [base_by_seed[s].test_error for s in seeds]
        reductions = [(b - e) / b if b > 0 else float("nan") for e, b in zip(errors, base_errors)]
        table.append({
            "setting": _setting_label(first.values, shown), "optimizer": first.config.optimizer,
            "baseline": first.config.base_optimizer, "seeds": seeds,
            "reduction": float(np.mean(reductions)), "reduction_spread": spread(reductions),
            "reductions": reductions, "error": float(np.mean(errors)), "error_spread": spread(errors),
            "baseline_error": float(np.mean(base_errors)), "baseline_error_spread": spread(base_errors),
            "runs": [sam_by_seed[s].name for s in seeds], "baseline_runs": [base_by_seed[s].name for s in seeds],
            **{k: first.values[k] for k in varying},
        })
    if not table:
        raise ValueError(f"{sweep_dir}: no SAM setting has a run of its base optimizer with the same other grid values "
                         "and a seed in common; sweep --grid optimizer=sgd,sam so that every point has both")
    return sorted(table, key=lambda row: (np.nan_to_num(row["reduction"], nan=np.inf), row["setting"]))


def error_vs_rho_table(sweep_dir: str | Path, *, loaded: tuple[list[str], list[SweepRun]] | None = None
                       ) -> dict[str, list[dict[str, Any]]]:
    """Test error against rho, one line per m (and per value of the other grid keys), from a sweep over rho
    (Foret et al. 2021, Fig. 3 middle).

    ``m`` is :func:`sam.labels.effective_m`: m-SAM's ``m``, else the batch size (SAM perturbs once per
    batch). Each point is the mean test error over the seeds of one rho, with its sample standard
    deviation; the base optimizer's runs (rho does not apply) are baselines, one per value of the other
    grid keys, each seed counted once.

    ``loaded``: what :func:`load_sweep` returned for ``sweep_dir``, when the caller has read it already.

    Returns:
        ``{"lines": [{"label", "m", "optimizer", "rho", "error", "spread", "seeds", "settings"}, ...],
        "baselines": [{"label", "optimizer", "error", "spread", "seeds", "settings"}, ...]}`` with ``rho``,
        ``error``, ``spread`` and ``seeds`` lists sorted by rho.

    Raises:
        ValueError: the sweep's grid has no ``rho``, or no SAM run.
    """
    keys, runs = load_sweep(sweep_dir) if loaded is None else loaded
    if "rho" not in keys:
        raise ValueError(f"{sweep_dir} is not a sweep over rho: its grid keys are {keys}; sweep --grid rho=0.02,0.05,0.1,...")
    others = [k for k in keys if k not in (*_NOT_A_SETTING, "rho", "m", "optimizer")]
    several = len(_sam_optimizers(runs)) > 1
    lines: dict[tuple, list[SweepRun]] = {}
    for run in runs:
        if not run.is_baseline:
            key = (run.config.optimizer, effective_m(run.config), *(run.values[k] for k in others))
            lines.setdefault(key, []).append(run)
    if not lines:
        raise ValueError(f"{sweep_dir} holds no SAM run: sweep --grid optimizer=sgd,sam --grid rho=...")
    drawn = []
    for (optimizer, m, *values), members in lines.items():
        settings = dict(zip(others, values))
        by_rho: dict[float, list[SweepRun]] = {}
        for run in members:
            by_rho.setdefault(effective_rho(run.config), []).append(run)
        points = [(rho, _one_per_seed(group)) for rho, group in sorted(by_rho.items())]
        label = ", ".join([*([display_name(optimizer)] if several else []), f"m={m}",
                           *(_format(k, v) for k, v in settings.items())])
        drawn.append({"label": label, "m": m, "optimizer": optimizer, "settings": settings,
                      "rho": [rho for rho, _ in points],
                      "error": [float(np.mean([r.test_error for r in seeds.values()])) for _, seeds in points],
                      "spread": [spread([r.test_error for r in seeds.values()]) for _, seeds in points],
                      "seeds": [sorted(seeds) for _, seeds in points]})
    baselines = []
    groups: dict[tuple, list[SweepRun]] = {}
    for run in runs:
        if run.is_baseline:
            groups.setdefault((run.config.optimizer, *(run.values[k] for k in others)), []).append(run)
    for (optimizer, *values), members in groups.items():
        seeds = _one_per_seed(members)
        settings = dict(zip(others, values))
        errors = [r.test_error for r in seeds.values()]
        baselines.append({"label": ", ".join([display_name(optimizer), *(_format(k, v) for k, v in settings.items())]),
                          "optimizer": optimizer, "settings": settings, "error": float(np.mean(errors)),
                          "spread": spread(errors), "seeds": sorted(seeds)})
    return {"lines": drawn, "baselines": baselines}


# ------------------------------------------------------------------------------------ spectrum evolution


def snapshot_epochs(run_dir: str | Path) -> dict[int, Path]:
    """The epochs whose weights a run holds: its snapshots (``snapshots/epoch_XXXX.pt``) and, for a finished
    run, ``model.pt`` at its last epoch, ``{epoch: path}`` in order."""
    run = Path(run_dir)
    found = {}
    for path in sorted((run / "snapshots").glob("epoch_*.pt")):
        match = re.fullmatch(r"epoch_(\d+)\.pt", path.name)
        if match:
            found[int(match.group(1))] = path
    config = load_run_config(run)
    try:
        final_metrics(run, config.epochs)
    except (CorruptFileError, FileNotFoundError):
        return found
    if (run / "model.pt").exists():
        found.setdefault(config.epochs, run / "model.pt")
    return dict(sorted(found.items()))


def _choose_epochs(available: Sequence[int], epochs: Sequence[int] | None, count: int, run: Path) -> list[int]:
    if epochs is not None:
        missing = [e for e in epochs if e not in available]
        if missing:
            raise ValueError(f"{run} holds no weights of epoch(s) {missing}; it has epochs {list(available)} "
                             "(train --snapshot-every N saves every N-th)")
        return sorted(set(epochs))
    index = np.unique(np.round(np.linspace(0, len(available) - 1, min(count, len(available)))).astype(int))
    return [available[i] for i in index]


def spectrum_evolution(
    runs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    epochs: Sequence[int] | None = None,
    count: int = 4,
    settings: HessianSettings = SPECTRUM,
    inputs: Inputs = Inputs(),
    labels: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """The Hessian spectrum of each run's training loss at several epochs (Foret et al. 2021, Fig. 3 left).

    Each epoch's analysis is :func:`sam.analyses.hessian_analysis` of that epoch's weights, saved in
    ``out_dir/LABEL/epoch_XXXX`` (``LABEL`` in lower case, ``sam-rho0.05``) and reused when made with the same settings from the same
    weights (``overwrite=True`` computes it again; an interrupted one resumes).

    Args:
        runs: run directories of ``sam-landscape train`` with ``--snapshot-every``.
        out_dir: where the analyses go (``sam-landscape plot`` passes ``OUT/analyses``).
        epochs: the epochs to analyse (each must be a snapshot or the last epoch); default: ``count``
            epochs spread evenly over those the run holds, first and last included.
        count: how many epochs by default.
        settings: what each analysis computes (default :data:`SPECTRUM`; ``density=False`` gives the top
            eigenvalues alone).
        inputs: split, batch size, dtype, device.
        labels: the runs' names in the figure (default: optimizer and rho, :func:`sam.labels.run_label`, with the
            directory's name where two runs share them).
        overwrite: compute every analysis again.
        progress: show progress.
        log: one line per analysis.

    Returns:
        ``{label: [{"epoch", "eigenvalues", "density_grid", "density", "lambda_max", "checkpoint"}, ...]}``
        (no density entries without ``settings.density``).

    Raises:
        ValueError: a run holds fewer than one epoch's weights, an asked epoch is missing (the message lists
            those there are), or labels clash.
    """
    paths = [Path(run) for run in runs]
    if not paths:
        raise ValueError("spectrum-evolution needs at least one run directory")
    configs = [load_run_config(run) for run in paths]
    labels = [_unique_label(p, c, configs) for p, c in zip(paths, configs)] if labels is None else list(labels)
    if len(labels) != len(paths) or len({directory_name(label) for label in labels}) != len(labels):
        raise ValueError(f"give one distinct label per run (they name directories); got {labels} for {len(paths)} runs")
    chosen = []
    for run in paths:  # every run checked before the first analysis
        available = snapshot_epochs(run)
        if not available:
            raise ValueError(f"{run} holds no weights yet: train it (with --snapshot-every N for several epochs)")
        picked = _choose_epochs(list(available), epochs, count, run)
        chosen.append([(epoch, available[epoch]) for epoch in picked])
    spectra: dict[str, list[dict[str, Any]]] = {}
    for label, picked in zip(labels, chosen):
        entries = []
        for epoch, checkpoint in picked:
            log(f"{label}: Hessian spectrum at epoch {epoch}")
            saved = hessian_analysis(checkpoint, settings, dataclasses.replace(inputs, split="train"),
                                     Path(out_dir) / directory_name(label) / f"epoch_{epoch:04d}",
                                     resume=not overwrite, overwrite=overwrite, progress=progress)
            entry = {"epoch": epoch, "checkpoint": str(checkpoint), "lambda_max": float(saved.scalars["lambda_max"]),
                     "eigenvalues": np.asarray(saved.arrays["eigenvalues"], dtype=np.float64)}
            if settings.density:
                entry.update(density_grid=np.asarray(saved.arrays["density_grid"], dtype=np.float64),
                             density=np.asarray(saved.arrays["density"], dtype=np.float64))
            entries.append(entry)
        spectra[label] = entries
    return spectra


def _unique_label(run: Path, config: TrainConfig, configs: Sequence[TrainConfig]) -> str:
    """The run's optimizer and rho, with its directory name where another run would get the same label."""
    mine = run_label(config)
    if sum(run_label(c) == mine for c in configs) > 1:
        return f"{mine} ({run.name})"
    return mine
