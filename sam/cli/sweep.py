"""``sam-landscape sweep``: train the product of grids of training options, resumably, and tabulate the runs.

Example: ``sam-landscape sweep --out runs/rho --grid optimizer=sgd,sam --grid rho=0.05,0.1 --grid seed=0,1
--epochs 20 --jobs 2 --hessian`` trains 8 digits runs into ``runs/rho/runs/NAME`` (two at a time) and writes
``runs/rho/summary.csv`` and ``summary.json``: per run its grid values, its final metrics and lambda_max and
the trace of its training loss. See :mod:`sam.sweep`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ..presets import PRESETS
from ..sweep import HESSIAN, SweepFailed, format_summary, parse_grid, run_sweep
from ._options import (
    PROG,
    add_command,
    add_progress_flag,
    add_train_flags,
    named_by_flag,
    one_line,
    positive_int,
    resolve_train_config,
)

NAME = "sweep"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME,
        help="train the product of grids of training options (one run per point, resumable) and tabulate them",
        description="Train one run per point of the product of the --grid values into --out/runs/NAME (NAME lists "
        "the point's grid values, e.g. optimizer=sam,rho=0.05,seed=1); every other setting is the training flags "
        "below (or --preset's). Writes sweep.json (the recipe), summary.csv and summary.json (one row per run: its "
        "grid values and the last line of its metrics.jsonl; a metric named like a training option is prefixed "
        "with final_, e.g. final_lr; with --hessian also lambda_max and trace). Rerunning resumes: finished runs are "
        "not retrained, an interrupted one continues from its last epoch; a different recipe in --out is refused "
        "unless --overwrite. A run that fails is reported by name, the others go on, and the command exits with "
        "code 1.")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory")
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="a training option and its values, e.g. rho=0.05,0.1 or label-noise=0,0.2; KEY is the "
                        "name of any training flag below without its dashes (label-noise or label_noise); values take "
                        "the flag's type (none for an optional one, true/false for a switch, 0.5:0.75 for a list). "
                        "Repeat for more keys: the sweep is the product, the first grid varying slowest")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="runs trained at once, each in its own process with an equal share of the CPU threads")
    parser.add_argument("--hessian", action="store_true",
                        help="also compute each run's lambda_max (Lanczos, k=1) and Hessian trace (Hutch++, "
                        "--trace-matvecs products) on its training split, saved as the run's hessian.json (like "
                        "sam-landscape hessian RUN --k 1), and add them to the summary; changed settings need --overwrite")
    parser.add_argument("--trace-matvecs", type=positive_int, default=HESSIAN.trace_matvecs,
                        help="with --hessian: Hessian-vector products of the trace estimate (Hutch++; needs >= 3)")
    parser.add_argument("--overwrite", action="store_true",
                        help="accept a recipe that differs from the one saved in --out: runs whose config is "
                        "unchanged are kept; a run directory holding another config, or a run that cannot be continued "
                        "(its state.pt or model.pt deleted), is trained again from scratch")
    add_progress_flag(parser)
    parser.add_argument("--preset", choices=list(PRESETS), default=None, metavar="NAME",
                        help="start from a paper preset (sam-landscape presets lists them); the grids and every "
                        "flag given explicitly override its values")
    add_train_flags(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    grid = parse_grid(args.grid)
    both = [name for name, _ in grid if name in args.explicit]
    if both:
        flag = "--" + both[0].replace("_", "-")
        raise ValueError(f"{flag} is given both as a flag and in --grid: give {both[0]}'s values in --grid only")
    base = resolve_train_config(args)
    hessian = None
    if args.hessian:
        hessian = named_by_flag(lambda: dataclasses.replace(HESSIAN, trace_matvecs=args.trace_matvecs),
                                ["trace_matvecs"])
    try:
        result = run_sweep(base, grid, args.out, jobs=args.jobs, hessian=hessian,
                           overwrite=args.overwrite, progress=args.progress)
    except SweepFailed as error:
        if error.result.rows:
            print(format_summary(error.result.rows))
        print(f"{PROG} {NAME}: {one_line(error)}", file=sys.stderr)
        return 1
    print(format_summary(result.rows))
    reused = len(result.rows) - len(result.trained)
    runs = f"{len(result.rows)} run{'' if len(result.rows) == 1 else 's'}"
    print(f"{runs} ({len(result.trained)} trained, {reused} finished before); wrote {args.out / 'summary.csv'} and "
          f"{args.out / 'summary.json'}")
    return 0
