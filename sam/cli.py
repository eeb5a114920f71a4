"""The ``sam-landscape`` command line: a thin layer over the Python API.

Every ``train`` flag maps onto a :class:`sam.trainer.TrainConfig` field; the resolved config is saved
as ``config.json`` in the run directory. Errors in the input (a bad flag, an unknown model, a missing
dataset directory, a run directory that already holds a run) print one line and exit with code 2.

``train``, ``hessian`` and ``surface`` also run under ``torchrun --nproc_per_node N -m sam.cli ...``:
DDP training, Hessian products summed over data shards, surface points split across the processes;
rank 0 alone prints and writes (:mod:`sam.distributed`).

``train --preset NAME`` starts from one of the paper's runs (:mod:`sam.presets`; ``presets`` lists them),
explicit flags overriding its values; ``noise-study`` is :func:`sam.noise_study.run_noise_study`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from landscape.sharpness import MEASURES, MeasureSettings

from . import distributed
from .data import DATASET_NAMES
from .models import available_models
from .noise_study import STUDY_FIELDS, NoiseStudyConfig, default_recipe
from .optim import BASE_OPTIMIZERS, available_optimizers
from .presets import PRESETS, preset_config
from .study import StudyConfig
from .trainer import AMP_MODES, SCHEDULES, TrainConfig, TrainingDiverged, train

__all__ = ["main", "build_parser"]

PROG = "sam-landscape"
EXIT_USAGE = 2

DISTRIBUTED_COMMANDS = ("train", "hessian", "surface")  # the subcommands that run under torchrun

_TRAIN_HELP: dict[str, str] = {
    "dataset": "dataset to train on; digits is scikit-learn's bundled 8x8 handwritten digits (no download)",
    "data_root": "directory holding the CIFAR files (cifar-10-batches-py/ or cifar-100-python/)",
    "download": "download CIFAR into --data-root if missing (needs the [vision] extra: torchvision)",
    "label_noise": "fraction of training labels flipped to another class (symmetric noise, seeded)",
    "augment": "pad-4 random crop + flip on the device; default: on for CIFAR, off for digits",
    "test_fraction": "held-out fraction of digits used as the test split (stratified)",
    "model": "network architecture",
    "batchnorm": "use BatchNorm (--no-batchnorm builds the variant without it)",
    "skip": "use skip connections (--no-skip builds Li et al.'s noshort ResNets)",
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
    "amp": "mixed precision: bf16 autocast, or fp16 autocast with a GradScaler",
    "seed": "seed for initialisation, data order, augmentation and label noise",
    "device": "auto (cuda if available, else cpu), cpu, cuda or cuda:N",
    "snapshot_every": "save the weights every N epochs in snapshots/ for trajectory analysis (0: never)",
    "eval_batch_size": "batch size for evaluation",
}

_CHOICES: dict[str, Sequence[str]] = {
    "dataset": DATASET_NAMES,
    "model": available_models(),
    "optimizer": available_optimizers(),
    "base_optimizer": sorted(BASE_OPTIMIZERS),
    "schedule": SCHEDULES,
    "amp": AMP_MODES,
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG CMD: error: MESSAGE (see --help)``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or action.option_strings == ["-h", "--help"]:
            return help_text
        if isinstance(action, argparse.BooleanOptionalAction):
            return help_text + (" (default: on)" if action.default else " (default: off)")
        return super()._get_help_string(action)


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


def _add_train_flags(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None,
                     exclude: Sequence[str] = ()) -> None:
    """One flag per :class:`TrainConfig` field (but ``exclude``), with ``defaults``' values as defaults."""
    defaults = TrainConfig() if defaults is None else defaults
    parser.set_defaults(explicit=frozenset())
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "help": _TRAIN_HELP[f.name], "default": default,
                                  "action": _StoreExplicit}
        if f.name in _CHOICES:
            kwargs.update(choices=list(_CHOICES[f.name]), metavar="{" + ",".join(_CHOICES[f.name]) + "}")
        if isinstance(default, bool) or f.name == "augment":
            kwargs["action"] = _BooleanExplicit
        elif isinstance(default, list):
            kwargs.update(type=float, nargs="+")
        elif f.name == "data_root":
            kwargs["type"] = str
        elif f.name in ("rho", "rho_min", "max_grad_norm") or isinstance(default, float):
            kwargs["type"] = float
        elif isinstance(default, int):
            kwargs["type"] = int
        parser.add_argument(flag, **kwargs)


def _resolve_train_config(args: argparse.Namespace, defaults: TrainConfig | None = None) -> TrainConfig:
    """The TrainConfig of the parsed flags: ``--preset``'s values overridden by the flags given explicitly, or
    every flag's value (its default where not given)."""
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    if getattr(args, "preset", None) is not None:
        return preset_config(args.preset, **{k: getattr(args, k) for k in fields if k in args.explicit})
    values = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if values.get("dataset", "digits") != "digits" and values.get("data_root") is None and not values.get("download"):
        folder = {"cifar10": "cifar-10-batches-py/", "cifar100": "cifar-100-python/"}.get(values["dataset"], "the files")
        raise ValueError(f"--dataset {values['dataset']} is read from files: pass --data-root DIR (the directory "
                         f"holding {folder}) or --download to fetch it there")
    return dataclasses.replace(TrainConfig() if defaults is None else defaults, **values)


def build_parser() -> argparse.ArgumentParser:
    """The ``sam-landscape`` parser with its subcommands."""
    parser = _Parser(prog=PROG, description="Train with SGD and SAM, then analyse the minima they reach.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    train_parser = sub.add_parser(
        "train",
        help="train a model with SGD or a SAM variant",
        description="Train a model with SGD or a SAM variant; writes model.pt, state.pt, metrics.jsonl and "
        "config.json into --out.",
        formatter_class=_HelpFormatter,
    )
    train_parser.add_argument("--out", type=Path, required=True, help="run directory to write (must be new unless --resume)")
    train_parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (start it if there is none)")
    train_parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    train_parser.add_argument("--preset", choices=list(PRESETS), default=None, metavar="NAME",
                              help="start from a paper preset (sam-landscape presets lists them); every flag given "
                              "explicitly overrides the preset's value")
    _add_train_flags(train_parser)
    train_parser.set_defaults(handler=_run_train)

    hessian_parser = sub.add_parser(
        "hessian",
        help="Hessian spectrum of a trained model: top eigenvalues, trace, eigenvalue density",
        description="Top-k Hessian eigenvalues (Lanczos on exact Hessian-vector products), trace (Hutch++) "
        "and, with --density, the eigenvalue density (stochastic Lanczos quadrature) of the training loss "
        "of a saved run. Writes hessian.json and hessian.npz beside the run (or into --out).",
        formatter_class=_HelpFormatter,
    )
    hessian_parser.add_argument("checkpoint", type=Path, help="run directory, or a model.pt / snapshot inside one")
    hessian_parser.add_argument("--k", type=int, default=5, help="number of eigenvalues")
    hessian_parser.add_argument("--which", choices=["LA", "SA", "LM"], default="LA",
                                help="largest (LA), most negative (SA) or largest-magnitude (LM) eigenvalues")
    hessian_parser.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance ||Hv - lv|| <= tol |l|")
    hessian_parser.add_argument("--method", choices=["lanczos", "arpack", "power"], default="lanczos", help="eigensolver")
    hessian_parser.add_argument("--max-matvecs", type=int, default=None, help="budget of Hessian-vector products (default: the solver's)")
    hessian_parser.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True, help="estimate the trace")
    hessian_parser.add_argument("--trace-method", choices=["hutch++", "hutchinson"], default="hutch++", help="trace estimator")
    hessian_parser.add_argument("--trace-matvecs", type=int, default=99, help="Hessian-vector products for the trace")
    hessian_parser.add_argument("--density", action="store_true", help="also compute the eigenvalue density (SLQ)")
    hessian_parser.add_argument("--density-runs", type=int, default=10, help="SLQ: number of random start vectors")
    hessian_parser.add_argument("--density-steps", type=int, default=80, help="SLQ: Lanczos steps per run")
    _add_analysis_flags(hessian_parser, name="hessian")
    hessian_parser.set_defaults(handler=_run_hessian)

    surface_parser = sub.add_parser(
        "surface",
        help="loss surface around a trained model: filter-normalised 1D/2D slices or an interpolation",
        description="Loss and accuracy on a 1D or 2D slice through the weights along seeded filter-normalised "
        "random directions (Li et al. 2018), or along the line to another model (--interpolate). The grid is "
        "saved as it fills (surface_1d/surface_2d/interpolation .npz + .json, with a _test suffix for "
        "--split test) and a rerun resumes it.",
        formatter_class=_HelpFormatter,
    )
    surface_parser.add_argument("checkpoint", type=Path, help="run directory, or a model.pt / snapshot inside one")
    surface_parser.add_argument("--dim", type=int, choices=[1, 2], default=None, help="1D or 2D slice (default 2)")
    surface_parser.add_argument("--steps", type=int, default=51, help="grid points per axis")
    surface_parser.add_argument("--span", type=float, nargs=2, default=[-1.0, 1.0], metavar=("LOW", "HIGH"),
                                help="range of each coordinate (interpolation: of t)")
    surface_parser.add_argument("--norm", choices=["filter", "layer", "model", "none"], default=None,
                                help="normalisation of random directions (default filter)")
    surface_parser.add_argument("--ignore", choices=["biasbn", "none"], default=None,
                                help="random directions: biasbn (default) zeroes them on biases and norm parameters")
    surface_parser.add_argument("--orthogonal", action="store_true", help="orthogonalise the second direction")
    surface_parser.add_argument("--directions", choices=["random", "hessian", "pca"], default="random",
                                help="random: seeded filter-normalised; hessian: top Hessian eigenvectors; "
                                "pca: principal directions of the run's snapshots/ (trajectory saved in the JSON)")
    surface_parser.add_argument("--compare", type=Path, default=None,
                                help="another run: the same direction recipe on its minimum (written beside it)")
    surface_parser.add_argument("--interpolate", type=Path, default=None,
                                help="another run: the loss along w_a + t (w_b - w_a) instead of a random slice")
    surface_parser.add_argument("--interpolate-buffers", choices=["interpolate", "a"], default=None,
                                help="interpolation: move BatchNorm statistics along the line too, or keep the first run's")
    surface_parser.add_argument("--points-per-pass", type=int, default=None,
                                help="grid points per vmapped forward pass (default: 1, the plain loop, on CPU; sized to free memory on GPU)")
    surface_parser.add_argument("--bf16", action="store_true", help="evaluate under bf16 autocast")
    surface_parser.add_argument("--plot", action="store_true",
                                help="also draw the surfaces (PNG + PDF, and one self-contained HTML) into --out or the first run")
    _add_analysis_flags(surface_parser, name="surface")
    surface_parser.set_defaults(handler=_run_surface)

    sharpness_parser = sub.add_parser(
        "sharpness",
        help="sharpness of a trained model: m-sharpness, adaptive, average-case, Keskar, PAC-Bayes, lambda_max",
        description="Sharpness measures of a saved run on its training split (or --split test): worst-case "
        "m-sharpness for every --m (plain l2, adaptive l2 and adaptive l-inf, vectorised over chunks of m "
        "examples), average-case adaptive sharpness, Keskar epsilon-sharpness, PAC-Bayes flatness and the "
        "top Hessian eigenvalue. Writes sharpness.json (and per-chunk values in sharpness.npz) beside the run.",
        formatter_class=_HelpFormatter,
    )
    sharpness_parser.add_argument("checkpoint", type=Path, help="run directory, or a model.pt / snapshot inside one")
    _add_measure_flags(sharpness_parser)
    _add_analysis_flags(sharpness_parser, name="sharpness")
    sharpness_parser.set_defaults(handler=_run_sharpness)

    study_parser = sub.add_parser(
        "study",
        help="sharpness vs generalization: train a family of models, measure them, Kendall tau per measure and m",
        description="Train models on the same data with different learning rates, batch sizes, weight decays, "
        "optimizers (sgd, sam, asam) and rhos; compute the generalization gap and every sharpness measure of "
        "each; write study.csv, kendall.csv and study.json (Kendall tau between each measure and the gap, as a "
        "function of m) into --out. Rerunning resumes: finished models are not retrained or remeasured. The "
        "default (24 digits models, 15 epochs) took 9 minutes on a 2-core CPU; widen the grid and "
        "--epochs on a GPU.",
        formatter_class=_HelpFormatter,
    )
    study_defaults = StudyConfig()
    study_parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study directory")
    study_parser.add_argument("--optimizers", nargs="+", choices=["sgd", "sam", "asam"], default=study_defaults.optimizers,
                              help="optimizers in the family")
    study_parser.add_argument("--rhos", nargs="+", default=[f"{k}={','.join(f'{r:g}' for r in v)}" for k, v in study_defaults.rhos.items()],
                              metavar="NAME=R1,R2", help="rho values per SAM variant")
    study_parser.add_argument("--lrs", type=float, nargs="+", default=study_defaults.lrs, help="peak learning rates")
    study_parser.add_argument("--batch-sizes", type=int, nargs="+", default=study_defaults.batch_sizes, help="batch sizes")
    study_parser.add_argument("--weight-decays", type=float, nargs="+", default=study_defaults.weight_decays, help="weight decays")
    study_parser.add_argument("--epochs", type=int, default=study_defaults.epochs, help="epochs per model")
    study_parser.add_argument("--n-models", type=int, default=study_defaults.n_models,
                              help="models drawn (seeded) from the full grid; 0 trains the whole grid")
    study_parser.add_argument("--max-train-error", type=float, default=study_defaults.max_train_error,
                              help="models with a higher final training error are left out of the correlations (-1: keep all)")
    study_parser.add_argument("--dataset", choices=list(DATASET_NAMES), default="digits", help="dataset")
    study_parser.add_argument("--data-root", default=None, help="directory holding the CIFAR files")
    study_parser.add_argument("--model", choices=available_models(), default="digits_cnn", help="network architecture")
    study_parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    study_parser.add_argument("--seed", type=int, default=0, help="training seed, seed of the model draw and of the measures")
    _add_measure_flags(study_parser, study_defaults.measures)
    study_parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    study_parser.set_defaults(handler=_run_study)

    presets_parser = sub.add_parser(
        "presets",
        help="list the paper presets of train --preset: what each reproduces and the paper's number",
        description="The paper's runs as presets of sam-landscape train --preset NAME (Foret et al. 2021): the "
        "WRN-28-10 CIFAR-10/100 comparison, ResNet-32 under label noise, WRN-40-10 without BatchNorm for the "
        "Hessian, and the digits stand-ins. With NAME, print that preset's resolved TrainConfig as JSON.",
        formatter_class=_HelpFormatter,
    )
    presets_parser.add_argument("name", nargs="?", default=None, metavar="NAME",
                                help="a preset: print its paper numbers and full resolved config as JSON")
    presets_parser.set_defaults(handler=_run_presets)

    noise_defaults = NoiseStudyConfig()
    noise_parser = sub.add_parser(
        "noise-study",
        help="robustness to label noise: clean test accuracy of each optimizer at each noise rate (table + figure)",
        description="Train each optimizer at each symmetric label-noise rate (a fraction of the training labels "
        "flipped to another class, seeded; test labels clean) for each seed, then write noise_study.json/.csv "
        "(mean and spread over seeds of the clean test accuracy), noise_runs.csv and the figure label_noise "
        ".png/.pdf/.html into --out (Foret et al. 2021, Sec. 3.3). Runs live in OUT/runs/NAME; rerunning resumes: "
        "finished runs are not retrained, an interrupted one continues from its last epoch. The recipe of every run "
        "is the flags below (default: the digits CNN, 20 epochs, batch 128, lr 0.1; with 3 seeds about 5 minutes on a "
        "2-core CPU) or --preset's, with the optimizer, rho, noise rate and seed set per run.",
        formatter_class=_HelpFormatter,
    )
    noise_parser.add_argument("--out", type=Path, default=Path("runs/noise-study"), help="study directory")
    noise_parser.add_argument("--rates", type=float, nargs="+", default=noise_defaults.rates,
                              help="fractions of training labels flipped")
    noise_parser.add_argument("--optimizers", nargs="+", choices=available_optimizers(), default=noise_defaults.optimizers,
                              metavar="NAME", help=f"optimizers to compare ({', '.join(available_optimizers())})")
    noise_parser.add_argument("--seeds", type=int, nargs="+", default=noise_defaults.seeds,
                              help="seeds of every (optimizer, rate): initialisation, batch order and which labels flip")
    noise_parser.add_argument("--rhos", nargs="+", default=[f"{k}={v:g}" for k, v in noise_defaults.rhos.items()],
                              metavar="NAME=RHO", help="rho per SAM variant (others use their own default); the paper "
                              "uses 0.1 for SAM under label noise")
    noise_parser.add_argument("--preset", choices=list(PRESETS), default=None, metavar="NAME",
                              help="take the recipe from a paper preset (e.g. c10-resnet32-noise20-sgd); flags given "
                              "explicitly override it")
    noise_parser.add_argument("--threads", type=int, default=1,
                              help="CPU threads of torch (torch.set_num_threads; 0 keeps torch's default). One is as fast "
                              "for the digits CNN, and many times faster when other jobs share the CPU")
    noise_parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    _add_train_flags(noise_parser, defaults=noise_defaults.recipe, exclude=STUDY_FIELDS)
    noise_parser.set_defaults(handler=_run_noise_study)

    compare_parser = sub.add_parser(
        "compare",
        help="SGD vs SAM: run every analysis not yet saved, then write the figures and an HTML report",
        description="Compare two trained runs with the same recipes: Hessian spectrum and density, 2D surface and "
        "1D slice along the same seeded directions, interpolation between them (train and test), m-sharpness. "
        "Analyses are saved under OUT/analyses and reused; figures go to OUT as PNG and PDF, with a "
        "self-contained OUT/report.html.",
        formatter_class=_HelpFormatter,
    )
    compare_parser.add_argument("run_a", type=Path, help="the first run (e.g. SGD)")
    compare_parser.add_argument("run_b", type=Path, help="the second run (e.g. SAM)")
    compare_parser.add_argument("--out", type=Path, required=True, help="directory for analyses, figures and report.html")
    compare_parser.add_argument("--labels", nargs=2, default=["SGD", "SAM"], metavar=("A", "B"), help="names of the two runs")
    compare_parser.add_argument("--study", type=Path, default=None, help="a sam-landscape study directory: adds Kendall tau against m")
    compare_parser.add_argument("--noise-study", type=Path, default=None,
                                help="a label-noise study directory (or its noise_study.json): adds accuracy against noise")
    _add_compare_flags(compare_parser)
    compare_parser.set_defaults(handler=_run_compare)

    demo_parser = sub.add_parser(
        "demo",
        help="train SGD and SAM on digits and compare them (figures into figures/)",
        description="Train the digits CNN with SGD and with SAM (reusing finished runs in --runs), then run "
        "compare into --out: every figure as PNG and PDF and report.html. About 5 minutes on a 2-core CPU.",
        formatter_class=_HelpFormatter,
    )
    demo_parser.add_argument("--out", type=Path, default=Path("figures"), help="directory for the figures and report.html")
    demo_parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the two runs are trained")
    demo_parser.add_argument("--epochs", type=int, default=30, help="training epochs of each run")
    _add_compare_flags(demo_parser)
    demo_parser.set_defaults(handler=_run_demo)
    return parser


def _add_compare_flags(parser: argparse.ArgumentParser) -> None:
    from .compare import CompareConfig

    defaults = CompareConfig()
    parser.add_argument("--surface-steps", type=int, default=defaults.surface_steps, help="2D grid points per axis")
    parser.add_argument("--slice-steps", type=int, default=defaults.slice_steps, help="1D slice points")
    parser.add_argument("--interpolation-steps", type=int, default=defaults.interpolation_steps, help="interpolation points")
    parser.add_argument("--span", type=float, default=defaults.span, help="surfaces cover [-span, span] along each direction")
    parser.add_argument("--density-runs", type=int, default=defaults.density_runs, help="SLQ runs of the eigenvalue density")
    parser.add_argument("--density-steps", type=int, default=defaults.density_steps, help="Lanczos steps per SLQ run")
    parser.add_argument("--trace-matvecs", type=int, default=defaults.trace_matvecs, help="Hessian-vector products of the trace")
    parser.add_argument("--m", dest="ms", type=int, nargs="+", default=list(defaults.ms), help="chunk sizes of m-sharpness")
    parser.add_argument("--rho", type=float, default=defaults.rho, help="radius of m-sharpness")
    parser.add_argument("--zmax", type=float, default=None, help="loss cap of the surface figures (default: the largest loss)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the directions and random vectors")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _compare_config(args: argparse.Namespace) -> Any:
    from .compare import CompareConfig

    return CompareConfig(surface_steps=args.surface_steps, slice_steps=args.slice_steps,
                         interpolation_steps=args.interpolation_steps, span=args.span, density_runs=args.density_runs,
                         density_steps=args.density_steps, trace_matvecs=args.trace_matvecs, ms=tuple(args.ms),
                         rho=args.rho, seed=args.seed, device=args.device, zmax=args.zmax)


def _run_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    compare(args.run_a, args.run_b, args.out, _compare_config(args), labels=tuple(args.labels), study_dir=args.study,
            noise_study=args.noise_study, progress=args.progress)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .compare import demo

    demo(args.out, args.runs, epochs=args.epochs, device=args.device, config=_compare_config(args), progress=args.progress)
    return 0


def _add_measure_flags(parser: argparse.ArgumentParser, defaults: MeasureSettings = MeasureSettings()) -> None:
    """Flags of :class:`landscape.sharpness.MeasureSettings`."""
    parser.add_argument("--measures", nargs="+", choices=list(MEASURES), default=list(defaults.measures), help="measures to compute")
    parser.add_argument("--m", dest="ms", type=int, nargs="+", default=list(defaults.ms), help="chunk sizes m of the worst-case measures")
    parser.add_argument("--rho", type=float, default=defaults.rho, help="radius of plain l2 m-sharpness")
    parser.add_argument("--adaptive-rho", type=float, default=defaults.adaptive_rho, help="radius of adaptive l2 sharpness (c = |w|)")
    parser.add_argument("--adaptive-rho-inf", type=float, default=defaults.adaptive_rho_inf, help="radius of adaptive l-inf sharpness")
    parser.add_argument("--average-rho", type=float, default=defaults.average_rho, help="noise scale of average-case adaptive sharpness")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="ascent steps of the worst-case measures (1: the SAM step)")
    parser.add_argument("--ascent", choices=["pgd", "apgd"], default=defaults.ascent, help="projected gradient ascent or Auto-PGD")
    parser.add_argument("--n-samples", type=int, default=defaults.n_samples, help="noise draws of average-case sharpness")
    parser.add_argument("--keskar-epsilon", type=float, default=defaults.keskar_epsilon, help="Keskar box size epsilon")
    parser.add_argument("--keskar-steps", type=int, default=defaults.keskar_steps, help="Auto-PGD steps of Keskar sharpness")
    parser.add_argument("--pac-bayes-samples", type=int, default=defaults.pac_bayes_samples, help="noise draws per sigma of PAC-Bayes flatness")
    parser.add_argument("--pac-bayes-iterations", type=int, default=defaults.pac_bayes_iterations, help="bisection steps on sigma")


def _measure_settings(args: argparse.Namespace) -> MeasureSettings:
    names = [f.name for f in dataclasses.fields(MeasureSettings)]
    return MeasureSettings(**{name: tuple(getattr(args, name)) if name in ("measures", "ms") else getattr(args, name)
                              for name in names})


def _add_analysis_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """Flags shared by the analysis commands."""
    parser.add_argument("--split", choices=["train", "test"], default="train", help="data split to analyse")
    parser.add_argument("--batch-size", type=int, default=2048, help="examples per forward pass (one batch lets HVPs keep the gradient graph)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="precision of the analysis")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    parser.add_argument("--out", type=Path, default=None, help=f"where to write {name}.json/.npz (default: the run directory)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace existing {name} results")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _analysis_inputs(args: argparse.Namespace, name: str) -> tuple[Any, Any, Path, Any, Any]:
    """``(device, run, out, split, dtype)`` of an analysis command; refuses to overwrite ``OUT/name.json``."""
    import torch

    from landscape._results import result_paths

    from .trainer import load_run, resolve_device

    device = resolve_device(args.device)
    run = load_run(args.checkpoint, device=device)
    out = args.out or run.run_dir
    json_path, _ = result_paths(out, name)
    if json_path.exists() and not args.overwrite:
        raise FileExistsError(f"{json_path} already exists; pass --overwrite to replace it")
    split = run.train if args.split == "train" else run.test
    return device, run, out, split, {"float32": torch.float32, "float64": torch.float64}[args.dtype]


def _run_train(args: argparse.Namespace) -> int:
    config = _resolve_train_config(args)
    on_epoch_end = None
    if args.preset is not None:
        from ._io import atomic_write_json

        fields = [f.name for f in dataclasses.fields(TrainConfig)]
        provenance = {"preset": args.preset, "overrides": {k: getattr(args, k) for k in fields if k in args.explicit},
                      "reference": PRESETS[args.preset].reference, "paper": dict(PRESETS[args.preset].paper)}

        def save_provenance(epoch: int, metrics: dict[str, Any]) -> None:  # once train() has accepted the directory
            if distributed.is_main():  # under torchrun, rank 0 alone writes
                atomic_write_json(Path(args.out) / "preset.json", provenance)

        on_epoch_end = save_provenance

    result = train(config, args.out, resume=args.resume, progress=args.progress, on_epoch_end=on_epoch_end)
    if on_epoch_end is not None:
        on_epoch_end(config.epochs, result.final)
    final = result.final
    if not distributed.is_main():
        return 0
    print(
        f"{config.optimizer} on {config.dataset}/{config.model}: "
        f"train acc {final['train_acc']:.4f}, test acc {final['test_acc']:.4f}, "
        f"test loss {final['test_loss']:.4f}; run saved in {result.out_dir}"
    )
    return 0


def _run_presets(args: argparse.Namespace) -> int:
    from .presets import format_paper, format_presets

    if args.name is None:
        print(format_presets())
        print("\ntrain one with: sam-landscape train --preset NAME --out DIR [--data-root DIR] [--any-flag VALUE]")
        return 0
    if args.name not in PRESETS:
        raise ValueError(f"unknown preset {args.name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.name]
    values = {**dataclasses.asdict(TrainConfig()), **preset.config}  # what preset_config resolves to
    print(json.dumps({"preset": args.name, "description": preset.description, "reference": preset.reference,
                      "paper": dict(preset.paper), "paper_text": format_paper(preset.paper), "config": values}, indent=2))
    return 0


def _run_noise_study(args: argparse.Namespace) -> int:
    import time

    import torch

    from .noise_study import format_noise_table, run_noise_study

    rhos = {}
    for item in args.rhos:
        name, _, value = item.partition("=")
        try:
            rhos[name] = float(value)
        except ValueError:
            raise ValueError(f"--rhos takes NAME=RHO (e.g. sam=0.1 asam=1.0); got {item!r}") from None
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default); got {args.threads}")
    recipe = _resolve_train_config(args, default_recipe())
    config = NoiseStudyConfig(rates=args.rates, optimizers=args.optimizers, seeds=args.seeds, rhos=rhos, recipe=recipe)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or threads)
        result = run_noise_study(config, args.out, progress=args.progress)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a longer process (tests, notebooks)
    print(format_noise_table(result.table))
    print(f"{time.perf_counter() - start:.0f} s; wrote {', '.join(str(p) for p in result.files)}")
    return 0


def _run_hessian(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    import torch.nn.functional as F

    from landscape import hessian
    from landscape._results import save_results
    from landscape.objective import Objective

    for flag in ("k", "trace_matvecs", "density_runs", "density_steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    device, run, out, split, dtype = _analysis_inputs(args, "hessian")
    start = time.perf_counter()
    # Under torchrun each process holds a contiguous shard; one product is one all_reduce over them.
    mine = distributed.shard(len(split))
    data = (split.x[mine], split.y[mine])
    args.progress = args.progress and distributed.is_main()
    objective = Objective(run.model, F.cross_entropy, data, device=device, dtype=dtype, batch_size=args.batch_size,
                          distributed=True)
    op = objective.hessian_operator()
    problem = (run.model, F.cross_entropy, data)
    eig = hessian.top_eigenvalues(*problem, k=args.k, which=args.which, tol=args.tol, max_matvecs=args.max_matvecs,
                                  method=args.method, seed=args.seed, progress=args.progress, operator=op)
    scalars = {
        "checkpoint": str(run.checkpoint), "checkpoint_sha256": run.checkpoint_sha256, "split": args.split,
        "n_examples": objective.n_examples, "n_parameters": op.shape[0], "dtype": args.dtype, "device": str(device),
        "hvp_method": objective.hvp_method, "seed": args.seed, "eigen": eig.to_dict(),
        "processes": distributed.world_size(),
    }
    values = eig.eigenvalues.tolist()
    scalars["lambda_max"] = values[0]
    if len(values) >= 5 and args.which == "LA":
        scalars["lambda_max_over_lambda_5"] = values[0] / values[4]
    arrays = {"eigenvalues": np.asarray(values), "residuals": eig.residuals.numpy()}
    if args.trace:
        trace = hessian.hessian_trace(*problem, method=args.trace_method, n_matvecs=args.trace_matvecs,
                                      seed=args.seed, progress=args.progress, operator=op)
        scalars["trace"] = {"value": trace.value, "std_error": trace.std_error, "n_matvecs": trace.n_matvecs, "method": args.trace_method}
    if args.density:
        density = hessian.spectral_density(*problem, n_runs=args.density_runs, n_steps=args.density_steps,
                                           seed=args.seed, progress=args.progress, operator=op)
        scalars["density"] = {"n_runs": args.density_runs, "n_steps": args.density_steps, "sigma_squared": density.sigma_squared,
                              "n_matvecs": density.n_matvecs}
        arrays.update(density_grid=density.grid, density=density.density,
                      density_nodes=np.asarray(density.nodes, dtype=np.float64), density_weights=np.asarray(density.weights, dtype=np.float64))
    scalars["total_matvecs"] = op.n_matvecs
    scalars["seconds"] = time.perf_counter() - start
    if not distributed.is_main():
        return 0
    json_path, npz_path = save_results(out, "hessian", scalars, arrays, overwrite=args.overwrite)
    line = f"lambda_max {values[0]:.6g}"
    if "lambda_max_over_lambda_5" in scalars:
        line += f", lambda_max/lambda_5 {scalars['lambda_max_over_lambda_5']:.4g}"
    if args.trace:
        line += f", trace {scalars['trace']['value']:.6g} +- {scalars['trace']['std_error']:.2g}"
    print(f"{line} ({op.n_matvecs} Hessian-vector products, converged: {eig.converged}); wrote {json_path} and {npz_path}")
    return 0


def _run_sharpness(args: argparse.Namespace) -> int:
    import time

    import torch.nn.functional as F

    from landscape._results import save_results
    from landscape.sharpness import measure_all, measure_columns, sharpness_objective

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    settings = _measure_settings(args)
    device, run, out, split, dtype = _analysis_inputs(args, "sharpness")
    start = time.perf_counter()
    objective = sharpness_objective(run.model, F.cross_entropy, (split.x, split.y), dtype=dtype, device=device,
                                    batch_size=args.batch_size)
    loss, accuracy = objective.loss_and_accuracy()
    result = measure_all(objective, settings, progress=args.progress)
    per_chunk = result.pop("per_chunk")
    scalars = {"checkpoint": str(run.checkpoint), "checkpoint_sha256": run.checkpoint_sha256, "split": args.split,
               "n_examples": objective.n_examples, "dtype": args.dtype, "device": str(device), "loss": loss,
               "accuracy": accuracy, **result, "seconds": time.perf_counter() - start}
    json_path, npz_path = save_results(out, "sharpness", scalars, per_chunk, overwrite=args.overwrite)
    for name, value in measure_columns(result).items():
        print(f"{name:<24} {value:.6g}")
    print(f"wrote {json_path} and {npz_path}")
    return 0


def _parse_rhos(values: Sequence[str]) -> dict[str, list[float]]:
    rhos = {}
    for item in values:
        name, _, numbers = item.partition("=")
        try:
            rhos[name] = [float(v) for v in numbers.split(",")]
        except ValueError:
            raise ValueError(f"--rhos takes NAME=R1,R2 (e.g. sam=0.05,0.1); got {item!r}") from None
        if not numbers or name not in ("sam", "asam"):
            raise ValueError(f"--rhos takes NAME=R1,R2 with NAME sam or asam; got {item!r}")
    return rhos


def _run_study(args: argparse.Namespace) -> int:
    from .study import format_kendall, run_study

    config = StudyConfig(optimizers=args.optimizers, rhos=_parse_rhos(args.rhos), lrs=args.lrs,
                         batch_sizes=args.batch_sizes, weight_decays=args.weight_decays, epochs=args.epochs,
                         n_models=args.n_models or None, seed=args.seed,
                         max_train_error=None if args.max_train_error < 0 else args.max_train_error, dataset=args.dataset,
                         data_root=args.data_root, model=args.model, device=args.device,
                         measures=_measure_settings(args))
    result = run_study(config, args.out, progress=args.progress)
    print(format_kendall(result.kendall))
    print(f"wrote {args.out / 'study.csv'}, {args.out / 'kendall.csv'} and {args.out / 'study.json'}")
    return 0


def _run_surface(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from landscape import surface

    from .trainer import load_run, resolve_device

    if args.steps < 2 or (args.points_per_pass is not None and args.points_per_pass < 1) or args.batch_size < 1:
        raise ValueError("--steps must be >= 2, --points-per-pass and --batch-size >= 1")
    if args.compare is not None and args.interpolate is not None:
        raise ValueError("use either --compare or --interpolate, not both")
    _check_direction_flags(args)
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    main_process = distributed.is_main()
    args.progress = args.progress and main_process
    # Under torchrun the grid points are split across the processes and rank 0 writes the file.
    common = dict(points_per_pass=args.points_per_pass, autocast_dtype=torch.bfloat16 if args.bf16 else None,
                  dtype=dtype, device=device, batch_size=args.batch_size, progress=args.progress, distributed=True)
    runs = [load_run(args.checkpoint, device=device)]
    if args.compare is not None:
        runs.append(load_run(args.compare, device=device))
    if args.interpolate is not None:
        other = load_run(args.interpolate, device=device)
        todo = [runs[0]]
    else:
        todo = runs
    # one file per kind of directions and split: surface_2d (random, train), surface_2d_test,
    # surface_2d_pca, surface_1d_hessian_test, interpolation, interpolation_test
    kind = "" if args.interpolate is not None or args.directions == "random" else f"_{args.directions}"
    name = ("interpolation" if args.interpolate is not None else f"surface_{args.dim}d{kind}") + (
        "_test" if args.split == "test" else "")
    labels = [run.run_dir.name for run in todo]
    if len(set(labels)) < len(labels):  # --compare a/seed0 b/seed0 --out DIR: keep the two apart
        labels = [f"{i}-{label}" for i, label in enumerate(labels)]
    results = {}
    for run, label in zip(todo, labels):
        out = args.out if args.out is not None else run.run_dir
        if args.out is not None and len(todo) > 1:
            out = args.out / label
        path = Path(out) / name
        if args.overwrite and main_process:
            for suffix in (".npz", ".json", ".directions.pt"):
                path.with_suffix(suffix).unlink(missing_ok=True)
        distributed.barrier()
        split = run.train if args.split == "train" else run.test
        data = (split.x, split.y)
        if args.interpolate is not None:
            result = surface.interpolate(run.model, other.model, F.cross_entropy, data, steps=args.steps,
                                         span=tuple(args.span), path=path, buffers=args.interpolate_buffers, **common)
        elif args.directions != "random":
            given, info = _given_surface_directions(args, run, data, dtype, device, path)
            path_coords = [c for point in info.get("coordinates", []) for c in point]
            if main_process and path_coords and not args.span[0] <= min(path_coords) <= max(path_coords) <= args.span[1]:
                print(f"note: the training path spans {min(path_coords):.3g} to {max(path_coords):.3g} along the PCA "
                      f"directions, beyond --span {args.span[0]:g} {args.span[1]:g}; widen --span to draw all of it",
                      file=sys.stderr)
            result = (surface.slice_1d(run.model, F.cross_entropy, data, given[0], steps=args.steps,
                                       span=tuple(args.span), path=path, model_id=run.checkpoint_sha256,
                                       info={args.directions: info}, **common)
                      if args.dim == 1 else
                      surface.slice_2d(run.model, F.cross_entropy, data, tuple(given), steps=(args.steps, args.steps),
                                       span=(tuple(args.span), tuple(args.span)), path=path,
                                       model_id=run.checkpoint_sha256, info={args.directions: info}, **common))
        elif args.dim == 1:
            result = surface.slice_1d(run.model, F.cross_entropy, data, steps=args.steps, span=tuple(args.span),
                                      seed=args.seed, norm=args.norm, ignore=args.ignore, path=path,
                                      model_id=run.checkpoint_sha256, **common)
        else:
            result = surface.slice_2d(run.model, F.cross_entropy, data, steps=(args.steps, args.steps),
                                      span=(tuple(args.span), tuple(args.span)), seed=args.seed, norm=args.norm,
                                      ignore=args.ignore, orthogonal=args.orthogonal, path=path,
                                      model_id=run.checkpoint_sha256, **common)
        results[label] = result
        if not main_process:
            continue
        print(f"{run.run_dir}: loss {result.loss.min():.4g} to {result.loss.max():.4g} over "
              f"{result.loss.size} points; wrote {path.with_suffix('.npz')} and {path.with_suffix('.json')}")
    if args.plot and main_process:
        where = Path(args.out) if args.out is not None else todo[0].run_dir
        other_label = other.run_dir.name if args.interpolate is not None else None
        # named after what they show, so that A --compare B and A --compare C keep their own figures
        shown = [*labels, other_label] if other_label else labels
        stem = where / (name if len(shown) == 1 else f"{name}_{'_vs_'.join(shown)}")
        from landscape.plot import write_surface_report

        for written in write_surface_report(results, stem, split=args.split, other=other_label):
            print(f"wrote {written}")
    return 0


def _check_direction_flags(args: argparse.Namespace) -> None:
    """Refuses the flags that would be ignored with the others given, then fills in their defaults."""
    if args.interpolate is not None:
        for flag, value in (("--dim", args.dim), ("--directions", None if args.directions == "random" else args.directions)):
            if value is not None:
                raise ValueError(f"{flag} has no effect with --interpolate (a line between two models)")
    elif args.interpolate_buffers is not None:
        raise ValueError("--interpolate-buffers needs --interpolate")
    random_slice = args.interpolate is None and args.directions == "random"
    where = "--interpolate" if args.interpolate is not None else f"--directions {args.directions}"
    for flag, value in (("--norm", args.norm), ("--ignore", args.ignore), ("--orthogonal", args.orthogonal or None)):
        if value is not None and not random_slice:
            raise ValueError(f"{flag} shapes random directions only; it has no effect with {where}")
    if args.orthogonal and args.dim == 1:
        raise ValueError("--orthogonal needs two directions (--dim 2)")
    args.dim = args.dim or 2
    args.norm = args.norm or "filter"
    args.ignore = args.ignore or "biasbn"
    args.interpolate_buffers = args.interpolate_buffers or "interpolate"


def _given_surface_directions(
    args: argparse.Namespace, run: Any, data: Any, dtype: Any, device: Any, path: Path,
) -> tuple[list, dict]:
    """Hessian or PCA directions and what to save about them, computed once per surface file.

    They are kept in ``PATH.directions.pt`` beside the grid: a resumed run reads them back instead of
    running Lanczos (or the PCA) again, whose last bits may differ on a GPU and would then not match the
    SHA-256 of the directions in the saved recipe.
    """
    import torch

    from ._io import atomic_torch_save

    store = path.with_suffix(".directions.pt")
    settings = {"directions": args.directions, "dim": args.dim, "seed": args.seed, "split": args.split,
                "dtype": args.dtype, "checkpoint_sha256": run.checkpoint_sha256}
    saved = None
    if distributed.is_main() and store.exists() and path.with_suffix(".npz").exists():
        saved = torch.load(store, map_location="cpu", weights_only=True)
        if saved.get("settings") != settings:  # computed afresh; the surface's recipe check names what differs
            saved = None
    saved = distributed.broadcast_object(saved)  # rank 0 decides: the other ranks may not see its files
    if saved is not None:
        return [{k: v.to(device, dtype) for k, v in d.items()} for d in saved["directions"]], saved["info"]
    given, info = _surface_directions(args, run, data, dtype, device)
    if distributed.is_main() and not path.with_suffix(".npz").exists():
        atomic_torch_save({"directions": [dict(d) for d in given], "info": info, "settings": settings}, store)
    distributed.barrier()
    return list(given), info


def _surface_directions(args: argparse.Namespace, run: Any, data: Any, dtype: Any, device: Any) -> tuple[Any, dict]:
    """The directions for --directions hessian or pca, and what the JSON records about them."""
    import torch
    import torch.nn.functional as F

    from landscape import directions as dirs
    from landscape import hessian

    if args.directions == "hessian":
        mine = distributed.shard(len(data[0]))
        eig = hessian.top_eigenvalues(run.model, F.cross_entropy, (data[0][mine], data[1][mine]), k=args.dim,
                                      seed=args.seed, dtype=dtype, device=device, batch_size=args.batch_size,
                                      progress=args.progress, distributed=True)
        return dirs.eigenvector_directions(eig.eigenvectors), {"eigenvalues": eig.eigenvalues.tolist()}
    snapshots = sorted((run.run_dir / "snapshots").glob("epoch_*.pt"))
    if len(snapshots) < args.dim + 1:
        raise ValueError(f"--directions pca needs at least {args.dim + 1} weight snapshots in {run.run_dir / 'snapshots'} "
                         f"(train with --snapshot-every N); found {len(snapshots)}")
    names = [n for n, p in run.model.named_parameters() if p.requires_grad]

    def load(path: Path) -> dict:  # memory-mapped on the CPU: pca_directions moves one block at a time
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {n: state[n] for n in names}

    final = {n: p.detach().to(device, dtype) for n, p in run.model.named_parameters() if p.requires_grad}
    pca = dirs.pca_directions([load(p) for p in snapshots], final, n_components=args.dim)
    trajectory = {"snapshots": [p.name for p in snapshots], "coordinates": pca.coordinates.tolist(),
                  "explained_variance_ratio": pca.explained_variance_ratio.tolist()}
    return pca.directions, trajectory


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sam-landscape`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    joined = False
    try:
        if distributed.launched_by_torchrun():
            if args.command not in DISTRIBUTED_COMMANDS:
                raise ValueError(f"{args.command} runs as one process; launch it without torchrun "
                                 f"(under torchrun: {', '.join(DISTRIBUTED_COMMANDS)})")
            joined = not distributed.active() and distributed.init_from_env(getattr(args, "device", "auto"))
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as error:
        print(f"{PROG} {args.command}: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        how = {"train": "resume with --resume", "hessian": "rerun the command", "sharpness": "rerun the command"}.get(
            args.command, "rerun the same command to resume")
        print(f"{PROG} {args.command}: interrupted; {how}", file=sys.stderr)
        return 130
    finally:
        if joined:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
