"""``sam-landscape demo``: train SGD and SAM on the built-in data and compare them into figures/."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..compare import demo
from ._options import add_command, add_compare_flags, compare_config

NAME = "demo"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME, help="train SGD and SAM on digits and compare them (figures into figures/)",
        description="Train the digits CNN with SGD and with SAM (reusing finished runs in --runs), then run "
        "compare into --out: every figure as PNG and PDF and report.html. About 5 minutes on a 2-core CPU.")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="directory for the figures and report.html")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the two runs are trained")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of each run")
    add_compare_flags(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    demo(args.out, args.runs, epochs=args.epochs, device=args.device, config=compare_config(args),
         progress=args.progress)
    return 0
