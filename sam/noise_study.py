"""Robustness to label noise: train each optimizer at each noise rate, table and figure of clean test accuracy.

The experiment of Foret et al. 2021 (Sec. 3.3, "Robustness to label noise"): a fraction ``r`` of the
*training* labels is flipped to another class (:func:`sam.data.symmetric_label_noise`: exactly
``round(r N)`` labels, each moved to one of the ``C - 1`` other classes uniformly; seeded by the run's
seed), the test labels stay clean, and the result is the clean test accuracy after the last epoch. The
paper (ResNet-32, CIFAR-10, SAM with rho 0.1) reports SAM 95.1/93.4/90.5/77.9% against SGD
84.8/68.8/48.2/26.2% at 20/40/60/80% noise: SAM's advantage grows with the noise.

Every ``(optimizer, rate, seed)`` trains into ``OUT/runs/NAME`` as a normal trainer run (``sam-landscape
train`` could have made it); a finished run is read back, not retrained, and an interrupted one resumes
from its last finished epoch (``train(..., resume=True)``). For each optimizer and rate the table gives
the mean clean test accuracy over seeds and its spread (the sample standard deviation,

    spread = sqrt(sum_s (a_s - mean)^2 / (S - 1)),

``None`` for a single seed). Written into ``OUT``:

* ``noise_study_config.json``: the resolved study (a rerun with another recipe is an error naming the
  differing keys);
* ``noise_study.json``: ``{"config", "table", "runs"}``; the ``"table"`` rows ``{"optimizer", "noise",
  "mean", "spread", ...}`` are what ``sam-landscape compare --noise-study OUT`` reads
  (:func:`sam.compare.load_noise_table`);
* ``noise_study.csv`` (the table) and ``noise_runs.csv`` (one row per run);
* ``label_noise.png`` / ``.pdf`` (:func:`landscape.plot.figures.label_noise`) and ``label_noise.html``
  (:func:`landscape.plot.interactive.label_noise`, self-contained).

Example:
    >>> config = NoiseStudyConfig(rates=[0.0, 0.4], optimizers=["sgd", "sam"], seeds=[0, 1])
    >>> [name for name, _ in noise_study_runs(config)][:3]
    ['sgd-noise0-seed0', 'sgd-noise0-seed1', 'sgd-noise0.4-seed0']
    >>> dict(noise_study_runs(config))["sam-noise0.4-seed1"].rho
    0.1
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from landscape.storage import (
    CorruptFileError,
    atomic_write_json,
    atomic_write_text,
    differing_keys,
    load_weights,
    read_json,
    remove_stale_temporaries,
)

from .data import load_dataset
from .optim import BASE_OPTIMIZERS, available_optimizers
from .trainer import TrainConfig, final_metrics, load_run_config, train

__all__ = ["NoiseStudyConfig", "NoiseStudyResult", "default_recipe", "STUDY_FIELDS", "noise_study_runs",
           "noise_table", "run_noise_study", "format_noise_table"]

STUDY_FIELDS = ("optimizer", "rho", "label_noise", "seed")
"""The :class:`~sam.trainer.TrainConfig` fields the study sets per run; the recipe's own values are unused."""


def default_recipe() -> TrainConfig:
    """The digits recipe of the default study, chosen so that SGD fits much of the noise and SAM less of it.

    20 epochs of the digits CNN, batch 128, SGD momentum 0.9, peak lr 0.1 with a cosine schedule, weight
    decay 5e-4, no augmentation (the CIFAR recipe of Foret et al. 2021, Table 6, at digits size). Longer
    training lets SAM memorise the noisy labels too: at 30 epochs its advantage at 80% noise already
    shrinks, at 100 epochs both optimizers fit every noisy label and the advantage is gone. Measured with
    seeds 0, 1, 2 (README, "Reproducing the paper"): clean test accuracy SGD 94.8/88.6/76.6/38.2% and SAM
    97.9/95.5/90.4/53.5% at 20/40/60/80% noise.
    """
    return TrainConfig(dataset="digits", model="digits_cnn", epochs=20, batch_size=128, lr=0.1, momentum=0.9,
                       weight_decay=5e-4, schedule="cosine", augment=False)


@dataclass
class NoiseStudyConfig:
    """Which runs the study trains.

    Every run is ``recipe`` with ``optimizer`` from ``optimizers``, ``label_noise`` from ``rates`` and
    ``seed`` from ``seeds`` (the seed drives the initialisation, the batch order and which labels are
    flipped), and ``rho = rhos[optimizer]`` for a SAM variant (``None``: the variant's own default; the
    paper uses 0.1 for SAM under label noise). The recipe's own ``optimizer``, ``rho``, ``label_noise``
    and ``seed`` (:data:`STUDY_FIELDS`) are ignored and left out of the saved study
    (``NoiseStudyConfig(**json.load(f))`` rebuilds a saved ``noise_study_config.json``).

    Attributes:
        rates: Fractions of training labels flipped, each in ``[0, 1]``.
        optimizers: Registered optimizer names (:func:`sam.optim.available_optimizers`).
        seeds: Non-negative seeds; the table reports the mean and spread over them.
        rhos: rho per SAM variant (names of plain base optimizers are an error).
        recipe: Everything else of each run (dataset, model, epochs, lr, batch size, device, ...).
    """

    rates: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8])
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sam"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rhos: dict[str, float] = field(default_factory=lambda: {"sam": 0.1})
    recipe: TrainConfig = field(default_factory=default_recipe)

    def __post_init__(self) -> None:
        if isinstance(self.recipe, dict):
            self.recipe = TrainConfig.from_dict(self.recipe)
        self.recipe = dataclasses.replace(self.recipe, **{k: getattr(TrainConfig(), k) for k in STUDY_FIELDS})
        for name, values in (("rates", self.rates), ("optimizers", self.optimizers), ("seeds", self.seeds)):
            if not values:
                raise ValueError(f"{name} must list at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value; got {list(values)}")
        self.rates = [float(r) for r in self.rates]
        for rate in self.rates:
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"noise rates are fractions in [0, 1]; got {rate}")
        accepted = available_optimizers()
        for name in self.optimizers:
            if name not in accepted:
                raise ValueError(f"unknown optimizer {name!r} in optimizers; choose from {', '.join(accepted)}")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seeds are integers >= 0; got {seed!r}")
        sam_variants = [n for n in accepted if n not in BASE_OPTIMIZERS]
        for name, rho in self.rhos.items():
            if name not in sam_variants:
                raise ValueError(f"rhos are given per SAM variant ({', '.join(sam_variants)}); got {name!r}")
            if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
                raise ValueError(f"rho of {name!r} must be a finite number >= 0; got {rho!r}")
        self.rhos = {k: float(v) for k, v in self.rhos.items()}

    def to_dict(self) -> dict[str, Any]:
        """The study as plain JSON values; the recipe without the per-run :data:`STUDY_FIELDS`."""
        recipe = {k: v for k, v in dataclasses.asdict(self.recipe).items() if k not in STUDY_FIELDS}
        return {"rates": list(self.rates), "optimizers": list(self.optimizers), "seeds": list(self.seeds),
                "rhos": dict(self.rhos), "recipe": recipe}


@dataclass
class NoiseStudyResult:
    """The table (one row per optimizer and rate), the runs (one row per run) and where they were written."""

    table: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    out_dir: Path
    files: list[Path]


def _run_name(optimizer: str, rate: float, seed: int) -> str:
    return f"{optimizer}-noise{rate:g}-seed{seed}"


def noise_study_runs(config: NoiseStudyConfig) -> list[tuple[str, TrainConfig]]:
    """The ``(name, TrainConfig)`` of every run, ordered by optimizer, then rate, then seed.

    Names are ``{optimizer}-noise{rate:g}-seed{seed}``, the run directories under ``OUT/runs``.
    """
    specs = []
    for optimizer in config.optimizers:
        rho = config.rhos.get(optimizer) if optimizer not in BASE_OPTIMIZERS else None
        for rate in config.rates:
            for seed in config.seeds:
                run = dataclasses.replace(config.recipe, optimizer=optimizer, rho=rho, label_noise=rate, seed=seed)
                specs.append((_run_name(optimizer, rate, seed), run))
    return specs


def noise_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread of the clean test accuracy over seeds, per optimizer and noise rate.

    Args:
        runs: one dict per run with ``optimizer``, ``rho``, ``noise``, ``seed``, ``test_acc`` and
            ``train_acc``.

    Returns:
        One row per ``(optimizer, noise)`` in order of first appearance: ``optimizer``, ``rho``,
        ``noise``, ``mean`` (clean test accuracy in [0, 1]), ``spread`` (sample standard deviation over
        seeds, ``None`` with one seed), ``min``, ``max``, ``n_seeds``, ``seeds``, ``accuracies`` and
        ``train_acc`` (mean final training accuracy on the noisy labels: how much noise was fitted).

    Example:
        >>> runs = [{"optimizer": "sgd", "rho": None, "noise": 0.2, "seed": s, "test_acc": a, "train_acc": 1.0}
        ...         for s, a in ((0, 0.90), (1, 0.94))]
        >>> row = noise_table(runs)[0]
        >>> round(row["mean"], 6), round(row["spread"], 6), row["n_seeds"]
        (0.92, 0.028284, 2)
    """
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["optimizer"], run["noise"]), []).append(run)
    table = []
    for (optimizer, noise), members in groups.items():
        accuracies = [m["test_acc"] for m in members]
        table.append({
            "optimizer": optimizer, "rho": members[0]["rho"], "noise": noise,
            "mean": statistics.fmean(accuracies),
            "spread": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "min": min(accuracies), "max": max(accuracies), "n_seeds": len(members),
            "seeds": [m["seed"] for m in members], "accuracies": accuracies,
            "train_acc": statistics.fmean(m["train_acc"] for m in members),
        })
    return table


def format_noise_table(table: list[dict[str, Any]]) -> str:
    """Clean test accuracy (%) as text: one line per optimizer, one column per noise rate.

    Example:
        >>> rows = [{"optimizer": o, "noise": r, "mean": a, "spread": None}
        ...         for o, r, a in (("sgd", 0.0, 0.99), ("sgd", 0.8, 0.41), ("sam", 0.0, 0.99), ("sam", 0.8, 0.6))]
        >>> print(format_noise_table(rows))
        clean test accuracy (%)
          noise          0%     80%
          sgd          99.0    41.0
          sam          99.0    60.0
    """
    rates = sorted({row["noise"] for row in table})
    width = 13 if any(row.get("spread") is not None for row in table) else 8

    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "-"
        if row.get("spread") is None:
            return f"{100 * row['mean']:.1f}"
        return f"{100 * row['mean']:.1f} +- {100 * row['spread']:.1f}"

    lines = ["clean test accuracy (%)", "  " + f"{'noise':<8}" + "".join(f"{f'{100 * r:g}%':>{width}}" for r in rates)]
    for optimizer in dict.fromkeys(row["optimizer"] for row in table):
        cells = {row["noise"]: row for row in table if row["optimizer"] == optimizer}
        lines.append("  " + f"{optimizer:<8}" + "".join(f"{cell(cells.get(r)):>{width}}" for r in rates))
    return "\n".join(lines)


def _check_study_config(config: NoiseStudyConfig, path: Path) -> None:
    """An output directory holds one study: another recipe there is an error naming what differs."""
    if not path.exists():
        return
    saved = _flatten(_read_object(path))
    current = _flatten(json.loads(json.dumps(config.to_dict())))
    keys = differing_keys(saved, current)
    if keys:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, given {current.get(k)!r}" for k in keys)
        raise ValueError(f"{path} holds a noise study with different settings ({details}); "
                         "use another --out or the same settings to resume it")


def _read_object(path: Path) -> dict[str, Any]:
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(saved).__name__}, not the study's settings")
    return saved


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"recipe": {"epochs": 3}}`` -> ``{"recipe.epochs": 3}`` (lists and ``rhos`` entries stay whole values)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key == "recipe":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finished(run_dir: Path, config: TrainConfig) -> bool:
    """Whether ``run_dir`` holds this very run with every epoch done (``state.pt`` is the commit point)."""
    state_path = run_dir / "state.pt"
    if not state_path.exists() or not (run_dir / "config.json").exists():
        return False
    if load_run_config(run_dir) != config:
        return False  # train() names the difference
    state = load_weights(state_path, mmap=True)
    if not isinstance(state, dict) or "epoch" not in state:
        raise CorruptFileError(f"{state_path} is not a resume checkpoint of the trainer (no 'epoch')")
    return int(state["epoch"]) >= config.epochs


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows([{k: ("" if row.get(k) is None else row[k]) for k in columns} for row in rows])
    atomic_write_text(path, buffer.getvalue())


def _write_figures(out: Path, table: list[dict[str, Any]]) -> list[Path]:
    from landscape.plot import figures, interactive

    paths = figures.save_figure(figures.label_noise(table), out / "label_noise")
    html = interactive.label_noise(table).to_html(full_html=True, include_plotlyjs=True, config={"displaylogo": False})
    atomic_write_text(out / "label_noise.html", html)
    return [*paths, out / "label_noise.html"]


def run_noise_study(
    config: NoiseStudyConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> NoiseStudyResult:
    """Train every run of the study that is not finished, then write the table and the figure.

    Args:
        config: the study.
        out_dir: the study directory (runs in ``out_dir/runs``).
        progress: show each run's progress (a bar on a terminal, a line per epoch in a log).
        log: where the one-line report of each run goes.
        on_epoch_end: called as ``(run_name, epoch, metrics)`` after each epoch's checkpoint is written.

    Returns:
        The table, one row per run (``name``, ``optimizer``, ``rho``, ``noise``, ``seed``, ``flipped``:
        the fraction of training labels that differ from the clean ones, ``test_acc`` on clean labels,
        ``test_loss``, ``train_acc`` on the noisy labels, ``trained``: whether this call trained it), and
        the files written.

    Raises:
        ValueError: ``out_dir`` holds a study with different settings (the keys that differ are named), or
            a run directory holds a run with another config.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # tables and figures a killed study was writing
    config_path = out / "noise_study_config.json"
    _check_study_config(config, config_path)
    atomic_write_json(config_path, config.to_dict())
    specs = noise_study_runs(config)
    clean: torch.Tensor | None = None
    noisy_labels: dict[tuple[float, int], torch.Tensor] = {}
    runs = []
    for i, (name, run_config) in enumerate(specs, 1):
        run_dir = out / "runs" / name
        start = time.perf_counter()
        trained = not _finished(run_dir, run_config)
        if not trained:  # train() cleans the directories it trains in
            remove_stale_temporaries(run_dir)
        if trained:
            callback = None if on_epoch_end is None else (lambda epoch, metrics, name=name: on_epoch_end(name, epoch, metrics))
            train(run_config, run_dir, resume=True, progress=progress, on_epoch_end=callback)
        final = final_metrics(run_dir, run_config.epochs)
        key = (run_config.label_noise, run_config.seed)
        if key not in noisy_labels:  # the labels this run trained on, as train() loads them
            train_split, _, _ = load_dataset(run_config.dataset, root=run_config.data_root, label_noise=key[0],
                                             noise_seed=key[1], test_fraction=run_config.test_fraction,
                                             classes=run_config.classes)
            if clean is None:
                clean = load_dataset(run_config.dataset, root=run_config.data_root,
                                     test_fraction=run_config.test_fraction, classes=run_config.classes)[0].y
            noisy_labels[key] = train_split.y
        flipped = float((noisy_labels[key] != clean).double().mean())
        row = {"name": name, "optimizer": run_config.optimizer, "rho": run_config.rho, "noise": run_config.label_noise,
               "seed": run_config.seed, "flipped": flipped, "test_acc": final["test_acc"], "test_loss": final["test_loss"],
               "train_acc": final["train_acc"], "train_loss": final["train_loss"], "epochs": run_config.epochs,
               "trained": trained}
        runs.append(row)
        how = f"trained in {time.perf_counter() - start:.1f} s" if trained else "finished before: not retrained"
        log(f"[{i}/{len(specs)}] {name}: clean test accuracy {row['test_acc']:.4f}, train accuracy on noisy labels "
            f"{row['train_acc']:.4f} ({how})")
    table = noise_table(runs)
    _write_csv(out / "noise_study.csv", table,
               ["optimizer", "rho", "noise", "mean", "spread", "min", "max", "n_seeds", "train_acc"])
    _write_csv(out / "noise_runs.csv", runs, list(runs[0]))
    atomic_write_json(out / "noise_study.json", {"config": config.to_dict(), "table": table, "runs": runs})
    files = [out / "noise_study.json", out / "noise_study.csv", out / "noise_runs.csv", *_write_figures(out, table)]
    return NoiseStudyResult(table, runs, out, files)
