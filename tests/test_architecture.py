"""The layers read one way and nothing imports in a circle: the import-linter contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# beside this interpreter (a virtual environment that is not activated), or on PATH
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed ([test] extra)")
def test_the_import_contracts_hold():
    done = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "4 kept, 0 broken" in done.stdout


def test_every_command_has_a_module_of_its_own_holding_its_parser_and_body():
    from sam.cli import COMMANDS, build_parser

    names = {command.NAME for command in COMMANDS}
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse keeps them here
    assert names == registered
    for command in COMMANDS:
        assert Path(command.__file__).stem == command.NAME.replace("-", "_")
        assert callable(command.register) and callable(command.run)
