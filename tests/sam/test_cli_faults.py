"""Fault injection: ``kill -9`` at random points of training, of a surface grid and of a Hessian analysis.

Each command is killed several times, at two kinds of random points (seeded, so a failure can be
replayed): inside a file write, after the temporary file is written and before it is renamed (the moment
that leaves a stray temporary file behind), and at a random time while the work runs. After every kill
the same command (``--resume`` for ``train`` and ``hessian``; ``surface`` resumes by itself) continues.
The finished result must equal an uninterrupted run's bit for bit on the CPU, and no temporary or partial
file may be left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sam.cli import main

# Runs the command line and kills itself (SIGKILL: no cleanup, no finally) in the N-th file write, between
# writing the temporary file and renaming it over the target.
_KILL_IN_WRITE = """
import os, signal, sys
target = int(os.environ.get("KILL_AT_RENAME", "0"))  # 0: never
rename = os.replace
calls = 0

def replace(src, dst):
    global calls
    calls += 1
    if calls == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst)

os.replace = replace
from sam.cli import main
sys.exit(main(sys.argv[1:]))
"""

_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_TIMING_FIELDS = {"time", "step_time", "images_per_sec", "seconds"}


def _cli(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sam.cli", *argv, "--no-progress"], capture_output=True, text=True,
                          timeout=600, env=_ENV, **kwargs)


def _kill_in_write(argv: list[str], write: int, script: Path) -> int:
    done = subprocess.run([sys.executable, str(script), *argv, "--no-progress"], capture_output=True, text=True,
                          timeout=600, env={**_ENV, "KILL_AT_RENAME": str(write)})
    return done.returncode


def _kill_after(argv: list[str], started: Path, delay: float) -> int:
    """Start the command, wait until ``started`` exists (its work has begun), then SIGKILL it after ``delay``."""
    process = subprocess.Popen([sys.executable, "-m", "sam.cli", *argv, "--no-progress"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_ENV)
    deadline = time.monotonic() + 300
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    return process.wait(timeout=60)


def _writes_of(argv: list[str], tmp_path: Path, name: str) -> int:
    """How many atomic file writes an uninterrupted run makes (os.replace calls), to draw kill points from."""
    script = tmp_path / f"count_{name}.py"
    script.write_text(_KILL_IN_WRITE.replace("if calls == target:", "if False:").replace(
        "sys.exit(main(sys.argv[1:]))", "code = main(sys.argv[1:]); print('WRITES', calls); sys.exit(code)"))
    done = subprocess.run([sys.executable, str(script), *argv, "--no-progress"], capture_output=True, text=True,
                          timeout=600, env=_ENV)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split("WRITES")[-1])


def _interrupt_and_finish(argv: list[str], resume: list[str], started: Path, total_writes: int, seed: int,
                          tmp_path: Path, times: tuple[float, float]) -> list[str]:
    """Kill the command twice inside a write and twice at a random time, resuming after each; then finish it.

    Returns:
        What happened at each kill, for the assertion messages.
    """
    script = tmp_path / "kill_in_write.py"
    script.write_text(_KILL_IN_WRITE)
    rng = random.Random(seed)
    history = []
    first = True
    for kind in ("write", "time", "write", "time"):
        command = argv if first else [*argv, *resume]
        if kind == "write":  # a resumed run has fewer writes left: the second kill point is drawn earlier
            write = rng.randint(1, max(1, total_writes // (1 + len(history))))
            code = _kill_in_write(command, write, script)
            history.append(f"killed in write {write}: exit {code}")
        else:
            delay = rng.uniform(*times)
            code = _kill_after(command, started, delay)
            history.append(f"killed {delay:.2f} s after start of work: exit {code}")
        assert code in (-signal.SIGKILL, 0), history  # 0: it finished before the kill point
        first = False
    done = _cli([*argv, *resume])
    assert done.returncode == 0, (history, done.stderr)
    return history


def _leftovers(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial.pt"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", "--out", str(out), "--epochs", "2", "--batch-size", "256", "--no-progress"]) == 0
    return out


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMING_FIELDS} for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_killed_at_random_points_resumes_to_the_same_weights(tmp_path, seed):
    flags = ["--optimizer", "sam", "--epochs", "8", "--batch-size", "128", "--snapshot-every", "3"]
    reference = tmp_path / "reference"
    assert _cli(["train", *flags, "--out", str(reference)]).returncode == 0
    run = tmp_path / "killed"
    argv = ["train", *flags, "--out", str(run)]
    writes = _writes_of(["train", *flags, "--out", str(tmp_path / "counted")], tmp_path, "train")
    history = _interrupt_and_finish(argv, ["--resume"], run / "config.json", writes, seed, tmp_path, (0.0, 2.5))

    for name in ("model.pt", "snapshots/epoch_0003.pt", "snapshots/epoch_0006.pt"):
        ours, theirs = torch.load(run / name, weights_only=True), torch.load(reference / name, weights_only=True)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), (name, history)
    state, expected = torch.load(run / "state.pt", weights_only=True), torch.load(reference / "state.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], expected["model"][k]) for k in expected["model"])
    assert state["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    assert _records(run) == _records(reference), history
    assert _leftovers(run) == [], history


@pytest.mark.slow
def test_surface_grid_killed_at_random_points_resumes_to_the_same_values(trained, tmp_path):
    flags = ["--dim", "2", "--steps", "7", "--split", "test"]
    reference = tmp_path / "reference"
    assert _cli(["surface", str(trained), *flags, "--out", str(reference)]).returncode == 0
    out = tmp_path / "killed"
    argv = ["surface", str(trained), *flags, "--out", str(out)]
    writes = _writes_of(["surface", str(trained), *flags, "--out", str(tmp_path / "counted")], tmp_path, "surface")
    history = _interrupt_and_finish(argv, [], out / "surface_2d_test.npz", writes, 2, tmp_path, (0.0, 1.5))

    ours, theirs = np.load(out / "surface_2d_test.npz"), np.load(reference / "surface_2d_test.npz")
    assert ours["done"].all(), history
    np.testing.assert_array_equal(ours["loss"], theirs["loss"])
    np.testing.assert_array_equal(ours["accuracy"], theirs["accuracy"])
    saved = json.loads((out / "surface_2d_test.json").read_text())
    assert saved == json.loads((reference / "surface_2d_test.json").read_text())
    assert saved["points_done"] == 49
    assert _leftovers(out) == [], history


@pytest.mark.slow
def test_hessian_analysis_killed_at_random_points_resumes_to_the_same_numbers(trained, tmp_path):
    flags = ["--k", "3", "--trace-matvecs", "9", "--density", "--density-runs", "4", "--density-steps", "12",
             "--split", "test"]
    reference = tmp_path / "reference"
    assert _cli(["hessian", str(trained), *flags, "--out", str(reference)]).returncode == 0
    out = tmp_path / "killed"
    argv = ["hessian", str(trained), *flags, "--out", str(out)]
    writes = _writes_of(["hessian", str(trained), *flags, "--out", str(tmp_path / "counted")], tmp_path, "hessian")
    assert writes >= 8  # each stage (eigenpairs, trace, four SLQ runs) is saved, then the two result files
    out.mkdir()
    history = _interrupt_and_finish(argv, ["--resume"], out, writes, 3, tmp_path, (1.0, 4.0))

    ours, theirs = np.load(out / "hessian.npz"), np.load(reference / "hessian.npz")
    assert ours.files == theirs.files
    for name in ours.files:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{name}: {history}")
    scalars = {k: v for k, v in json.loads((out / "hessian.json").read_text()).items() if k not in _TIMING_FIELDS}
    expected = {k: v for k, v in json.loads((reference / "hessian.json").read_text()).items() if k not in _TIMING_FIELDS}
    assert scalars == expected, history
    assert _leftovers(out) == [], history
