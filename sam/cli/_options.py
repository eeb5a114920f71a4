"""What the commands share: the parser with one-line errors, a help formatter that states defaults truthfully,
and the groups of flags that several commands take (training, analysis inputs, sharpness measures,
comparison sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from landscape.distributed import check_device_name
from landscape.sharpness import MEASURES, MeasureSettings

from ..analyses import Inputs
from ..subjects import Subject, callable_subject
from ..compare import CompareConfig
from ..data import BUILT_IN_DATASETS, DATASET_NAMES
from ..models import TIMM_PREFIX, available_models, is_timm
from ..optim import BASE_OPTIMIZERS, available_optimizers
from ..presets import preset_config
from ..trainer import AMP_MODES, DEFAULT_MODELS, SCHEDULES, TrainConfig, resolve_device

PROG = "sam-landscape"
EXIT_USAGE = 2
T = TypeVar("T")

_TRAIN_HELP: dict[str, str] = {
    "dataset": "dataset to train on; digits is scikit-learn's bundled 8x8 handwritten digits, mnist1d is MNIST-1D "
    "from its procedural generator (neither downloads anything)",
    "data_root": "directory holding the CIFAR files (cifar-10-batches-py/ or cifar-100-python/); for mnist1d, where "
    "the generated data are cached",
    "download": "download CIFAR into --data-root if missing (needs the [vision] extra: torchvision)",
    "label_noise": "fraction of training labels flipped to another class (symmetric noise, seeded)",
    "augment": "pad-4 random crop + flip on the device; default: on for CIFAR, off for digits and mnist1d",
    "test_fraction": "held-out fraction of digits used as the test split (stratified)",
    "classes": "keep only these classes (comma-separated labels, ranges such as 5-9), relabelled 0..k-1 in the "
    "order given, in the training and test splits; default: every class",
    "model": "network architecture, or timm:NAME for timm's model NAME (the model of --init-from timm:NAME); "
    "default: the dataset's own (digits_cnn; mnist1d_mlp for mnist1d)",
    "batchnorm": "use BatchNorm (--no-batchnorm builds the variant without it)",
    "skip": "use skip connections (--no-skip builds Li et al.'s noshort ResNets)",
    "image_size": "the model upsamples its input images to this size first (224 for an ImageNet model on "
    "CIFAR's 32x32); default: the dataset's size",
    "init_from": "finetune: start from these weights instead of a random initialisation: a run directory of "
    "train (its model.pt), a weights file (a state_dict saved with torch.save, or .safetensors), or timm:NAME for "
    "timm's pretrained weights, read from the local Hugging Face or timm cache (never downloaded)",
    "reset_head": "with --init-from: start the classification head afresh for this dataset's classes (needed "
    "when their number differs from the init's)",
    "optimizer": "plain base optimizer or SAM variant",
    "base_optimizer": "the base optimizer a SAM variant wraps",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum (SGD)",
    "weight_decay": "weight decay of the base optimizer",
    "rho": "SAM radius rho; default: the optimizer's own (0.05, ASAM 0.5)",
    "eta": "ASAM offset eta in T = |w| + eta",
    "p": "norm of the SAM ball (2 or inf)",
    "m": "m-SAM: examples per perturbation chunk",
    "gsam_alpha": "GSAM: weight alpha of the surrogate-gap term",
    "rho_min": "GSAM: rho at the smallest lr (rho follows the lr schedule); default keeps rho constant",
    "ascent_steps": "multistep_sam: number of ascent steps",
    "sam_every": "every_k_sam: do a SAM step every k steps (plain steps between)",
    "sync_perturbation": "under torchrun/DDP: average pass 1's gradient so every replica takes one "
    "perturbation from the global batch (default: each replica perturbs with its own share, m = per-replica batch)",
    "epochs": "number of training epochs",
    "batch_size": "mini-batch size",
    "schedule": "learning-rate schedule, stepped every iteration",
    "warmup_epochs": "linear warm-up length in epochs",
    "lr_milestones": "step schedule: fractions of training at which lr is multiplied by --lr-gamma",
    "lr_gamma": "step schedule: lr multiplier at each milestone",
    "label_smoothing": "label smoothing of the training loss",
    "max_grad_norm": "clip the final gradient to this L2 norm (SAM's perturbation uses the raw gradient)",
    "amp": "mixed precision: bf16 autocast, or fp16 autocast with a GradScaler; auto is bf16 on a CUDA GPU that "
    "supports it, else none",
    "compile": "run the model's passes (SAM's both) through torch.compile; the first steps compile, later ones are "
    "faster",
    "channels_last": "channels-last memory format for the model and its input images (faster convolutions on GPU "
    "Tensor Cores); default: on for image models on CUDA",
    "seed": "seed for initialisation, data order, augmentation and label noise",
    "device": "auto (cuda if available, else cpu), cpu, cuda or cuda:N",
    "snapshot_every": "save the weights every N epochs in snapshots/ for trajectory analysis (0: never)",
    "eval_batch_size": "batch size for evaluation",
}

_CHOICES: dict[str, Sequence[str]] = {
    "dataset": DATASET_NAMES,
    "optimizer": available_optimizers(),
    "base_optimizer": sorted(BASE_OPTIMIZERS),
    "schedule": SCHEDULES,
    "amp": AMP_MODES,
}


_MODELS_METAVAR = "{" + ",".join(available_models()) + f",{TIMM_PREFIX}NAME}}"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG CMD: error: MESSAGE (see --help)``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: ...)`` where a default means something: never to a flag that switches a behaviour
    on or off (``--resume``, ``--no-progress``), whose help says what it does; ``on``/``off`` for
    ``--x/--no-x`` pairs."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or "(default" in help_text
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))):
            return help_text
        if isinstance(action, argparse.BooleanOptionalAction):
            return help_text + (" (default: on)" if action.default else " (default: off)")
        return super()._get_help_string(action)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


_NAMED = re.compile(r"^(?:(?P<unknown>unknown )(?P<choice>[a-z][a-z0-9_]*) |(?P<name>[a-z][a-z0-9_]*)(?= must | are ))")


def named_by_flag(build: Callable[[], T], names: Iterable[str], flags: Mapping[str, str] | None = None) -> T:
    """``build()`` (a settings dataclass made from the flags), its error prefixed with the flag to change.

    The dataclasses name their fields (``epochs must be an integer >= 1``); on the command line the
    message starts with the flag too (``--epochs: epochs must be an integer >= 1``). ``names`` are the
    fields that have a flag of the same name with dashes; ``flags`` maps other names (``ms`` is ``--m``).

    Example:
        >>> named_by_flag(lambda: TrainConfig(epochs=0), ["epochs"])
        Traceback (most recent call last):
        ...
        ValueError: --epochs: epochs must be an integer >= 1; got 0
    """
    known = {name: "--" + name.replace("_", "-") for name in names} | dict(flags or {})
    try:
        return build()
    except ValueError as error:
        message = str(error)
        found = _NAMED.match(message)
        name = found and (found["choice"] or found["name"])
        if name not in known:
            raise
        flag = known[name]
        raise ValueError(f"{flag}: {message}") from None


def add_command(commands: Any, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the shared error handling and help formatting."""
    return commands.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="print no progress (by default: a live bar on a terminal, and plain lines, one per epoch "
                        "or per 10%% of an analysis, when the output goes to a file or a pipe)")


def positive_float(value: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {value}")
    return number


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {number}")
    return number


def model_name(value: str) -> str:
    """An argparse type: a registered model, or ``timm:NAME``."""
    if value in available_models() or (is_timm(value) and value != TIMM_PREFIX):
        return value
    raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from "
                                     f"{', '.join(map(repr, available_models()))}, or {TIMM_PREFIX}NAME)")


def class_list(value: str) -> list[int]:
    """An argparse type: class labels, comma-separated, with inclusive ranges (``0,2,5-9``).

    Example:
        >>> class_list("0,2,5-7")
        [0, 2, 5, 6, 7]
    """
    labels: list[int] = []
    for part in value.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            labels += list(range(int(first), int(last) + 1)) if dash else [int(first)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes class labels separated by commas, with ranges such as 5-9 "
                                             f"(0,1,2 or 5-9); got {value!r}") from None
    return labels


def device_name(value: str) -> str:
    """An argparse type: ``auto`` or a device torch knows (``torch.device`` would raise a RuntimeError later)."""
    try:
        return check_device_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# ------------------------------------------------------------------------------------------- training


class _Explicit:
    """Mixin for argparse actions: adds the flag's ``dest`` to ``namespace.explicit`` when it is given.

    A preset's values are overridden only by flags the user typed, also when a typed value equals the
    flag's default (``--preset c10-wrn28-10-sam --epochs 30`` trains 30 epochs, not 200).
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]
        namespace.explicit = frozenset({*getattr(namespace, "explicit", ()), self.dest})


class _StoreExplicit(_Explicit, argparse._StoreAction):
    pass


class _BooleanExplicit(_Explicit, argparse.BooleanOptionalAction):
    pass


_DEVICE_DEFAULTS = {"amp": "auto", "channels_last": None}
"""The TrainConfig fields whose default depends on the device: their flags default to the undecided value."""

_TYPES: dict[str, tuple[Callable[[str], Any], str | None]] = {
    "model": (model_name, _MODELS_METAVAR),
    "classes": (class_list, "C1,C2,..."),
    "image_size": (positive_int, "PIXELS"),
    "init_from": (str, "RUN|FILE|timm:NAME"),
    "data_root": (str, None),
    "device": (device_name, None),
}
"""The TrainConfig fields whose flags parse their value with a function of their own (and their metavar)."""


def add_train_flags(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None,
                    exclude: Sequence[str] = ()) -> None:
    """One flag per :class:`TrainConfig` field (but ``exclude``), with ``defaults``' values as defaults."""
    defaults = TrainConfig() if defaults is None else defaults
    parser.set_defaults(explicit=frozenset())
    device_decided = TrainConfig(device=defaults.device)  # what the device-dependent fields resolve to
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "model" and default == DEFAULT_MODELS[defaults.dataset]:
            default = None  # the dataset's own, resolved by TrainConfig once --dataset is known
        if f.name in _DEVICE_DEFAULTS and default == getattr(device_decided, f.name):
            default = _DEVICE_DEFAULTS[f.name]  # decided by TrainConfig once --device is known
        kwargs: dict[str, Any] = {"dest": f.name, "help": _TRAIN_HELP[f.name], "default": default,
                                  "action": _StoreExplicit}
        if f.name in _CHOICES:
            kwargs.update(choices=list(_CHOICES[f.name]), metavar="{" + ",".join(_CHOICES[f.name]) + "}")
        if isinstance(default, bool) or f.name in ("augment", "channels_last"):
            kwargs["action"] = _BooleanExplicit
        elif f.name in _TYPES:
            kwargs["type"], kwargs["metavar"] = _TYPES[f.name]
        elif isinstance(default, list):
            kwargs.update(type=float, nargs="+")
        elif f.name in ("rho", "rho_min", "max_grad_norm") or isinstance(default, float):
            kwargs["type"] = float
        elif isinstance(default, int):
            kwargs["type"] = int
        parser.add_argument(flag, **kwargs)


def resolve_train_config(args: argparse.Namespace, defaults: TrainConfig | None = None) -> TrainConfig:
    """The TrainConfig of the parsed flags: ``--preset``'s values overridden by the flags given explicitly, or
    every flag's value (its default where not given)."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    if getattr(args, "preset", None) is not None:
        return named_by_flag(lambda: preset_config(args.preset, **{k: getattr(args, k) for k in fields
                                                                    if k in args.explicit}), fields)
    values = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if values.get("dataset", "digits") not in BUILT_IN_DATASETS and values.get("data_root") is None \
            and not values.get("download"):
        folder = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/"}.get(values["dataset"], "the files")
        raise ValueError(f"--dataset {values['dataset']} is read from files: pass --data-root DIR (the directory "
                         f"holding {folder}) or --download to fetch it there")
    return named_by_flag(lambda: dataclasses.replace(TrainConfig() if defaults is None else defaults, **values),
                         fields)


# ------------------------------------------------------------------------------------------- analyses


def add_analysis_flags(parser: argparse.ArgumentParser, name: str, *, batch_help: str = "examples per forward pass",
                       seed_help: str = "seed of the random vectors") -> None:
    """The flags of the analysis commands: which model and data, how evaluated, where written."""
    parser.add_argument("checkpoint", type=Path, nargs="?", default=None,
                        help="run directory, or a model.pt / snapshot inside one (or give --model and --data)")
    parser.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                        help="your own model instead of a run: a callable returning it, weights loaded "
                        "(mypkg.models:build, or models.py:build); needs --data and --out")
    parser.add_argument("--data", default=None, metavar="MODULE:CALLABLE",
                        help="with --model: a callable returning a DataLoader, a Dataset, tensors or a list of batches "
                        "(called with split='train' or 'test' when it takes a split argument)")
    parser.add_argument("--loss", default="cross_entropy", metavar="NAME",
                        help="with --model: cross_entropy, token_cross_entropy (logits [B, T, V], -100 ignored), "
                        "causal_lm (next-token), model (the model's own loss, Hugging Face style) or MODULE:CALLABLE")
    parser.add_argument("--params", nargs="+", default=None, metavar="NAME",
                        help="analyse these parameters only: names or patterns such as 'classifier.*' (default: every "
                        "trainable one)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="read the data again on every pass, one batch on the device at a time (default: when they "
                        "exceed --memory-budget)")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                        help="gigabytes the data may take on the device before they are streamed (default: a quarter of "
                        "its memory)")
    parser.add_argument("--split", choices=["train", "test"], default="train", help="data split to analyse")
    parser.add_argument("--batch-size", type=positive_int, default=2048, help=batch_help)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="precision of the analysis")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write the {name} files (default: the run directory)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace existing {name} results")
    add_progress_flag(parser)


def analysis_inputs(args: argparse.Namespace) -> Inputs:
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise ValueError(f"--memory-budget takes a number of gigabytes > 0; got {args.memory_budget}")
    budget = int(args.memory_budget * 2**30) if args.memory_budget is not None else None
    return named_by_flag(lambda: Inputs(split=args.split, batch_size=args.batch_size, dtype=args.dtype,
                                        device=args.device, params=tuple(args.params) if args.params is not None
                                        else None, stream=args.stream, memory_budget=budget),
                         ["split", "batch_size", "dtype", "device", "params", "memory_budget"])


def analysis_subject(args: argparse.Namespace) -> Path | Subject:
    """The run directory (or checkpoint) of an analysis command, or the model and data of ``--model``/``--data``."""
    if args.model is None:
        if args.data is not None or args.loss != "cross_entropy":
            raise ValueError("--data and --loss go with --model (your own model); a run brings its own data and loss")
        if args.checkpoint is None:
            raise ValueError("give a run directory (or a checkpoint inside one), or --model and --data")
        return args.checkpoint
    if args.checkpoint is not None:
        raise ValueError(f"give either a run ({args.checkpoint}) or --model, not both")
    if args.data is None:
        raise ValueError("--model needs --data MODULE:CALLABLE, the data to analyse it on")
    if args.out is None:
        raise ValueError("--model has no run directory to write into: pass --out DIR")
    return callable_subject(args.model, args.data, args.loss, device=resolve_device(args.device))


def add_measure_flags(parser: argparse.ArgumentParser, defaults: MeasureSettings = MeasureSettings()) -> None:
    """Flags of :class:`landscape.sharpness.MeasureSettings`."""
    parser.add_argument("--measures", nargs="+", choices=list(MEASURES), default=list(defaults.measures),
                        help="measures to compute")
    parser.add_argument("--m", dest="ms", type=int, nargs="+", default=list(defaults.ms),
                        help="chunk sizes m of the worst-case measures")
    parser.add_argument("--rho", type=float, default=defaults.rho, help="radius of plain l2 m-sharpness")
    parser.add_argument("--adaptive-rho", type=float, default=defaults.adaptive_rho,
                        help="radius of adaptive l2 sharpness (c = |w|)")
    parser.add_argument("--adaptive-rho-inf", type=float, default=defaults.adaptive_rho_inf,
                        help="radius of adaptive l-inf sharpness")
    parser.add_argument("--average-rho", type=float, default=defaults.average_rho,
                        help="noise scale of average-case adaptive sharpness")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="ascent steps of the worst-case measures (1: the SAM step)")
    parser.add_argument("--ascent", choices=["pgd", "apgd"], default=defaults.ascent,
                        help="projected gradient ascent or Auto-PGD")
    parser.add_argument("--n-samples", type=int, default=defaults.n_samples, help="noise draws of average-case sharpness")
    parser.add_argument("--keskar-epsilon", type=float, default=defaults.keskar_epsilon, help="Keskar box size epsilon")
    parser.add_argument("--keskar-steps", type=int, default=defaults.keskar_steps, help="Auto-PGD steps of Keskar sharpness")
    parser.add_argument("--pac-bayes-samples", type=int, default=defaults.pac_bayes_samples,
                        help="noise draws per sigma of PAC-Bayes flatness")
    parser.add_argument("--pac-bayes-iterations", type=int, default=defaults.pac_bayes_iterations,
                        help="bisection steps on sigma")


def measure_settings(args: argparse.Namespace) -> MeasureSettings:
    names = [f.name for f in dataclasses.fields(MeasureSettings)]
    values = {name: tuple(getattr(args, name)) if name in ("measures", "ms") else getattr(args, name) for name in names}
    return named_by_flag(lambda: MeasureSettings(**values), names, {"ms": "--m", "m": "--m"})


# ------------------------------------------------------------------------------------------- comparing


def add_compare_flags(parser: argparse.ArgumentParser) -> None:
    """The sizes of :class:`sam.compare.CompareConfig` (``compare`` and ``demo``)."""
    defaults = CompareConfig()
    parser.add_argument("--surface-steps", type=int, default=defaults.surface_steps, help="2D grid points per axis")
    parser.add_argument("--slice-steps", type=int, default=defaults.slice_steps, help="1D slice points")
    parser.add_argument("--interpolation-steps", type=int, default=defaults.interpolation_steps,
                        help="interpolation points")
    parser.add_argument("--span", type=float, default=defaults.span, help="surfaces cover [-span, span] along each direction")
    parser.add_argument("--density-runs", type=int, default=defaults.density_runs, help="SLQ runs of the eigenvalue density")
    parser.add_argument("--density-steps", type=int, default=defaults.density_steps, help="Lanczos steps per SLQ run")
    parser.add_argument("--trace-matvecs", type=int, default=defaults.trace_matvecs,
                        help="Hessian-vector products of the trace")
    parser.add_argument("--m", dest="ms", type=int, nargs="+", default=list(defaults.ms), help="chunk sizes of m-sharpness")
    parser.add_argument("--rho", type=float, default=defaults.rho, help="radius of m-sharpness")
    parser.add_argument("--zmax", type=float, default=None, help="loss cap of the surface figures (default: the largest loss)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the directions and random vectors")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (cuda if available), cpu, cuda or cuda:N")
    add_progress_flag(parser)


def compare_config(args: argparse.Namespace) -> CompareConfig:
    return CompareConfig(surface_steps=args.surface_steps, slice_steps=args.slice_steps,
                         interpolation_steps=args.interpolation_steps, span=args.span, density_runs=args.density_runs,
                         density_steps=args.density_steps, trace_matvecs=args.trace_matvecs, ms=tuple(args.ms),
                         rho=args.rho, seed=args.seed, device=args.device, zmax=args.zmax)
