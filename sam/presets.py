"""The paper's experiments as named training recipes: ``sam-landscape train --preset NAME``.

A preset is plain data: what it reproduces, where the paper reports it, the paper's numbers, and the
:class:`sam.trainer.TrainConfig` values that define the run. Every value a preset sets is written out
in full (none is left to a ``TrainConfig`` default), so a preset stays the paper's recipe even if the
library defaults change. :func:`preset_config` resolves a preset into a ``TrainConfig``; keyword
arguments (on the command line: explicit flags) override any of its values, and the resolved config is
what ``train`` saves in ``config.json``.

The recipes (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021):

* CIFAR-10/100 with WRN-28-10 (Table 1, hyperparameters of Table 6): 200 epochs, batch 128, SGD with
  momentum 0.9, peak lr 0.1 with a cosine schedule, weight decay 5e-4, basic augmentation (pad 4,
  random crop, flip); SAM with rho 0.05 on CIFAR-10 and 0.1 on CIFAR-100. Test error: SAM 2.7% vs SGD
  3.5% (CIFAR-10), 16.5% vs 18.8% (CIFAR-100).
* Robustness to label noise (Sec. 3.3): ResNet-32 on CIFAR-10 with a fraction 0.2/0.4/0.6/0.8 of the
  training labels flipped, SAM with rho 0.1, the CIFAR recipe otherwise. Clean test accuracy: SAM
  95.1/93.4/90.5/77.9 vs SGD 84.8/68.8/48.2/26.2.
* The Hessian spectrum at the minimum (Fig. 3 left): WRN-40-10 without BatchNorm on CIFAR-10, 300
  epochs. lambda_max 24.2 (SGD) vs 1.0 (SAM), lambda_max / lambda_5 11.4 vs 2.6.
* Finetuning (Sec. 3.2, Table 3): ImageNet-pretrained EfficientNets finetuned on CIFAR-10/100 with a
  new last layer; the paper's EfficientNet-b7 (600 px) errors: SAM 0.88% vs SGD 0.95% (CIFAR-10), 7.44%
  vs 7.68% (CIFAR-100). The presets finetune the B0 of the same TensorFlow AutoAugment checkpoints
  (timm's ``tf_efficientnet_b0.aa_in1k``, read from the local timm cache, see :mod:`sam.finetune`) at
  224 px, which one GPU trains in an hour or two (estimated), with the recipe of the paper's Appendix C as read here:
  SGD momentum 0.9, cosine lr, weight decay 1e-5, lr 0.016 at batch 1024 for 5k steps, here batch 256,
  lr 0.004 (scaled linearly, as the paper halves it for its batch of 512) and the same number of
  examples (102 epochs). Not reproduced: the B7 at 600 px, AutoAugment (basic augmentation here) and
  frozen BatchNorm statistics. rho (0.05 on CIFAR-10, 0.1 on CIFAR-100, as in Table 6) is assumed.
* The digits CNN: the same comparison at a size a CPU trains in seconds (no paper number).

CIFAR presets read the data from a directory that only the user knows: pass ``data_root`` (on the
command line ``--data-root DIR``) or ``download=True``.

Example:
    >>> config = preset_config("c10-wrn28-10-sam", data_root="~/data", epochs=10)
    >>> config.model, config.rho, config.batch_size, config.epochs
    ('wrn28_10', 0.05, 128, 10)
    >>> dict(PRESETS["c10-wrn28-10-sam"].paper)
    {'test_error_pct': 2.7}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .data import BUILT_IN_DATASETS
from .trainer import DEFAULT_MODELS, TrainConfig

__all__ = ["Preset", "PRESETS", "preset_config", "preset_names", "format_paper", "format_presets"]

_PAPER = "Foret et al. 2021"


@dataclass(frozen=True)
class Preset:
    """One of the paper's training runs, as data.

    Attributes:
        description: What the run is (model, dataset, optimizer, the settings that matter).
        reference: Where the paper reports it (table, section or figure).
        paper: The paper's numbers for this run, e.g. ``{"test_error_pct": 2.7}``; empty when the paper
            has none (the digits stand-ins). The finetuning presets give the paper's EfficientNet-b7
            numbers (``effnet_b7_test_error_pct``) for the B0 they train.
        config: The :class:`~sam.trainer.TrainConfig` values of the run (every one the paper fixes).
    """

    description: str
    reference: str
    paper: Mapping[str, float]
    config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.config) - names)
        if unknown:
            raise ValueError(f"preset config keys {unknown} are not TrainConfig fields; accepted: {sorted(names)}")
        object.__setattr__(self, "paper", MappingProxyType(dict(self.paper)))
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))


# Foret et al. 2021, Table 6: the CIFAR recipe shared by every CIFAR preset.
_CIFAR_RECIPE: dict[str, Any] = {
    "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "schedule": "cosine",
    "warmup_epochs": 0.0, "label_smoothing": 0.0, "augment": True, "base_optimizer": "sgd", "batchnorm": True,
    "skip": True, "label_noise": 0.0, "max_grad_norm": None, "p": 2.0,
}
_SGD_PAPER_NOISE = {0.2: 84.8, 0.4: 68.8, 0.6: 48.2, 0.8: 26.2}
_SAM_PAPER_NOISE = {0.2: 95.1, 0.4: 93.4, 0.6: 90.5, 0.8: 77.9}


def _wrn28_10(dataset: str, label: str, optimizer: str, rho: float | None, error: float) -> Preset:
    what = "SGD" if optimizer == "sgd" else f"SAM (rho {rho:g})"
    return Preset(
        description=f"WRN-28-10 on {label}, {what}, 200 epochs, batch 128, lr 0.1 cosine, wd 5e-4, basic augmentation",
        reference=f"{_PAPER}, Table 1 (recipe: Table 6)",
        paper={"test_error_pct": error},
        config={**_CIFAR_RECIPE, "dataset": dataset, "model": "wrn28_10", "epochs": 200, "optimizer": optimizer, "rho": rho},
    )


def _noise(rate: float, optimizer: str) -> Preset:
    what = "SGD" if optimizer == "sgd" else "SAM (rho 0.1)"
    accuracy = (_SGD_PAPER_NOISE if optimizer == "sgd" else _SAM_PAPER_NOISE)[rate]
    return Preset(
        description=f"ResNet-32 on CIFAR-10 with {rate:.0%} of the training labels flipped (symmetric), {what}, "
        "200 epochs, the CIFAR recipe of Table 6",
        reference=f"{_PAPER}, Sec. 3.3 (robustness to label noise)",
        paper={"clean_test_accuracy_pct": accuracy},
        config={**_CIFAR_RECIPE, "dataset": "cifar10", "model": "resnet32", "epochs": 200, "label_noise": rate,
                "optimizer": optimizer, "rho": 0.1 if optimizer == "sam" else None},
    )


def _hessian(optimizer: str, lambda_max: float, ratio: float) -> Preset:
    what = "SGD" if optimizer == "sgd" else "SAM (rho 0.05)"
    return Preset(
        description=f"WRN-40-10 without BatchNorm on CIFAR-10, {what}, 300 epochs: the minimum whose Hessian "
        "spectrum the paper measures (then: sam-landscape hessian RUN --k 5)",
        reference=f"{_PAPER}, Fig. 3 left",
        paper={"lambda_max": lambda_max, "lambda_max_over_lambda_5": ratio},
        config={**_CIFAR_RECIPE, "dataset": "cifar10", "model": "wrn40_10", "batchnorm": False, "epochs": 300,
                "optimizer": optimizer, "rho": 0.05 if optimizer == "sam" else None},
    )


_FINETUNED = "timm:tf_efficientnet_b0.aa_in1k"  # the paper's TF AutoAugment ImageNet checkpoints, at scale B0


def _finetune(dataset: str, label: str, optimizer: str, rho: float | None, error: float) -> Preset:
    what = "SGD" if optimizer == "sgd" else f"SAM (rho {rho:g})"
    return Preset(
        description=f"ImageNet-pretrained EfficientNet-B0 ({_FINETUNED}, from the local timm cache) finetuned on "
        f"{label} with a fresh head, {what}: images upsampled to 224 px, 102 epochs of batch 256, lr 0.004 cosine, "
        "wd 1e-5, bf16 (1-2 h on one GPU, estimated)",
        reference=f"{_PAPER}, Sec. 3.2, Table 3 (EfficientNet-b7 at 600 px); recipe after App. C, rho assumed",
        paper={"effnet_b7_test_error_pct": error},
        config={"dataset": dataset, "classes": None, "model": _FINETUNED, "init_from": _FINETUNED, "reset_head": True,
                "image_size": 224, "epochs": 102, "batch_size": 256, "lr": 0.004, "momentum": 0.9, "nesterov": False,
                "weight_decay": 1e-5, "schedule": "cosine", "warmup_epochs": 0.0, "label_smoothing": 0.0,
                "augment": True, "base_optimizer": "sgd", "batchnorm": True, "skip": True, "label_noise": 0.0,
                "max_grad_norm": None, "p": 2.0, "amp": "bf16", "optimizer": optimizer, "rho": rho},
    )


def _digits(optimizer: str) -> Preset:
    what = "SGD" if optimizer == "sgd" else "SAM (rho 0.05)"
    return Preset(
        description=f"digits CNN on scikit-learn's 8x8 digits, {what}, 30 epochs, batch 128, lr 0.1 cosine, wd 5e-4: "
        "the CPU-size stand-in (about 15 s; no download)",
        reference="no paper number (CPU stand-in for Table 1)",
        paper={},
        config={"dataset": "digits", "data_root": None, "test_fraction": 0.2, "model": "digits_cnn", "epochs": 30,
                "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
                "schedule": "cosine", "warmup_epochs": 0.0, "label_smoothing": 0.0, "augment": False,
                "base_optimizer": "sgd", "batchnorm": True, "skip": True, "label_noise": 0.0, "max_grad_norm": None,
                "p": 2.0, "optimizer": optimizer, "rho": 0.05 if optimizer == "sam" else None},
    )


PRESETS: Mapping[str, Preset] = MappingProxyType({
    "c10-wrn28-10-sgd": _wrn28_10("cifar10", "CIFAR-10", "sgd", None, 3.5),
    "c10-wrn28-10-sam": _wrn28_10("cifar10", "CIFAR-10", "sam", 0.05, 2.7),
    "c100-wrn28-10-sgd": _wrn28_10("cifar100", "CIFAR-100", "sgd", None, 18.8),
    "c100-wrn28-10-sam": _wrn28_10("cifar100", "CIFAR-100", "sam", 0.1, 16.5),
    **{f"c10-resnet32-noise{round(100 * rate)}-{optimizer}": _noise(rate, optimizer)
       for rate in (0.2, 0.4, 0.6, 0.8) for optimizer in ("sgd", "sam")},
    "c10-wrn40-10-nobn-sgd": _hessian("sgd", 24.2, 11.4),
    "c10-wrn40-10-nobn-sam": _hessian("sam", 1.0, 2.6),
    "c10-effnet-b0-finetune-sgd": _finetune("cifar10", "CIFAR-10", "sgd", None, 0.95),
    "c10-effnet-b0-finetune-sam": _finetune("cifar10", "CIFAR-10", "sam", 0.05, 0.88),
    "c100-effnet-b0-finetune-sgd": _finetune("cifar100", "CIFAR-100", "sgd", None, 7.68),
    "c100-effnet-b0-finetune-sam": _finetune("cifar100", "CIFAR-100", "sam", 0.1, 7.44),
    "digits-sgd": _digits("sgd"),
    "digits-sam": _digits("sam"),
})
"""Every preset by name: the paper's runs (Foret et al. 2021) and their digits stand-ins."""


def preset_names() -> list[str]:
    """The preset names, in the order of :data:`PRESETS` (grouped by experiment)."""
    return list(PRESETS)


def _get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (sam-landscape presets lists them)")
    return PRESETS[name]


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """The :class:`~sam.trainer.TrainConfig` of preset ``name``, with ``overrides`` replacing its values.

    Fields that neither the preset nor ``overrides`` set keep the ``TrainConfig`` default (seed 0, device
    ``"auto"``, ...). The result is what ``sam-landscape train --preset NAME [--flag value ...]`` trains
    and saves in ``config.json``.

    Args:
        name: A key of :data:`PRESETS`.
        **overrides: ``TrainConfig`` fields to change, e.g. ``data_root="~/data", epochs=10``.

    Returns:
        The resolved config.

    Raises:
        ValueError: ``name`` is not a preset (the message lists them), an override is not a
            ``TrainConfig`` field, a CIFAR preset has neither ``data_root`` nor ``download=True``, or a
            value is invalid (``TrainConfig``'s own checks).

    Example:
        >>> preset_config("digits-sam").rho
        0.05
        >>> preset_config("c10-resnet32-noise40-sam", data_root="/data").label_noise
        0.4
        >>> preset_config("c10-wrn28-10-sgd")
        Traceback (most recent call last):
        ...
        ValueError: preset 'c10-wrn28-10-sgd' trains on cifar10, which is read from files: pass data_root (on the command line --data-root DIR, the directory holding cifar-10-batches-py/) or download=True (--download)
    """
    preset = _get(name)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {unknown} in the overrides of preset {name!r}; accepted: {sorted(names)}")
    values = {**preset.config, **overrides}
    if "dataset" in overrides and "model" not in overrides \
            and preset.config.get("model") == DEFAULT_MODELS[preset.config.get("dataset", "digits")]:
        values["model"] = None  # the preset's model was its dataset's own: take the new dataset's
    dataset = values.get("dataset", "digits")
    if dataset not in BUILT_IN_DATASETS and values.get("data_root") is None and not values.get("download", False):
        folder = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/"}.get(dataset, "the files")
        raise ValueError(f"preset {name!r} trains on {dataset}, which is read from files: pass data_root (on the command "
                         f"line --data-root DIR, the directory holding {folder}) or download=True (--download)")
    return TrainConfig(**values)


_PAPER_LABELS = {  # key: (label, unit, decimals as the paper gives them)
    "test_error_pct": ("test error", "%", 1),
    "clean_test_accuracy_pct": ("clean test accuracy", "%", 1),
    "lambda_max": ("lambda_max", "", 1),
    "lambda_max_over_lambda_5": ("lambda_max/lambda_5", "", 1),
    "effnet_b7_test_error_pct": ("EfficientNet-b7 test error", "%", 2),
}


def format_paper(paper: Mapping[str, float]) -> str:
    """The paper's numbers of a preset as text, e.g. ``"test error 2.7%"``, with the paper's decimals.

    Example:
        >>> format_paper({"lambda_max": 24.2, "lambda_max_over_lambda_5": 11.4})
        'lambda_max 24.2, lambda_max/lambda_5 11.4'
        >>> format_paper({})
        '-'
    """
    parts = []
    for key, value in paper.items():
        label, unit, decimals = _PAPER_LABELS.get(key, (key, "", 1))
        parts.append(f"{label} {value:.{decimals}f}{unit}")
    return ", ".join(parts) or "-"


def format_presets() -> str:
    """Every preset as text: its name, the paper's numbers with their reference, and what it reproduces.

    Example:
        >>> print(format_presets().splitlines()[0])
        c10-wrn28-10-sgd          paper: test error 3.5% [Foret et al. 2021, Table 1 (recipe: Table 6)]
    """
    width = max(map(len, PRESETS))
    lines = []
    for name, preset in PRESETS.items():
        lines.append(f"{name:<{width}}  paper: {format_paper(preset.paper)} [{preset.reference}]")
        lines.append(f"{'':<{width}}  {preset.description}")
    return "\n".join(lines)
