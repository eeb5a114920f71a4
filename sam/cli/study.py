"""``sam-landscape study``: sharpness against generalization over a family of trained models."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import DATASET_NAMES
from ..models import available_models
from ..study import StudyConfig, format_kendall, run_study
from ._options import add_command, add_measure_flags, add_progress_flag, device_name, measure_settings

NAME = "study"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME,
        help="sharpness vs generalization: train a family of models, measure them, Kendall tau per measure and m",
        description="Train models on the same data with different learning rates, batch sizes, weight decays, "
        "optimizers (sgd, sam, asam) and rhos; compute the generalization gap and every sharpness measure of "
        "each; write study.csv, kendall.csv and study.json (Kendall tau between each measure and the gap, as a "
        "function of m) into --out. Rerunning resumes: finished models are not retrained or remeasured. The "
        "default (24 digits models, 15 epochs) took 9 minutes on a 2-core CPU; widen the grid and "
        "--epochs on a GPU.")
    defaults = StudyConfig()
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="study directory")
    parser.add_argument("--optimizers", nargs="+", choices=["sgd", "sam", "asam"], default=defaults.optimizers,
                        help="optimizers in the family")
    parser.add_argument("--rhos", nargs="+",
                        default=[f"{k}={','.join(f'{r:g}' for r in v)}" for k, v in defaults.rhos.items()],
                        metavar="NAME=R1,R2", help="rho values per SAM variant")
    parser.add_argument("--lrs", type=float, nargs="+", default=defaults.lrs, help="peak learning rates")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=defaults.batch_sizes, help="batch sizes")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=defaults.weight_decays, help="weight decays")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per model")
    parser.add_argument("--n-models", type=int, default=defaults.n_models,
                        help="models drawn (seeded) from the full grid; 0 trains the whole grid")
    parser.add_argument("--max-train-error", type=float, default=defaults.max_train_error,
                        help="models with a higher final training error are left out of the correlations (-1: keep all)")
    parser.add_argument("--dataset", choices=list(DATASET_NAMES), default="digits", help="dataset")
    parser.add_argument("--data-root", default=None, help="directory holding the CIFAR files")
    parser.add_argument("--model", choices=available_models(), default="digits_cnn", help="network architecture")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="training seed, seed of the model draw and of the measures")
    add_measure_flags(parser, defaults.measures)
    add_progress_flag(parser)
    parser.set_defaults(handler=run)
    return parser


def parse_rhos(values: Sequence[str]) -> dict[str, list[float]]:
    """``["sam=0.05,0.1", "asam=1"]`` as ``{"sam": [0.05, 0.1], "asam": [1.0]}``."""
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


def run(args: argparse.Namespace) -> int:
    config = StudyConfig(optimizers=args.optimizers, rhos=parse_rhos(args.rhos), lrs=args.lrs,
                         batch_sizes=args.batch_sizes, weight_decays=args.weight_decays, epochs=args.epochs,
                         n_models=args.n_models or None, seed=args.seed,
                         max_train_error=None if args.max_train_error < 0 else args.max_train_error, dataset=args.dataset,
                         data_root=args.data_root, model=args.model, device=args.device,
                         measures=measure_settings(args))
    result = run_study(config, args.out, progress=args.progress)
    print(format_kendall(result.kendall))
    print(f"wrote {args.out / 'study.csv'}, {args.out / 'kendall.csv'} and {args.out / 'study.json'}")
    return 0
