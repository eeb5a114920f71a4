"""Sharpness against generalization: train a family of models, measure each, rank-correlate with the gap.

The study of Jiang et al. 2020 ("Fantastic generalization measures", Sec. 6) and Andriushchenko et al.
2023 (Sec. 4) at a scale a laptop runs: models trained on the same data with different learning rates,
batch sizes, weight decays, optimizers (SGD, SAM, ASAM) and rhos; for each, the generalization gap

* ``loss_gap = test loss - train loss`` and ``error_gap = test error - train error``

(eval mode, whole splits) and every sharpness measure of :func:`landscape.sharpness.measure_all` on the
training set. The result is Kendall's tau (``scipy.stats.kendalltau``, tau-b) between each measure and
each gap, for the worst-case measures as a function of ``m`` (Andriushchenko & Flammarion 2022 found
that small ``m`` correlates best).

Everything is resumable: each model trains into ``OUT/runs/NAME`` (a finished run is not retrained) and
its measures are cached in ``OUT/runs/NAME/sharpness.json`` with their settings.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F

from landscape.sharpness import MeasureSettings, measure_all, measure_columns, sharpness_objective
from landscape.storage import (
    CorruptFileError,
    atomic_write_json,
    atomic_write_text,
    differing_keys,
    read_json,
    remove_stale_temporaries,
)

from .trainer import TrainConfig, load_run, resolve_device, train

__all__ = ["StudyConfig", "StudyResult", "study_grid", "run_study", "kendall_table", "format_kendall", "GAPS"]

GAPS = ("loss_gap", "error_gap")
_STUDY_OPTIMIZERS = ("sgd", "sam", "asam")


@dataclass
class StudyConfig:
    """The family of models and how each is measured.

    The grid is every combination of ``(optimizer, rho)`` (``rhos[name]`` for a SAM variant; SGD has
    none) with ``lrs``, ``batch_sizes`` and ``weight_decays``. ``n_models`` draws that many of them
    (seeded by ``seed``); ``None`` keeps the whole grid. Every model trains ``epochs`` epochs with seed
    ``seed`` on ``dataset``/``model`` (cosine schedule, SGD momentum 0.9 as the base optimizer).

    Models whose final training error exceeds ``max_train_error`` are measured and listed but left out
    of the correlations: as in Jiang et al. 2020 (Sec. 5, a stopping criterion on the training loss),
    only models that fit the training set are compared, otherwise the gap mostly measures underfitting.
    ``None`` keeps every model.
    """

    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sam", "asam"])
    rhos: dict[str, list[float]] = field(default_factory=lambda: {"sam": [0.05, 0.15], "asam": [0.5, 1.5]})
    lrs: list[float] = field(default_factory=lambda: [0.05, 0.2])
    batch_sizes: list[int] = field(default_factory=lambda: [32, 128])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 5e-4])
    epochs: int = 15
    n_models: int | None = 24
    max_train_error: float | None = 0.01
    seed: int = 0
    dataset: str = "digits"
    data_root: str | None = None
    model: str = "digits_cnn"
    device: str = "auto"
    measures: MeasureSettings = field(default_factory=lambda: MeasureSettings(pac_bayes_samples=4, pac_bayes_iterations=10))

    def __post_init__(self) -> None:
        if isinstance(self.measures, dict):
            self.measures = MeasureSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.measures.items()})
        for name in self.optimizers:
            if name not in _STUDY_OPTIMIZERS:
                raise ValueError(f"study optimizers are {_STUDY_OPTIMIZERS}; got {name!r}")
            if name != "sgd" and not self.rhos.get(name):
                raise ValueError(f"give the rho values of {name!r} in rhos (e.g. rhos={{'{name}': [0.05]}})")
        for name, values in (("optimizers", self.optimizers), ("lrs", self.lrs), ("batch_sizes", self.batch_sizes),
                             ("weight_decays", self.weight_decays)):
            if not values:
                raise ValueError(f"{name} must list at least one value")
        if self.n_models is not None and self.n_models < 3:
            raise ValueError(f"n_models must be >= 3 (Kendall tau needs several models) or None; got {self.n_models}")
        if self.max_train_error is not None and not 0 <= self.max_train_error <= 1:
            raise ValueError(f"max_train_error must be in [0, 1] or None; got {self.max_train_error}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1; got {self.epochs}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["measures"] = self.measures.to_dict()
        return values


@dataclass
class StudyResult:
    """Per-model rows (hyperparameters, gaps, measures, ``included``) and the Kendall tau table (over the
    included models)."""

    rows: list[dict[str, Any]]
    kendall: list[dict[str, Any]]
    out_dir: Path


def study_grid(config: StudyConfig) -> list[tuple[str, TrainConfig]]:
    """The ``(name, TrainConfig)`` of every model in the study, in a fixed order."""
    variants = [(name, rho) for name in config.optimizers for rho in ([None] if name == "sgd" else config.rhos[name])]
    grid = list(itertools.product(variants, config.lrs, config.batch_sizes, config.weight_decays))
    if config.n_models is not None and config.n_models < len(grid):
        picked = sorted(random.Random(config.seed).sample(range(len(grid)), config.n_models))
        grid = [grid[i] for i in picked]
    specs = []
    for (optimizer, rho), lr, batch_size, wd in grid:
        name = f"{optimizer}{'' if rho is None else f'-rho{rho:g}'}-lr{lr:g}-bs{batch_size}-wd{wd:g}"
        train_config = TrainConfig(dataset=config.dataset, data_root=config.data_root, model=config.model,
                                   optimizer=optimizer, rho=rho, lr=lr, batch_size=batch_size, weight_decay=wd,
                                   epochs=config.epochs, seed=config.seed, device=config.device)
        specs.append((name, train_config))
    return specs


def _measure_run(run_dir: Path, settings: MeasureSettings, device: str, progress: bool) -> dict[str, Any]:
    """Gaps and measures of one trained model, cached in ``run_dir/sharpness.json`` (reused when the
    settings and the checkpoint match)."""
    cache = run_dir / "sharpness.json"
    run = load_run(run_dir, device=resolve_device(device))
    if cache.exists():
        saved = read_json(cache)
        if isinstance(saved, dict) and saved.get("settings") == settings.to_dict() and saved.get("checkpoint_sha256") == run.checkpoint_sha256:
            return saved
    start = time.perf_counter()
    objective = sharpness_objective(run.model, F.cross_entropy, (run.train.x, run.train.y))
    train_loss, train_acc = objective.loss_and_accuracy()
    test = sharpness_objective(run.model, F.cross_entropy, (run.test.x, run.test.y))
    test_loss, test_acc = test.loss_and_accuracy()
    result = measure_all(objective, settings, progress=progress)
    result.pop("per_chunk")
    result.update(
        checkpoint_sha256=run.checkpoint_sha256,
        train_loss=train_loss, test_loss=test_loss, train_error=1 - train_acc, test_error=1 - test_acc,
        loss_gap=test_loss - train_loss, error_gap=(1 - test_acc) - (1 - train_acc),
        seconds=time.perf_counter() - start,
    )
    atomic_write_json(cache, result)
    return result


def kendall_table(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Kendall's tau-b between every measure column and each gap over the models in ``rows``.

    Each entry has ``measure``, ``m`` (``None`` for measures without chunks), and ``tau_{gap}`` /
    ``p_{gap}`` for every gap in :data:`GAPS` (``None`` when a column is constant).
    """
    from scipy.stats import kendalltau  # here: scipy.stats takes most of a second to load, for every command

    table = []
    for column in columns:
        measure, _, m = column.partition("@m=")
        entry: dict[str, Any] = {"measure": measure, "m": int(m) if m else None}
        values = np.asarray([row[column] for row in rows], dtype=np.float64)
        for gap in GAPS:
            gaps = np.asarray([row[gap] for row in rows], dtype=np.float64)
            tau, p = kendalltau(values, gaps)
            entry[f"tau_{gap}"], entry[f"p_{gap}"] = _finite_or_none(tau), _finite_or_none(p)
        table.append(entry)
    return table


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fieldnames = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in row.items()} for row in rows])
    atomic_write_text(path, buffer.getvalue())


def _check_study_config(config: StudyConfig, path: Path) -> None:
    if not path.exists():
        return
    # The filter on training error only changes which saved models are correlated: it may change on a rerun.
    stored = read_json(path)
    if not isinstance(stored, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(stored).__name__}, not the study's settings")
    saved = {k: v for k, v in stored.items() if k != "max_train_error"}
    current = {k: v for k, v in json.loads(json.dumps(config.to_dict())).items() if k != "max_train_error"}
    if saved != current:
        raise ValueError(f"{path} holds a study with different settings ({', '.join(differing_keys(saved, current))}); "
                         "use another --out or the same settings to resume it")


def run_study(
    config: StudyConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Train and measure every model of the study (resuming what is saved), then write the tables.

    Writes ``OUT/study_config.json``, ``OUT/study.csv`` (one row per model: hyperparameters, losses,
    errors, gaps, every measure), ``OUT/kendall.csv`` and ``OUT/study.json`` (all of it).

    Raises:
        ValueError: ``OUT`` holds a study with different settings.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # tables a killed study was writing (each run's directory: train() cleans it)
    config_path = out / "study_config.json"
    _check_study_config(config, config_path)
    atomic_write_json(config_path, config.to_dict())
    specs = study_grid(config)
    rows = []
    for i, (name, train_config) in enumerate(specs, 1):
        run_dir = out / "runs" / name
        start = time.perf_counter()
        train(train_config, run_dir, resume=True, progress=False)  # a finished run is left as it is
        trained = time.perf_counter() - start
        measured = _measure_run(run_dir, config.measures, config.device, progress)
        row = {"name": name, "optimizer": train_config.optimizer, "rho": train_config.rho, "lr": train_config.lr,
               "batch_size": train_config.batch_size, "weight_decay": train_config.weight_decay,
               **{k: measured[k] for k in ("train_loss", "test_loss", "train_error", "test_error", *GAPS)},
               "included": config.max_train_error is None or measured["train_error"] <= config.max_train_error,
               **measure_columns(measured)}
        rows.append(row)
        log(f"[{i}/{len(specs)}] {name}: train error {row['train_error']:.4f}, test error {row['test_error']:.4f}, "
            f"loss gap {row['loss_gap']:.4f}{'' if row['included'] else ' (not fitted: left out of tau)'} "
            f"(training {trained:.1f} s, measures {measured['seconds']:.1f} s when computed)")
    columns = list(measure_columns(measured))
    included = [row for row in rows if row["included"]]
    _write_csv(out / "study.csv", rows)  # written even when too few models fit, to show which did
    if len(included) < 3:
        raise ValueError(f"only {len(included)} of {len(rows)} models reached training error <= {config.max_train_error}; "
                         "train longer (--epochs) or raise --max-train-error")
    log(f"{len(included)} of {len(rows)} models fit the training set (error <= {config.max_train_error}); "
        "Kendall tau over those")
    table = kendall_table(included, columns)
    _write_csv(out / "kendall.csv", table)
    atomic_write_json(out / "study.json", {"config": config.to_dict(), "rows": rows, "kendall": table})
    return StudyResult(rows, table, out)


def format_kendall(table: list[dict[str, Any]]) -> str:
    """The tau table as aligned text: one line per measure, one column per ``m``, for each gap."""
    lines = []
    for gap in GAPS:
        ms = sorted({e["m"] for e in table if e["m"] is not None})
        lines.append(f"Kendall tau with {gap}:")
        lines.append(f"  {'measure':<16}" + "".join(f"{f'm={m}':>9}" for m in ms))
        for measure in dict.fromkeys(e["measure"] for e in table):
            entries = {e["m"]: e[f"tau_{gap}"] for e in table if e["measure"] == measure}
            if None in entries:
                lines.append(f"  {measure:<16}{_fmt(entries[None]):>9}")
            else:
                lines.append(f"  {measure:<16}" + "".join(f"{_fmt(entries.get(m, math.nan)):>9}" for m in ms))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"
