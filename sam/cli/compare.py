"""``sam-landscape compare``: two runs analysed with the same recipes, figures and an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..compare import compare
from ._options import add_command, add_compare_flags, compare_config

NAME = "compare"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME, help="SGD vs SAM: run every analysis not yet saved, then write the figures and an HTML report",
        description="Compare two trained runs with the same recipes: Hessian spectrum and density, 2D surface and "
        "1D slice along the same seeded directions, interpolation between them (train and test), m-sharpness. "
        "Analyses are saved under OUT/analyses and reused; figures go to OUT as PNG and PDF, with a "
        "self-contained OUT/report.html and OUT/summary.json (test accuracy and lambda_max of each side, mean and "
        "spread over --seeds-a/--seeds-b). Each run is labelled by its optimizer and rho unless --labels is given.")
    parser.add_argument("run_a", type=Path, help="the first run (e.g. SGD)")
    parser.add_argument("run_b", type=Path, help="the second run (e.g. SAM)")
    parser.add_argument("--out", type=Path, required=True, help="directory for analyses, figures and report.html")
    parser.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"),
                        help="names of the two runs (default: each run's optimizer and rho, e.g. 'SGD' and 'SAM rho=0.05')")
    parser.add_argument("--study", type=Path, default=None, help="a sam-landscape study directory: adds Kendall tau against m")
    parser.add_argument("--noise-study", type=Path, default=None,
                        help="a label-noise study directory (or its noise_study.json): adds accuracy against noise")
    parser.add_argument("--seeds-a", nargs="+", type=Path, default=[], metavar="RUN",
                        help="more runs of run_a's settings with other seeds: summary.json and the report average the "
                        "test accuracy and lambda_max over them")
    parser.add_argument("--seeds-b", nargs="+", type=Path, default=[], metavar="RUN", help="the same for run_b")
    parser.add_argument("--sweep", type=Path, default=None, metavar="SWEEP_DIR",
                        help="a sam-landscape sweep directory with SGD and SAM runs: adds SAM's error reduction per "
                        "setting and, for a sweep over rho, the test error against rho per m")
    parser.add_argument("--spectrum-evolution", action="store_true",
                        help="add the Hessian spectrum at up to 4 epochs of both runs, from their snapshots (train "
                        "--snapshot-every N)")
    parser.add_argument("--overwrite", action="store_true",
                        help="compute every analysis under OUT/analyses again instead of reusing it (needed when "
                        "they were made with other settings or from other checkpoints)")
    add_compare_flags(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    compare(args.run_a, args.run_b, args.out, compare_config(args),
            labels=tuple(args.labels) if args.labels is not None else None, study_dir=args.study,
            noise_study=args.noise_study, seeds=(args.seeds_a, args.seeds_b), sweep_dir=args.sweep,
            spectrum=args.spectrum_evolution, overwrite=args.overwrite,
            progress=args.progress)
    return 0
