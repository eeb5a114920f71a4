"""``sam-landscape sharpness``: every sharpness measure of a saved run."""

from __future__ import annotations

import argparse
from typing import Any

from landscape.sharpness import measure_columns

from ..analyses import sharpness_analysis
from ._options import add_analysis_flags, add_command, add_measure_flags, analysis_inputs, analysis_subject, measure_settings

NAME = "sharpness"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME,
        help="sharpness of a trained model: m-sharpness, adaptive, average-case, Keskar, PAC-Bayes, lambda_max",
        description="Sharpness measures of a saved run on its training split (or --split test): worst-case "
        "m-sharpness for every --m (plain l2, adaptive l2 and adaptive l-inf, vectorised over chunks of m "
        "examples), average-case adaptive sharpness, Keskar epsilon-sharpness, PAC-Bayes flatness and the "
        "top Hessian eigenvalue. Writes sharpness.json (and per-chunk values in sharpness.npz) beside the run.")
    add_measure_flags(parser)
    add_analysis_flags(parser, name="sharpness", seed_help="seed of the chunks and of the random noise")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    settings = measure_settings(args)
    saved = sharpness_analysis(analysis_subject(args), settings, analysis_inputs(args), args.out,
                               overwrite=args.overwrite, progress=args.progress)
    for name, value in measure_columns(saved.scalars).items():
        print(f"{name:<24} {value:.6g}")
    print(f"wrote {saved.json_path} and {saved.npz_path}")
    return 0
