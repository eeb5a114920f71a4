"""``sam-landscape demo``: train SGD and SAM on built-in data over several seeds and compare them into figures/."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..compare import DEMO_RECIPES, demo
from ._options import add_command, add_compare_flags, compare_config, positive_float, positive_int

NAME = "demo"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME, help="train SGD and SAM over 3 seeds on MNIST-1D and compare them (figures into figures/)",
        description="Train SGD and SAM with several seeds on a built-in dataset (reusing finished runs in --runs), "
        "then run compare into --out on the seed-0 runs: every figure as PNG and PDF, report.html and summary.json "
        "(test accuracy and lambda_max, mean and spread over the seeds). The default, MNIST-1D with its MLP, trains "
        "six runs of 11-17 s each on one CPU thread, then compares them.")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="directory for the figures and report.html")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the runs are trained")
    parser.add_argument("--dataset", choices=list(DEMO_RECIPES), default="mnist1d",
                        help="mnist1d (its MLP, 200 epochs; SGD and SAM clearly differ) or digits (the 8x8 CNN, 30 "
                        "epochs)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds per optimizer (0, 1, ...)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs of each run (default: the dataset's, 200 for mnist1d, 30 for digits)")
    parser.add_argument("--sam-rho", type=positive_float, default=None,
                        help="SAM's training radius (default: 0.2 for mnist1d, 0.05 for digits)")
    parser.add_argument("--overwrite", action="store_true",
                        help="compute every analysis under OUT/analyses again (e.g. after a demo on another dataset "
                        "into the same --out); finished runs are still reused")
    add_compare_flags(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    demo(args.out, args.runs, dataset=args.dataset, seeds=args.seeds, epochs=args.epochs, sam_rho=args.sam_rho,
         device=args.device, config=compare_config(args), overwrite=args.overwrite, progress=args.progress)
    return 0
