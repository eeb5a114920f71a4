"""``sam-landscape hessian``: top Hessian eigenvalues, trace and eigenvalue density of a saved run."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from landscape import distributed

from ..analyses import HessianSettings, hessian_analysis
from ._options import add_analysis_flags, add_command, analysis_inputs, analysis_subject, named_by_flag, positive_int

NAME = "hessian"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME, help="Hessian spectrum of a trained model: top eigenvalues, trace, eigenvalue density",
        description="Top-k Hessian eigenvalues (Lanczos on exact Hessian-vector products), trace (Hutch++) "
        "and, with --density, the eigenvalue density (stochastic Lanczos quadrature) of a saved run's loss on "
        "its training split (or --split test). Writes hessian.json and hessian.npz beside the run (or into --out); each finished "
        "stage is kept in hessian.partial.pt, so an interrupted run continues with --resume.")
    parser.add_argument("--k", type=positive_int, default=5, help="number of eigenvalues")
    parser.add_argument("--which", choices=["LA", "SA", "LM"], default="LA",
                        help="largest (LA), most negative (SA) or largest-magnitude (LM) eigenvalues")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance ||Hv - lv|| <= tol |l|")
    parser.add_argument("--method", choices=["lanczos", "arpack", "power"], default="lanczos", help="eigensolver")
    parser.add_argument("--max-matvecs", type=positive_int, default=None,
                        help="budget of Hessian-vector products (default: the solver's)")
    parser.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True, help="estimate the trace")
    parser.add_argument("--trace-method", choices=["hutch++", "hutchinson"], default="hutch++", help="trace estimator")
    parser.add_argument("--trace-matvecs", type=positive_int, default=99, help="Hessian-vector products for the trace")
    parser.add_argument("--density", action="store_true", help="also compute the eigenvalue density (SLQ)")
    parser.add_argument("--density-runs", type=positive_int, default=10, help="SLQ: number of random start vectors")
    parser.add_argument("--density-steps", type=positive_int, default=80, help="SLQ: Lanczos steps per run")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted analysis with the same flags from its last finished stage "
                        "(a finished one is kept)")
    add_analysis_flags(parser, name="hessian", batch_help="examples per forward pass (with the whole split in one batch, Hessian-vector products keep the gradient graph between products)", seed_help="seed of the random start and probe vectors")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the saved analysis and --overwrite discards it: pass one of them")
    names = [f.name for f in dataclasses.fields(HessianSettings)]
    settings = named_by_flag(lambda: HessianSettings(**{name: getattr(args, name) for name in names}), names)
    saved = hessian_analysis(analysis_subject(args), settings, analysis_inputs(args), args.out,
                             overwrite=args.overwrite, resume=args.resume, progress=args.progress)
    if not distributed.is_main():
        return 0
    scalars = saved.scalars
    line = f"lambda_max {scalars['lambda_max']:.6g}"
    if "lambda_max_over_lambda_5" in scalars:
        line += f", lambda_max/lambda_5 {scalars['lambda_max_over_lambda_5']:.4g}"
    if "trace" in scalars:
        line += f", trace {scalars['trace']['value']:.6g} +- {scalars['trace']['std_error']:.2g}"
    line += f" ({scalars['total_matvecs']} Hessian-vector products, converged: {scalars['eigen']['converged']})"
    where = "wrote" if saved.computed else "already complete, nothing recomputed:"
    print(f"{line}; {where} {saved.json_path} and {saved.npz_path}")
    return 0
