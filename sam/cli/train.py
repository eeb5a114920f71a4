"""``sam-landscape train``: train a model with SGD or a SAM variant into a run directory."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from landscape import distributed
from landscape.storage import atomic_write_json

from ..presets import PRESETS
from ..trainer import TrainConfig, train
from ._options import add_command, add_progress_flag, add_train_flags, resolve_train_config

NAME = "train"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME, help="train a model with SGD or a SAM variant",
        description="Train a model with SGD or a SAM variant, from scratch or finetuned from other weights "
        "(--init-from a run, a weights file or timm:NAME, with --reset-head for new classes); writes model.pt, "
        "state.pt, metrics.jsonl and config.json into --out.")
    parser.add_argument("--out", type=Path, required=True,
                        help="run directory to write (must hold no finished epoch unless --resume or --overwrite)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (start it if there is none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the run in --out (its checkpoints, metrics and snapshots) and train again")
    add_progress_flag(parser)
    parser.add_argument("--preset", choices=list(PRESETS), default=None, metavar="NAME",
                        help="start from a paper preset (sam-landscape presets lists them); every flag given "
                        "explicitly overrides the preset's value")
    add_train_flags(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite discards it: pass one of them")
    config = resolve_train_config(args)
    on_epoch_end = None
    if args.preset is not None:
        fields = [f.name for f in dataclasses.fields(TrainConfig)]
        provenance = {"preset": args.preset, "overrides": {k: getattr(args, k) for k in fields if k in args.explicit},
                      "reference": PRESETS[args.preset].reference, "paper": dict(PRESETS[args.preset].paper)}

        def save_provenance(epoch: int, metrics: dict[str, Any]) -> None:  # once train() has accepted the directory
            if distributed.is_main():  # under torchrun, rank 0 alone writes
                atomic_write_json(Path(args.out) / "preset.json", provenance)

        on_epoch_end = save_provenance

    result = train(config, args.out, resume=args.resume, overwrite=args.overwrite, progress=args.progress,
                   on_epoch_end=on_epoch_end)
    if on_epoch_end is not None:
        on_epoch_end(config.epochs, result.final)
    final = result.final
    if not distributed.is_main():
        return 0
    print(
        f"{config.optimizer} on {config.dataset}/{config.model}: "
        f"train acc {final['train_acc']:.4f}, test acc {final['test_acc']:.4f}, "
        f"test loss {final['test_loss']:.4f}; run saved in {result.out_dir}"
    )
    return 0
