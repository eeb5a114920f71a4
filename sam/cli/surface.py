"""``sam-landscape surface``: a loss surface around a saved run, or the interpolation between two runs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from landscape import distributed

from ..analyses import SurfaceSettings, surface_analysis
from ._options import add_analysis_flags, add_command, analysis_inputs, analysis_subject, named_by_flag, positive_int

NAME = "surface"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME, help="loss surface around a trained model: filter-normalised 1D/2D slices or an interpolation",
        description="Loss and accuracy on a 1D or 2D slice through the weights along seeded filter-normalised "
        "random directions (Li et al. 2018), or along the line to another model (--interpolate). The grid is "
        "saved as it fills (surface_1d/surface_2d/interpolation .npz + .json, with a _test suffix for "
        "--split test) and a rerun of the same command resumes it.")
    parser.add_argument("--dim", type=int, choices=[1, 2], default=None, help="1D or 2D slice (default: 2)")
    parser.add_argument("--steps", type=int, default=51, help="grid points per axis (at least 2)")
    parser.add_argument("--span", type=float, nargs=2, default=[-1.0, 1.0], metavar=("LOW", "HIGH"),
                        help="range of each coordinate (interpolation: of t)")
    parser.add_argument("--norm", choices=["filter", "layer", "model", "none"], default=None,
                        help="normalisation of random directions (default: filter)")
    parser.add_argument("--ignore", choices=["biasbn", "none"], default=None,
                        help="random directions: biasbn zeroes them on biases and norm parameters (default: biasbn)")
    parser.add_argument("--orthogonal", action="store_true", help="orthogonalise the second direction")
    parser.add_argument("--directions", choices=["random", "hessian", "pca"], default="random",
                        help="random: seeded filter-normalised; hessian: top Hessian eigenvectors; "
                        "pca: principal directions of the run's snapshots/ (trajectory saved in the JSON)")
    parser.add_argument("--compare", type=Path, default=None, metavar="RUN",
                        help="a second run (e.g. SAM beside SGD): its surface along the same direction recipe "
                        "(--directions, --seed, --norm, --ignore, --span, --steps) around its own minimum, written "
                        "beside it (or into --out/LABEL); with --plot both are drawn on one z-range")
    parser.add_argument("--interpolate", type=Path, default=None, metavar="RUN",
                        help="another run: the loss along w_a + t (w_b - w_a) instead of a random slice")
    parser.add_argument("--interpolate-buffers", choices=["interpolate", "a"], default=None,
                        help="interpolation: move BatchNorm statistics along the line too, or keep the first run's (default: interpolate)")
    parser.add_argument("--points-per-pass", type=positive_int, default=None,
                        help="grid points per vmapped forward pass (default: 1, the plain loop, on CPU; sized to "
                        "free memory on GPU)")
    parser.add_argument("--bf16", action="store_true", help="evaluate under bf16 autocast")
    parser.add_argument("--plot", action="store_true",
                        help="also draw the surfaces (PNG + PDF, and one self-contained HTML) into --out or the first run")
    add_analysis_flags(parser, name="surface", seed_help="seed of the random directions")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2; got {args.steps}")
    if args.compare is not None and args.interpolate is not None:
        raise ValueError("use either --compare or --interpolate, not both")
    check_direction_flags(args)
    names = [f.name for f in dataclasses.fields(SurfaceSettings)]
    values = {name: tuple(args.span) if name == "span" else getattr(args, name) for name in names}
    settings = named_by_flag(lambda: SurfaceSettings(**values), names)
    main_process = distributed.is_main()

    def note(line: str) -> None:
        print(line, file=sys.stderr if line.startswith("note:") else sys.stdout)

    subject = analysis_subject(args)
    if not isinstance(subject, Path) and (args.compare is not None or args.interpolate is not None):
        raise ValueError("--compare and --interpolate take runs; with --model, analyse the one model")
    analysis = surface_analysis(subject, settings, analysis_inputs(args), args.out,
                                compare=[args.compare] if args.compare is not None else [],
                                interpolate=args.interpolate, overwrite=args.overwrite, plot=args.plot,
                                progress=args.progress, log=note)
    if main_process:
        for written in analysis.figures:
            print(f"wrote {written}")
    return 0


def check_direction_flags(args: argparse.Namespace) -> None:
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
