"""``sam-landscape noise-study``: clean test accuracy of each optimizer at each label-noise rate."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..noise_study import STUDY_FIELDS, NoiseStudyConfig, default_recipe, format_noise_table, run_noise_study
from ..optim import available_optimizers
from ..presets import PRESETS
from ._options import add_command, add_progress_flag, add_train_flags, resolve_train_config

NAME = "noise-study"


def register(commands: Any) -> argparse.ArgumentParser:
    defaults = NoiseStudyConfig()
    parser = add_command(
        commands, NAME,
        help="robustness to label noise: clean test accuracy of each optimizer at each noise rate (table + figure)",
        description="Train each optimizer at each symmetric label-noise rate (a fraction of the training labels "
        "flipped to another class, seeded; test labels clean) for each seed, then write noise_study.json/.csv "
        "(mean and spread over seeds of the clean test accuracy), noise_runs.csv and the figure label_noise "
        ".png/.pdf/.html into --out (Foret et al. 2021, Sec. 3.3). Runs live in OUT/runs/NAME; rerunning resumes: "
        "finished runs are not retrained, an interrupted one continues from its last epoch. The recipe of every run "
        "is the flags below (default: the digits CNN, 20 epochs, batch 128, lr 0.1; with 3 seeds about 5 minutes on a "
        "2-core CPU) or --preset's, with the optimizer, rho, noise rate and seed set per run.")
    parser.add_argument("--out", type=Path, default=Path("runs/noise-study"), help="study directory")
    parser.add_argument("--rates", type=float, nargs="+", default=defaults.rates,
                        help="fractions of training labels flipped")
    parser.add_argument("--optimizers", nargs="+", choices=available_optimizers(), default=defaults.optimizers,
                        metavar="NAME", help=f"optimizers to compare ({', '.join(available_optimizers())})")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds,
                        help="seeds of every (optimizer, rate): initialisation, batch order and which labels flip")
    parser.add_argument("--rhos", nargs="+", default=[f"{k}={v:g}" for k, v in defaults.rhos.items()],
                        metavar="NAME=RHO", help="rho per SAM variant (others use their own default); the paper "
                        "uses 0.1 for SAM under label noise")
    parser.add_argument("--preset", choices=list(PRESETS), default=None, metavar="NAME",
                        help="take the recipe from a paper preset (e.g. c10-resnet32-noise20-sgd); flags given "
                        "explicitly override it")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of torch (torch.set_num_threads; 0 keeps torch's default). One is as fast "
                        "for the digits CNN, and many times faster when other jobs share the CPU")
    add_progress_flag(parser)
    add_train_flags(parser, defaults=defaults.recipe, exclude=STUDY_FIELDS)
    parser.set_defaults(handler=run)
    return parser


def parse_rhos(values: list[str]) -> dict[str, float]:
    """``["sam=0.1", "asam=1"]`` as ``{"sam": 0.1, "asam": 1.0}``."""
    rhos = {}
    for item in values:
        name, _, value = item.partition("=")
        try:
            rhos[name] = float(value)
        except ValueError:
            raise ValueError(f"--rhos takes NAME=RHO (e.g. sam=0.1 asam=1.0); got {item!r}") from None
    return rhos


def run(args: argparse.Namespace) -> int:
    import torch

    rhos = parse_rhos(args.rhos)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default); got {args.threads}")
    recipe = resolve_train_config(args, default_recipe())
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
