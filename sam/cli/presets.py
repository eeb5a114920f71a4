"""``sam-landscape presets``: the paper's runs that ``train --preset NAME`` reproduces."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..presets import PRESETS, format_paper, format_presets
from ..trainer import TrainConfig
from ._options import add_command

NAME = "presets"


def register(commands: Any) -> argparse.ArgumentParser:
    parser = add_command(
        commands, NAME, help="list the paper presets of train --preset: what each reproduces and the paper's number",
        description="The paper's runs as presets of sam-landscape train --preset NAME (Foret et al. 2021): the "
        "WRN-28-10 CIFAR-10/100 comparison, ResNet-32 under label noise, WRN-40-10 without BatchNorm for the "
        "Hessian, ImageNet-pretrained EfficientNets finetuned on CIFAR-10/100 (--init-from timm:NAME), and the digits "
        "stand-ins. With NAME, print that preset's resolved TrainConfig as JSON.")
    parser.add_argument("name", nargs="?", default=None, metavar="NAME",
                        help="a preset: print its paper numbers and full resolved config as JSON")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.name is None:
        print(format_presets())
        print("\ntrain one with: sam-landscape train --preset NAME --out DIR [--data-root DIR] [--any-flag VALUE]")
        return 0
    if args.name not in PRESETS:
        raise ValueError(f"unknown preset {args.name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.name]
    values = {**dataclasses.asdict(TrainConfig()), **preset.config}  # what preset_config resolves to
    print(json.dumps({"preset": args.name, "description": preset.description, "reference": preset.reference,
                      "paper": dict(preset.paper), "paper_text": format_paper(preset.paper), "config": values}, indent=2))
    return 0
