"""How runs are named in figures and tables: their optimizer, its effective rho and m, and spreads over seeds."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .optim import BASE_OPTIMIZERS, wrapper_arguments, wrapper_defaults
from .trainer import TrainConfig

__all__ = ["directory_name", "display_name", "effective_rho", "effective_m", "run_label", "run_labels", "spread"]

_DISPLAY_NAMES = {"msam": "m-SAM", "multistep_sam": "multi-step SAM", "every_k_sam": "every-k SAM"}


def directory_name(label: str) -> str:
    """A label as a folder name: ``"SAM rho=0.05"`` -> ``"sam-rho0.05"``."""
    return re.sub(r"[^a-z0-9.+_-]+", "-", label.lower().replace("=", "")).strip("-") or "run"


def display_name(optimizer: str) -> str:
    """``"sam"`` -> ``"SAM"``, ``"msam"`` -> ``"m-SAM"``."""
    return _DISPLAY_NAMES.get(optimizer, optimizer.upper())


def effective_rho(config: TrainConfig) -> float | None:
    """The perturbation radius a run trained with: its ``rho``, else its SAM variant's default; ``None`` for a
    base optimizer (SGD has no rho)."""
    if config.optimizer in BASE_OPTIMIZERS:
        return None
    return float(config.rho if config.rho is not None else wrapper_defaults(config.optimizer)["rho"])


def effective_m(config: TrainConfig) -> int | None:
    """How many examples share one perturbation: ``m`` for a variant that takes it (m-SAM), else the whole
    batch (SAM perturbs once per step; Foret et al. 2021, Sec. 4.1); ``None`` for a base optimizer."""
    if config.optimizer in BASE_OPTIMIZERS:
        return None
    return config.m if "m" in wrapper_arguments(config.optimizer) else config.batch_size


def run_label(config: TrainConfig) -> str:
    """A run's optimizer and, for a SAM variant, its rho: ``"SGD"``, ``"SAM rho=0.05"``, ``"m-SAM rho=0.05"``.

    Example:
        >>> run_label(TrainConfig(optimizer="asam"))
        'ASAM rho=0.5'
    """
    rho = effective_rho(config)
    return display_name(config.optimizer) if rho is None else f"{display_name(config.optimizer)} rho={rho:g}"


def run_labels(runs: Sequence[Path], configs: Sequence[TrainConfig]) -> tuple[str, str]:
    """Labels of two runs by optimizer and rho; the run directories' names are added where those agree."""
    labels = [run_label(c) for c in configs]
    if labels[0].lower() == labels[1].lower():
        names = [run.name for run in runs] if runs[0].name != runs[1].name else [str(run) for run in runs]
        labels = [f"{label} ({name})" for label, name in zip(labels, names)]
    return labels[0], labels[1]


def spread(values: Sequence[float]) -> float:
    """The sample standard deviation (``ddof=1``) over seeds; 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
