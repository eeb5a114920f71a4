"""One training loop for SGD and every SAM variant, on CPU or GPU, resumable bit for bit.

A run lives in one directory:

* ``config.json``: the full resolved :class:`TrainConfig` plus what was derived from it (device,
  dataset, parameter count, library versions, and for a finetuning run the weights file it started
  from with its SHA-256, :class:`sam.finetune.InitRecord`);
* ``model.pt``: the model's plain ``state_dict`` after the last finished epoch
  (``torch.load(path, weights_only=True)``);
* ``state.pt``: everything a resume needs (model, optimizer, scheduler, grad scaler, RNG, epoch);
* ``metrics.jsonl``: one JSON line per epoch (train/test loss and accuracy, lr, time, gradient norm);
* ``snapshots/epoch_XXXX.pt``: the weights every ``snapshot_every`` epochs (for trajectory analysis).

Every file is written atomically (temporary file, then rename). A resumed run replays the same
batches (the loader's order depends only on seed and epoch) and, on CPU, ends with the same weights
as an uninterrupted one.

Under ``torchrun`` (an initialised process group, see :mod:`sam.distributed`) the model is wrapped in
``DistributedDataParallel``; ``batch_size`` stays the *global* batch, each rank trains on its
contiguous share of it (:class:`~sam.data.DeviceLoader` with ``num_replicas``), SAM's first pass runs
under ``no_sync`` unless ``sync_perturbation`` (:func:`sam.step.train_step`), the epoch's metrics are
summed over the ranks, the test set is evaluated in shards, and only rank 0 writes files. The run
directory must be on a file system every process sees, for resuming.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from landscape.progress import progress_bar
from landscape.storage import (
    CorruptFileError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    load_weights,
    read_json,
    read_jsonl,
    remove_stale_temporaries,
)

from . import __version__, distributed
from ._checks import at_least, one_of
from .data import BUILT_IN_DATASETS, DATASET_NAMES, DatasetInfo, DeviceLoader, Split, check_classes, load_dataset
from .finetune import InitRecord, check_init_unchanged, load_init, pretrained_timm, timm_init_name
from .models import TIMM_PREFIX, available_models, build_model, is_timm, resize_inputs
from .optim import BASE_OPTIMIZERS, OPTIMIZERS, SAM, available_optimizers, create, wrapper_arguments
from .step import check_distributed_settings, train_step

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "ConfigMismatch",
    "train",
    "evaluate",
    "build_optimizer",
    "lr_factor",
    "resolve_device",
    "load_run_config",
    "final_metrics",
    "LoadedRun",
    "load_run",
    "build_network",
    "checkpoint_sha256",
]

SCHEDULES = ("cosine", "step", "constant")
DEFAULT_MODELS: dict[str, str] = {"digits": "digits_cnn", "mnist1d": "mnist1d_mlp", "cifar10": "digits_cnn",
                                  "cifar100": "digits_cnn"}
"""The model a dataset gets when ``model`` is not given (the MNIST-1D paper's MLP for MNIST-1D)."""
SIGNAL_MODELS = frozenset({"mnist1d_mlp", "mnist1d_cnn"})  # 1-D signals (N x C x L); the others take images
CUSTOM_MODEL = "custom"  # config.model when train() is handed the user's own nn.Module
AMP_MODES = ("auto", "none", "bf16", "fp16")  # auto: bf16 on a GPU that has it, else none


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class ConfigMismatch(ValueError):
    """``resume=True`` met a run directory trained with another config; the message names the fields."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. Saved as ``config.json`` beside the results.

    The defaults train the small CNN on scikit-learn's digits in well under a minute on a CPU.
    SAM's paper defaults (Foret et al. 2021, Table 6: SGD momentum 0.9, cosine lr 0.1, weight decay
    5e-4, rho 0.05) are the defaults here too where they apply.

    ``batch_size`` is the global batch: under ``torchrun`` with ``N`` processes each replica holds
    ``batch_size / N`` examples (and with per-replica perturbations, SAM's ``m`` is that share).
    ``sync_perturbation`` only matters under DDP (:func:`sam.step.train_step`).

    Speed: ``amp="auto"`` and ``channels_last=None`` are decided when the config is made, from the
    device it will run on: bf16 autocast on a CUDA device that supports it (else none), and the
    channels-last memory format for an image model on CUDA (Tensor Cores take NHWC convolutions); the
    saved ``config.json`` holds the decision. ``compile`` runs the model's passes through
    ``torch.compile`` (SAM's two passes alike; the optimizer, checkpoints and resume see the plain module).
    Base optimizers take their fused update on CUDA and the foreach one on the CPU.

    Finetuning (:mod:`sam.finetune`): ``init_from`` starts the run from a run directory's weights, a
    weights file, or timm's pretrained ``timm:NAME`` (then the model is ``timm:NAME``); ``reset_head``
    starts the classification head afresh for the dataset's classes. ``classes`` keeps a subset of the
    dataset's classes (:func:`sam.data.select_classes`), so that a model trained on some classes can
    be finetuned on others. ``image_size`` makes the model upsample its input images (CIFAR's 32 x 32 to
    the 224 x 224 an ImageNet model was trained at) as its first operation.
    """

    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    label_noise: float = 0.0
    augment: bool | None = None  # None: on for CIFAR, off for digits
    test_fraction: float = 0.2
    classes: list[int] | None = None  # None: every class; else these, relabelled 0..k-1 in this order

    model: str | None = None  # None: the dataset's own (DEFAULT_MODELS), or timm:NAME with init_from timm:NAME
    batchnorm: bool = True
    skip: bool = True
    image_size: int | None = None  # None: the dataset's; else the model upsamples its inputs to this size
    init_from: str | None = None  # a run directory, a weights file or timm:NAME (sam.finetune)
    reset_head: bool = False

    optimizer: str = "sgd"
    base_optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    rho: float | None = None  # None: the optimizer's own default (SAM 0.05, ASAM 0.5)
    eta: float = 0.01
    p: float = 2.0
    m: int = 16
    gsam_alpha: float = 0.4
    rho_min: float | None = None
    ascent_steps: int = 2
    sam_every: int = 2
    sync_perturbation: bool = False

    epochs: int = 30
    batch_size: int = 128
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_gamma: float = 0.1
    label_smoothing: float = 0.0
    max_grad_norm: float | None = None
    amp: str = "auto"  # resolved when made: bf16 on a CUDA device with bf16, else none
    compile: bool = False
    channels_last: bool | None = None  # resolved when made: on for image models on a CUDA device
    seed: int = 0
    device: str = "auto"
    snapshot_every: int = 0
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, DATASET_NAMES)
        self._check_finetuning()
        if self.model is None:
            self.model = DEFAULT_MODELS[self.dataset]
        if self.model != CUSTOM_MODEL and (self.dataset == "mnist1d") != (self.model in SIGNAL_MODELS):
            fitting = sorted(SIGNAL_MODELS) if self.dataset == "mnist1d" else sorted(set(available_models()) - SIGNAL_MODELS)
            raise ValueError(f"model {self.model!r} does not take the inputs of dataset {self.dataset!r} ("
                             f"{'1-D signals' if self.dataset == 'mnist1d' else 'images'}); "
                             f"models for {self.dataset}: {', '.join(fitting)}")
        if is_timm(self.model):
            if self.model == TIMM_PREFIX:
                raise ValueError(f"model must name a timm model after {TIMM_PREFIX} ({TIMM_PREFIX}resnet18); "
                                 f"got {self.model!r}")
        else:
            one_of("model", self.model, [*available_models(), CUSTOM_MODEL])
        one_of("optimizer", self.optimizer, available_optimizers())
        one_of("base_optimizer", self.base_optimizer, sorted(BASE_OPTIMIZERS))
        one_of("schedule", self.schedule, SCHEDULES)
        one_of("amp", self.amp, AMP_MODES)
        self._resolve_speed_defaults()
        for name in ("epochs", "batch_size", "m", "ascent_steps", "sam_every", "eval_batch_size"):
            at_least(name, getattr(self, name), 1)
        for name in ("seed", "snapshot_every"):
            at_least(name, getattr(self, name), 0)
        if self.rho is not None and (not math.isfinite(self.rho) or self.rho < 0):
            raise ValueError(f"rho must be a finite number >= 0 or None; got {self.rho!r}")
        for name in ("lr", "weight_decay", "eta", "gsam_alpha", "warmup_epochs", "lr_gamma", "momentum"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1]; got {self.label_noise!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {self.label_smoothing!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None; got {self.max_grad_norm!r}")
        if any(not 0.0 < f < 1.0 for f in self.lr_milestones) or list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ValueError(
                f"lr_milestones are increasing fractions of training in (0, 1); got {self.lr_milestones!r}"
            )
        self.lr_milestones = [float(f) for f in self.lr_milestones]
        distributed.check_device_name(self.device)
        if self.augment and self.dataset == "mnist1d":
            raise ValueError("augment (pad-4 crop and flip of images) does not apply to mnist1d's 1-D signals")
        if self.dataset not in BUILT_IN_DATASETS and self.data_root is None and not self.download:
            raise ValueError(f"dataset {self.dataset!r} needs data_root (a directory with the files) or download=True")

    def _check_finetuning(self) -> None:
        """``init_from``, ``reset_head``, ``classes`` and ``image_size``; ``model`` from ``init_from`` timm:NAME."""
        if self.classes is not None:
            check_classes(self.classes, self.dataset)
            self.classes = [int(c) for c in self.classes]  # a list, as config.json gives it back
        if self.image_size is not None:
            at_least("image_size", self.image_size, 1)
            if self.dataset == "mnist1d":
                raise ValueError("image_size must be left out for mnist1d: it resizes images, and mnist1d holds "
                                 "1-D signals")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ValueError(f"init_from must be a run directory, a weights file or timm:NAME; got {self.init_from!r}")
        if self.reset_head and self.init_from is None:
            raise ValueError("reset_head must come with init_from: it starts afresh the head of the weights "
                             "init_from gives")
        name = timm_init_name(self.init_from)
        if name is None:
            return
        if not name:
            raise ValueError(f"init_from must name timm's pretrained weights after {TIMM_PREFIX} "
                             f"({TIMM_PREFIX}resnet18.a1_in1k); got {self.init_from!r}")
        if self.model is None:
            self.model = self.init_from
        elif self.model != self.init_from:
            raise ValueError(f"model must be left out or be {self.init_from} with init_from {self.init_from} "
                             f"(timm's {name} is the model); got {self.model!r}")

    def _resolve_speed_defaults(self) -> None:
        """``amp="auto"`` and ``channels_last=None`` decided for the device the run will use."""
        on_cuda = _on_cuda(self.device)
        if self.amp == "auto":
            self.amp = "bf16" if on_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "none"
        images = self.dataset != "mnist1d"
        if self.channels_last is None:
            self.channels_last = on_cuda and images
        elif self.channels_last and not images:
            raise ValueError("channels_last applies to image models (4-D inputs); mnist1d holds 1-D signals")

    @property
    def uses_augmentation(self) -> bool:
        return self.augment if self.augment is not None else self.dataset not in BUILT_IN_DATASETS

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict such as a saved ``config.json`` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; accepted: {sorted(names)}")
        return cls(**values)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, the run directory and the last metrics."""

    model: nn.Module
    out_dir: Path
    metrics: list[dict[str, Any]]

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}


def _on_cuda(device: str) -> bool:
    """Whether a run on ``device`` (``auto``: CUDA when available) uses a CUDA GPU."""
    try:
        return torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    except (RuntimeError, TypeError, ValueError):
        return False  # a bad name is reported by the device check


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Under a process group ``"auto"`` and ``"cuda"`` are this process's GPU, ``cuda:LOCAL_RANK``.
    """
    return distributed.device_for(device)


def build_optimizer(config: TrainConfig, params: Any, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer named in ``config``: a base optimizer alone or wrapped by a SAM variant.

    On a CUDA ``device`` the base optimizer takes its fused update (one kernel for every parameter), elsewhere
    the foreach one (one call per operation over all parameters instead of a Python loop).
    """
    name = config.optimizer
    if name in BASE_OPTIMIZERS:
        return create(name, params, **_base_kwargs(name, config, device))
    candidates = {
        "rho": config.rho,
        "eta": config.eta,
        "p": config.p,
        "m": config.m,
        "alpha": config.gsam_alpha,
        "rho_min": config.rho_min,
        "steps": config.ascent_steps,
        "k": config.sam_every,
    }
    accepted = set(wrapper_arguments(name))
    wrapper_kwargs = {k: v for k, v in candidates.items() if k in accepted and v is not None}
    base_kwargs = _base_kwargs(config.base_optimizer, config, device)
    return create(name, params, base=config.base_optimizer, **base_kwargs, **wrapper_kwargs)


def optimizer_update_kwargs(device: torch.device) -> dict[str, bool]:
    """How the base optimizer updates the parameters on ``device``: one fused kernel on CUDA, the
    multi-tensor ``foreach`` path elsewhere."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def _base_kwargs(base: str, config: TrainConfig, device: torch.device | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if device is not None:
        kwargs.update(optimizer_update_kwargs(device))
    if base == "sgd":
        kwargs.update(momentum=config.momentum, nesterov=config.nesterov)
    return kwargs


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning-rate multiplier after ``step`` of ``total_steps`` optimizer steps.

    Linear warm-up over ``warmup_epochs``, then ``cosine``: ``0.5 (1 + cos(pi t))`` with ``t`` the
    fraction of the post-warm-up steps done; ``step``: ``lr_gamma ** (milestones passed)``;
    ``constant``: 1.
    """
    steps_per_epoch = total_steps / config.epochs
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total_steps - warmup, 1)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if config.schedule == "step":
        return config.lr_gamma ** sum(step >= f * total_steps for f in config.lr_milestones)
    return 1.0


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, *, batch_size: int = 1024, autocast_dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode over every example of ``split``.

    Sums are weighted by batch size (never a mean of batch means) and read back once.
    """
    sums = _evaluation_sums(model, split, batch_size=batch_size, autocast_dtype=autocast_dtype)
    return float(sums[0]) / len(split), int(sums[1]) / len(split)


@torch.no_grad()
def _evaluation_sums(
    model: nn.Module, split: Split, *, batch_size: int, autocast_dtype: torch.dtype | None
) -> Tensor:
    """``[summed cross-entropy, number correct]`` over ``split`` in eval mode, as one float64 tensor."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for start in range(0, len(split), batch_size):
            x = split.x[start : start + batch_size].to(device, non_blocking=True)
            y = split.y[start : start + batch_size].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x)
            sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            sums[1] += (logits.argmax(dim=1) == y).sum()
    finally:
        model.train(was_training)
    return sums


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    model: nn.Module | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` with ``config.optimizer``; write the run to ``out_dir``.

    Args:
        config: the run's settings.
        out_dir: the run directory. It must not hold a finished epoch unless ``resume`` or ``overwrite``
            is True. A directory whose run never finished an epoch (killed early, or diverged in the
            first epoch) holds nothing to keep: training starts there afresh. Weights, metrics or
            snapshots without ``state.pt`` (the commit point of an epoch) are kept too: a first epoch cut
            short before its ``state.pt`` is trained again with ``resume``; anything more needs ``overwrite``.
        resume: continue the run saved in ``out_dir`` from its last finished epoch (the saved config
            must equal ``config``); with no run there yet, start one. A finished run is left as it is.
        overwrite: delete the run's files in ``out_dir`` (config, checkpoints, metrics, snapshots) and
            train from scratch. Analyses saved beside it are kept; they record the checkpoint they came
            from, so they are not mistaken for the new run's.
        progress: show progress (a bar on a terminal, a line per epoch in a log).
        on_epoch_end: called with ``(epoch, metrics)`` after each epoch's checkpoint is written.
        model: the user's own network (freshly initialised; it is trained in place) instead of a
            registered one; ``config.model`` must then be ``"custom"``. Its class is recorded in
            ``config.json``; resuming needs the same architecture.

    Under an initialised process group (``torchrun``; :func:`sam.distributed.init_from_env`) every
    process calls ``train`` with the same arguments; see the module docstring. ``on_epoch_end`` is
    called on every rank with the same, global, metrics.

    Returns:
        The trained model (on its device; the plain module, not the DDP wrapper), the run directory
        and every epoch's metrics.

    Raises:
        FileExistsError: ``out_dir`` holds a finished epoch and neither ``resume`` nor ``overwrite`` is True,
            or weights, metrics or snapshots without their ``state.pt`` (see ``out_dir``).
        ConfigMismatch: ``resume`` is True and ``out_dir`` holds a run with a different config (a ValueError).
        TrainingDiverged: the loss became NaN/inf; the checkpoint of the last good epoch is kept.
    """
    out = Path(out_dir)
    state_path, config_path, metrics_path = out / "state.pt", out / "config.json", out / "metrics.jsonl"
    replicas, rank = distributed.world_size(), distributed.rank()
    if config.batch_size % replicas:
        raise ValueError(
            f"batch_size {config.batch_size} is the global batch and must be divisible by the number of "
            f"processes ({replicas}), so that every replica holds the same share"
        )
    if replicas > 1:  # before anything is written: a refused setting must not leave a half-made run behind
        check_distributed_settings({**BASE_OPTIMIZERS, **OPTIMIZERS}[config.optimizer],
                                   amp_fp16=config.amp == "fp16", sync_perturbation=config.sync_perturbation)
    if resume and overwrite:
        raise ValueError("resume continues the run in out_dir and overwrite discards it: pass one of them")
    resume = _resumable(out, config, replicas, resume=resume, overwrite=overwrite)
    distributed.barrier()  # every rank has looked at out_dir before rank 0 writes to it
    if distributed.is_main():  # what a killed process left half-written (a checkpoint's temporary file)
        for directory in (out, out / "snapshots"):
            remove_stale_temporaries(directory)
    progress = progress and distributed.is_main()

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 downloads (if asked to) before the others read the files
    train_split, test_split, info = load_dataset(
        config.dataset,
        root=config.data_root,
        download=config.download,
        label_noise=config.label_noise,
        noise_seed=config.seed,
        test_fraction=config.test_fraction,
        classes=config.classes,
    )
    if distributed.is_main():
        distributed.barrier()
    if (model is None) != (config.model != CUSTOM_MODEL):
        raise ValueError(
            f"pass model=<nn.Module> together with config.model={CUSTOM_MODEL!r}, or neither "
            f"(got config.model={config.model!r} and model={type(model).__name__ if model is not None else None})"
        )
    init: InitRecord | None = None
    if model is None:
        model, init = build_network(config, info, init=not resume)
    elif config.init_from is not None and not resume:
        init = load_init(model, config.init_from, reset_head=config.reset_head, model_name=type(model).__name__)
    model = model.to(device, memory_format=torch.channels_last) if config.channels_last else model.to(device)
    optimizer = build_optimizer(config, model.parameters(), device)
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    loader = DeviceLoader(
        train_split,
        config.batch_size,
        shuffle=True,
        augment=config.uses_augmentation,
        seed=config.seed,
        device=device,
        num_replicas=replicas,
        rank=rank,
    )
    test_split = test_split.to(device)
    test_shard = Split(*(t[distributed.shard(len(test_split))] for t in (test_split.x, test_split.y)))
    total_steps = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        base, functools.partial(_lr_lambda, total_steps=total_steps, config=config)
    )
    autocast_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    loss_fn = functools.partial(F.cross_entropy, label_smoothing=config.label_smoothing)

    start_epoch = 0
    metrics: list[dict[str, Any]] = []
    if resume:
        start_epoch = _load_resume_state(state_path, model, optimizer, scheduler, scaler, device, config)
        metrics = _read_metrics(metrics_path, before_epoch=start_epoch)
        if distributed.is_main():
            _remove_uncommitted_snapshots(out, start_epoch)
    elif distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        derived = {
            "device": str(device),
            "world_size": replicas,
            "per_replica_batch": config.batch_size // replicas,
            "dataset_info": dataclasses.asdict(info),
            "train_size": len(train_split),
            "test_size": len(test_split),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "versions": {"sam_landscape": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        if init is not None:
            derived["init"] = init.to_dict()
        atomic_write_json(config_path, {"config": dataclasses.asdict(config), "derived": derived})
        atomic_write_text(metrics_path, "")
    # The module the optimizer steps (and checkpoints save) stays `model`; DDP only wraps its passes.
    network = model
    if distributed.active():
        network = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if config.compile:  # the passes compiled; parameters, optimizer and checkpoints stay the plain module's
        network = torch.compile(network)

    # one line per epoch when the output is a log, not a terminal
    epochs = progress_bar(range(start_epoch, config.epochs), desc=f"train {config.optimizer}", unit="epoch",
                          enabled=progress, initial=start_epoch, total=config.epochs, lines="each")
    for epoch in epochs:
        record = _train_epoch(
            network, optimizer, loss_fn, loader, epoch, scaler=scaler, scheduler=scheduler,
            autocast_dtype=autocast_dtype, max_grad_norm=config.max_grad_norm, progress=progress,
            sync_perturbation=config.sync_perturbation, channels_last=config.channels_last,
        )
        if not math.isfinite(record["train_loss"]):
            if epoch > 0:
                what = (f"Last good checkpoint: epoch {epoch} in {state_path} (kept). Lower --lr or --rho, or set "
                        "--max-grad-norm, and train again with --overwrite, or into another --out.")
            else:
                what = ("Nothing was saved: rerun with a lower --lr or --rho, or with --max-grad-norm; the same --out "
                        "can be used again.")
            raise TrainingDiverged(f"training loss became {record['train_loss']} in epoch {epoch + 1}; stopped. {what}")
        # Between synchronised forward passes DDP leaves each replica its own BatchNorm statistics: take
        # rank 0's, the ones the checkpoint saves, before evaluating.
        distributed.broadcast_(list(model.buffers()))
        sums = _evaluation_sums(model, test_shard, batch_size=config.eval_batch_size, autocast_dtype=autocast_dtype)
        distributed.all_reduce_sum_([sums])
        test_loss, test_acc = float(sums[0]) / len(test_split), int(sums[1]) / len(test_split)
        record.update(epoch=epoch + 1, test_loss=test_loss, test_acc=test_acc, lr=base.param_groups[0]["lr"])
        metrics.append(record)
        if distributed.is_main():
            snapshot = bool(config.snapshot_every) and (epoch + 1) % config.snapshot_every == 0
            _write_checkpoint(out, model, optimizer, scheduler, scaler, epoch + 1, device, metrics, snapshot=snapshot)
        distributed.barrier()  # the checkpoint is on disk before any rank goes on (or stops)
        epochs.set_postfix(train_acc=f"{record['train_acc']:.3f}", test_acc=f"{test_acc:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    return TrainResult(model=model, out_dir=out, metrics=metrics)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    loader: DeviceLoader,
    epoch: int,
    *,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    autocast_dtype: torch.dtype | None,
    max_grad_norm: float | None,
    progress: bool,
    sync_perturbation: bool = False,
    channels_last: bool = False,
) -> dict[str, Any]:
    """One pass over the training data; sums stay on the device and are read back once.

    Under DDP the sums are over every replica's share (one ``all_reduce`` at the end of the epoch).
    """
    model.train()
    loader.set_epoch(epoch)
    device = loader.device
    # [loss sum, number correct, examples seen, gradient-norm sum]: one tensor, one collective
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    steps, skipped = 0, 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for x, y in progress_bar(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False, enabled=progress, lines=None):
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        result = train_step(
            model, optimizer, loss_fn, x, y, grad_scaler=scaler, autocast_dtype=autocast_dtype,
            max_grad_norm=max_grad_norm, sync_perturbation=sync_perturbation,
        )
        scaler.update()
        scheduler.step()
        sums[0] += result.loss.double() * x.shape[0]
        sums[1] += result.correct
        sums[2] += x.shape[0]
        if result.skipped:
            skipped += 1
        else:
            sums[3] += result.grad_norm.double()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = distributed.broadcast_object(time.perf_counter() - start)  # rank 0's clock, for identical records
    distributed.all_reduce_sum_([sums])
    # The final gradient, hence its norm, is the same on every replica: average the replicas' sums.
    loss_sum, correct, seen, grad_norm_sum = sums.tolist()
    grad_norm_sum /= distributed.world_size()
    return {
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "grad_norm": grad_norm_sum / max(steps - skipped, 1),
        "time": seconds,
        "step_time": seconds / steps,
        "images_per_sec": seen / seconds,
        "steps": steps,
        "skipped_steps": skipped,
    }


def _load_resume_state(
    state_path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    config: TrainConfig,
) -> int:
    """Load ``state.pt`` into the run's objects; the epoch it was saved after.

    Raises:
        CorruptFileError: one line naming ``state.pt`` and the part of it that does not fit.
    """
    state = load_weights(state_path, map_location=device)
    missing = sorted({"epoch", "model", "optimizer", "scheduler", "scaler", "rng_cpu"} - set(state)) if isinstance(
        state, dict) else ["everything"]
    if missing:
        raise CorruptFileError(f"{state_path} is not a resume checkpoint of this trainer (missing {missing})")
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= config.epochs:
        raise CorruptFileError(f"{state_path} holds epoch {epoch!r}, not a finished epoch of a "
                               f"{config.epochs}-epoch run")
    _load_state_dict(model, state["model"], state_path, config.model)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        try:
            if not isinstance(state[name], dict):
                raise TypeError(f"a {type(state[name]).__name__}, not a dict")
            target.load_state_dict(state[name])
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as error:
            raise CorruptFileError(f"{state_path}: its {name} state does not fit this {config.optimizer} run "
                                   f"({type(error).__name__}: {_first_line(error)})") from None
    rng = {"rng_cpu": state["rng_cpu"]}
    if device.type == "cuda" and "rng_cuda" in state:
        rng["rng_cuda"] = state["rng_cuda"]
    for name, value in rng.items():
        if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
            raise CorruptFileError(f"{state_path} holds a {name} that is not a random-number generator state "
                                   f"(a 1-D uint8 tensor); got {type(value).__name__}")
    try:
        torch.set_rng_state(rng["rng_cpu"].cpu())
        if "rng_cuda" in rng:
            torch.cuda.set_rng_state(rng["rng_cuda"].cpu(), device)
    except (RuntimeError, ValueError) as error:
        raise CorruptFileError(f"{state_path} holds a random-number generator state torch refuses "
                               f"({_first_line(error)})") from None
    return epoch


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _lr_lambda(step: int, *, total_steps: int, config: TrainConfig) -> float:
    return lr_factor(step, total_steps, config)


def _write_checkpoint(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    epoch: int,
    device: torch.device,
    metrics: list[dict[str, Any]],
    *,
    snapshot: bool = False,
) -> None:
    """Metrics first, then the weights (and the epoch's snapshot), then the resume state: ``state.pt`` is the
    commit point. A kill before it leaves the previous epoch's checkpoint in force, and the resumed run
    writes this epoch's files again; a kill after it leaves every file of the epoch written."""
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics))
    atomic_torch_save(model.state_dict(), out / "model.pt")
    if snapshot:
        atomic_torch_save(model.state_dict(), out / "snapshots" / f"epoch_{epoch:04d}.pt")
    state: dict[str, Any] = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    atomic_torch_save(state, out / "state.pt")


def _resumable(out: Path, config: TrainConfig, replicas: int, *, resume: bool, overwrite: bool) -> bool:
    """Whether ``out`` holds a run to continue; refuses to overwrite one that finished an epoch.

    ``state.pt`` is the commit point of every epoch. A directory without it that holds no weights, no
    epoch's metrics and no snapshot is a run that never finished an epoch (killed early, or diverged in
    the first epoch): nothing in it is worth keeping, and training starts there afresh, provided its
    ``config.json`` is one of ours. Weights, metrics or snapshots without ``state.pt`` are kept (a run
    whose ``state.pt`` was deleted, or an ``overwrite`` that was killed midway): training there needs
    ``overwrite``, unless they are only the first epoch's checkpoint, cut short before its ``state.pt``,
    and ``resume`` trains that epoch again.
    """
    state_path, config_path = out / "state.pt", out / "config.json"
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a run directory; choose another --out")
    if overwrite:
        if distributed.is_main():
            _discard_run(out)
        return False
    if state_path.exists():
        if not resume:
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, --overwrite to train it "
                                  "again from scratch, or choose another --out")
        _check_same_config(config, config_path)
        _check_same_replicas(config, config_path, replicas)
        derived = _read_run_json(config_path).get("derived")
        check_init_unchanged(derived.get("init") if isinstance(derived, dict) else None, out)
        return True
    if config_path.exists():
        try:
            load_run_config(out)
        except (ValueError, OSError) as error:
            raise FileExistsError(f"{out} already holds a run whose config.json cannot be read ({error}); it is "
                                  "not overwritten: choose another --out, or pass --overwrite") from None
    work = _uncommitted_work(out)
    if not work:
        return False
    first_epoch = config_path.exists() and _at_most_first_epoch(out)
    if resume and first_epoch:
        _check_same_config(config, config_path)
        return False
    again = "pass --resume to train its first epoch again, " if first_epoch else ""
    raise FileExistsError(f"{out} holds a run without its resume state (state.pt) but with {', '.join(work)}; it is "
                          f"not overwritten: {again}pass --overwrite to train it again from scratch, or choose "
                          "another --out")


def _uncommitted_work(out: Path) -> list[str]:
    """What of a run's results ``out`` holds: weights, an epoch's metrics, snapshots."""
    work = []
    if (out / "model.pt").exists():
        work.append("model.pt")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size and metrics.read_bytes().strip():
        work.append("metrics.jsonl")
    if any((out / "snapshots").glob("epoch_*.pt")):
        work.append("snapshots/")
    return work


def _at_most_first_epoch(out: Path) -> bool:
    """Whether the metrics and snapshots in ``out`` go no further than epoch 1."""
    try:
        records = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    except (ValueError, OSError):
        return False
    if any(not isinstance(r, dict) or r.get("epoch") not in (1,) for r in records):
        return False
    return all(p.name == "epoch_0001.pt" for p in (out / "snapshots").glob("epoch_*.pt"))


def _discard_run(out: Path) -> None:
    """Delete a run's own files (``overwrite=True``); analyses and other files in ``out`` stay.

    ``state.pt`` goes first: a discard killed midway never leaves a run that resumes with some of its
    files gone. Then the snapshots, the weights and the metrics, which without ``state.pt`` make the
    directory one that is refused without ``overwrite``; ``config.json`` last, so that until then what
    is left is still known to be a run.
    """
    (out / "state.pt").unlink(missing_ok=True)
    snapshots = out / "snapshots"
    for snapshot in sorted(snapshots.glob("epoch_*.pt")):
        snapshot.unlink(missing_ok=True)
    remove_stale_temporaries(snapshots)
    if snapshots.is_dir() and not any(snapshots.iterdir()):
        snapshots.rmdir()
    for name in ("preset.json", "model.pt", "metrics.jsonl", "config.json"):
        (out / name).unlink(missing_ok=True)


def _remove_uncommitted_snapshots(out: Path, epoch: int) -> None:
    """Delete the snapshots of epochs after ``epoch``: written by a run killed before their ``state.pt``."""
    for snapshot in (out / "snapshots").glob("epoch_*.pt"):
        number = snapshot.stem.removeprefix("epoch_")
        if number.isdigit() and int(number) > epoch:
            snapshot.unlink(missing_ok=True)


def _check_same_replicas(config: TrainConfig, config_path: Path, replicas: int) -> None:
    """Resuming on another number of processes must not change the method.

    It would with per-replica perturbations (SAM's ``m`` is the per-replica batch) and with BatchNorm
    (its batch statistics are per replica).
    """
    derived = _read_run_json(config_path).get("derived", {})
    saved = derived.get("world_size", 1) if isinstance(derived, dict) else None
    if isinstance(saved, bool) or not isinstance(saved, int) or saved < 1:
        raise CorruptFileError(f"{config_path} holds no 'derived' object with the number of processes (world_size, "
                               "an integer >= 1): it was not written by sam-landscape train, or was edited")
    if saved == replicas:
        return
    reasons = []
    if config.optimizer not in BASE_OPTIMIZERS and config.optimizer != "msam" and not config.sync_perturbation:
        reasons.append(f"with per-replica perturbations {config.optimizer}'s m is the per-replica batch "
                       f"({config.batch_size // saved})")
    if config.batchnorm and config.model != CUSTOM_MODEL:
        reasons.append(f"BatchNorm normalises with per-replica batches of {config.batch_size // saved}")
    if reasons:
        raise ValueError(
            f"cannot resume {config_path.parent} on {replicas} process(es): it was trained on {saved}, and "
            f"{' and '.join(reasons)}; resume with --nproc_per_node {saved}"
        )


def _read_metrics(path: Path, before_epoch: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = read_jsonl(path)
    if any(not isinstance(r, dict) or not isinstance(r.get("epoch"), int) for r in records):
        raise CorruptFileError(f"{path} holds a line that is not an epoch's metrics (no integer 'epoch')")
    return [r for r in records if r["epoch"] <= before_epoch]


def _check_same_config(config: TrainConfig, config_path: Path) -> None:
    if not config_path.exists():
        raise FileNotFoundError(f"cannot resume: {config_path} is missing")
    saved = load_run_config(config_path.parent)
    mine, theirs = dataclasses.asdict(config), dataclasses.asdict(saved)
    differing = sorted(k for k in mine if mine[k] != theirs[k])
    if differing:
        details = ", ".join(f"{k}: saved {theirs[k]!r}, given {mine[k]!r}" for k in differing)
        raise ConfigMismatch(f"cannot resume {config_path.parent} with a different config ({details})")


def load_run_config(out_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run directory."""
    path = Path(out_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not a sam-landscape run directory")
    values = _read_run_json(path).get("config")
    if not isinstance(values, dict):
        raise CorruptFileError(f"{path} holds no 'config' object: it is not a sam-landscape run config")
    try:
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise CorruptFileError(f"{path} holds an invalid config: {error}") from None


def final_metrics(out_dir: str | Path, epochs: int) -> dict[str, Any]:
    """The metrics of a run's last epoch, which must be epoch ``epochs`` (the run is finished).

    Raises:
        CorruptFileError: ``metrics.jsonl`` does not end with that epoch (the run is not finished).
    """
    path = Path(out_dir) / "metrics.jsonl"
    records = read_jsonl(path)
    if not records or not isinstance(records[-1], dict) or records[-1].get("epoch") != epochs:
        raise CorruptFileError(f"{path} does not end with epoch {epochs}: the run is not finished; rerun to resume it")
    return records[-1]


def _read_run_json(path: Path) -> dict[str, Any]:
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(saved).__name__}, not an object: it is not a run config")
    return saved


@dataclass
class LoadedRun:
    """A trained model rebuilt from a run directory, with its data, ready for analysis."""

    model: nn.Module
    config: TrainConfig
    train: Split
    test: Split
    run_dir: Path
    checkpoint: Path
    checkpoint_sha256: str


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the model of a run and load its weights (``torch.load(weights_only=True)``).

    Args:
        path: a run directory (its ``model.pt`` is loaded), or a weights file inside one
            (``model.pt`` or ``snapshots/epoch_XXXX.pt``).
        device: where to put the model.

    Returns:
        The model in eval mode, the run's config, its train split (with the run's label noise) and
        test split, and the checkpoint's path and SHA-256.
    """
    path = Path(path)
    if path.is_dir():
        run_dir, checkpoint = path, path / "model.pt"
    elif path.is_file():
        checkpoint = path
        run_dir = path.parent if (path.parent / "config.json").exists() else path.parent.parent
    else:
        raise FileNotFoundError(f"{path} does not exist: pass a run directory or a checkpoint file inside one")
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint} not found: {run_dir} holds no finished epoch yet")
    config = load_run_config(run_dir)
    if config.model == CUSTOM_MODEL:
        raise ValueError(
            f"{run_dir} was trained with a user-defined module, which cannot be rebuilt from files; "
            "load the weights into your module and use the Python API"
        )
    train_split, test_split, info = load_dataset(
        config.dataset, root=config.data_root, download=False, label_noise=config.label_noise,
        noise_seed=config.seed, test_fraction=config.test_fraction, classes=config.classes,
    )
    model, _ = build_network(config, info)  # the run's weights hold everything: its init is not read
    _load_state_dict(model, load_weights(checkpoint), checkpoint, config.model)
    model.to(torch.device(device)).eval()
    return LoadedRun(model, config, train_split, test_split, run_dir, checkpoint, checkpoint_sha256(checkpoint))


def build_network(config: TrainConfig, info: DatasetInfo, *, init: bool = False) -> tuple[nn.Module, InitRecord | None]:
    """The network of a run: ``config.model`` with a head for the ``info.num_classes`` classes.

    It upsamples its inputs to ``config.image_size`` when that differs from the dataset's
    (:func:`sam.models.resize_inputs`; a timm transformer is built for that size, or the dataset's).
    With ``init``, its weights come from ``config.init_from`` (:mod:`sam.finetune`), all but the head
    with ``config.reset_head``; otherwise it is freshly initialised (a run's own weights are loaded on top).

    Returns:
        The model, and what its weights were loaded from (``None`` without ``init`` or ``init_from``).
    """
    size = config.image_size or info.image_size
    record = None
    name = timm_init_name(config.init_from) if init else None
    if name is not None:
        model, record = pretrained_timm(name, num_classes=info.num_classes, in_channels=info.in_channels,
                                        image_size=size, reset_head=config.reset_head)
    else:
        model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            batchnorm=config.batchnorm, skip=config.skip, image_size=size)
        if init and config.init_from is not None:
            record = load_init(model, config.init_from, reset_head=config.reset_head, model_name=config.model)
    if config.image_size is not None and config.image_size != info.image_size:
        resize_inputs(model, config.image_size)
    return model, record


def _load_state_dict(model: nn.Module, state: Any, checkpoint: Path, name: str) -> None:
    """``model.load_state_dict(state)``, with a one-line error naming the file when they do not fit."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CorruptFileError(f"{checkpoint} is not a state_dict (a dict of tensors); got {type(state).__name__}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        problems = [f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("other shapes for", shapes)) if keys]
        raise CorruptFileError(f"{checkpoint} does not fit the model {name} of its run ({'; '.join(problems)})")
    model.load_state_dict(state)


def checkpoint_sha256(checkpoint: str | Path) -> str:
    """The SHA-256 of a weights file: what analyses record to tie their results to a checkpoint."""
    return file_sha256(checkpoint)
