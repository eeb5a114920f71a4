"""The ``sam-landscape`` command line: a thin layer over the Python API, one module per command.

Each command module (``train``, ``hessian``, ``surface``, ``sharpness``, ``study``, ``noise_study``,
``sweep``, ``compare``, ``plot``, ``demo``, ``presets``) holds its parser (``register``) and its body (``run``); the flags
several commands share live in :mod:`._options`. No command imports another.

Errors in the input (a bad flag, an unknown model, a missing or corrupt file, a run directory that
already holds a run) print one line, ``sam-landscape COMMAND: error: ...``, and exit with code 2.

``train``, ``hessian`` and ``surface`` also run under ``torchrun --nproc_per_node N -m sam.cli ...``:
DDP training, Hessian products summed over data shards, surface points split across the processes;
rank 0 alone prints and writes (:mod:`landscape.distributed`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from landscape import distributed
from landscape.objective import NondeterministicObjective

from ..trainer import TrainingDiverged
from . import compare, demo, hessian, noise_study, plot, presets, sharpness, study, surface, sweep, train
from ._options import EXIT_USAGE, PROG, Parser, one_line

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = (train, hessian, surface, sharpness, study, noise_study, sweep, compare, plot, demo, presets)
DISTRIBUTED_COMMANDS = ("train", "hessian", "surface")  # the subcommands that run under torchrun

_RESUME_HINTS = {
    "train": "resume with --resume",
    "hessian": "resume with --resume",
    "sharpness": "rerun the command",
    "presets": "rerun the command",
    "plot": "rerun the command (finished analyses are kept)",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``sam-landscape`` parser with its subcommands."""
    parser = Parser(prog=PROG, description="Train with SGD and SAM, then analyse the minima they reach.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sam-landscape`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    joined = False
    try:
        if distributed.launched_by_torchrun():
            if args.command not in DISTRIBUTED_COMMANDS:
                raise ValueError(f"{args.command} runs as one process; launch it without torchrun "
                                 f"(under torchrun: {', '.join(DISTRIBUTED_COMMANDS)})")
            joined = not distributed.active() and distributed.init_from_env(getattr(args, "device", "auto"))
        return args.handler(args)
    except (ValueError, OSError, ImportError, NondeterministicObjective) as error:
        print(f"{PROG} {args.command}: error: {one_line(_describe(error))}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as error:
        print(f"{PROG} {args.command}: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        how = _RESUME_HINTS.get(args.command, "rerun the same command to resume")
        print(f"{PROG} {args.command}: interrupted; {how}", file=sys.stderr)
        return 130
    finally:
        if joined:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _describe(error: BaseException) -> str:
    """An operating-system error as ``PATH: what went wrong`` (``Not a directory``, ``Permission denied``)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)
