"""The ``sam-landscape`` command line: a thin layer over the Python API.

Every ``train`` flag maps onto a :class:`sam.trainer.TrainConfig` field; the resolved config is saved
as ``config.json`` in the run directory. Errors in the input (a bad flag, an unknown model, a missing
dataset directory, a run directory that already holds a run) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .data import DATASET_NAMES
from .models import available_models
from .optim import BASE_OPTIMIZERS, available_optimizers
from .trainer import AMP_MODES, SCHEDULES, TrainConfig, TrainingDiverged, train

__all__ = ["main", "build_parser"]

PROG = "sam-landscape"
EXIT_USAGE = 2

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


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "help": _TRAIN_HELP[f.name], "default": default}
        if f.name in _CHOICES:
            kwargs.update(choices=list(_CHOICES[f.name]), metavar="{" + ",".join(_CHOICES[f.name]) + "}")
        if isinstance(default, bool) or f.name == "augment":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kwargs.update(type=float, nargs="+")
        elif f.name == "data_root":
            kwargs["type"] = str
        elif f.name in ("rho", "rho_min", "max_grad_norm") or isinstance(default, float):
            kwargs["type"] = float
        elif isinstance(default, int):
            kwargs["type"] = int
        parser.add_argument(flag, **kwargs)


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
    _add_train_flags(train_parser)
    train_parser.set_defaults(handler=_run_train)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = train(config, args.out, resume=args.resume, progress=args.progress)
    final = result.final
    print(
        f"{config.optimizer} on {config.dataset}/{config.model}: "
        f"train acc {final['train_acc']:.4f}, test acc {final['test_acc']:.4f}, "
        f"test loss {final['test_loss']:.4f}; run saved in {result.out_dir}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sam-landscape`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as error:
        print(f"{PROG} {args.command}: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; resume with --resume", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
