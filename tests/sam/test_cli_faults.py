"""Fault injection: ``kill -9`` at random points of training, of a surface grid and of a Hessian analysis.

Each command is killed six times, alternately at two kinds of random points (seeded, so a failure can be
replayed): inside a file write, after the temporary file is written and before it is renamed (the moment
that leaves a stray temporary file behind), and at a random time while the work runs. The points are
spread over the whole run: the i-th kill is drawn from the i-th sixth of it, counted in file writes (over
all the processes, an uninterrupted run's total known beforehand) or in work saved on disk (epochs,
points, stages), and a timed kill waits until the process has printed progress, so it never fires before
the work began. After every kill the same command (``--resume`` for ``train`` and ``hessian``;
``surface`` resumes by itself) continues. The finished result must equal an uninterrupted run's bit for
bit on the CPU, and no temporary or partial file may be left behind.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from sam.cli import main

# Runs the command line, counting its file writes (os.replace calls) on from the count in WRITE_COUNTER (the
# writes of the processes before it), and kills itself (SIGKILL: no cleanup, no finally) at the first write
# whose number reaches KILL_AT_RENAME, between writing the temporary file and renaming it over the target.
_KILL_IN_WRITE = """
import os, signal, sys
target = int(os.environ.get("KILL_AT_RENAME", "0"))  # 0: never
counter = os.environ.get("WRITE_COUNTER")
rename = os.replace
calls = int(open(counter).read() or 0) if counter and os.path.exists(counter) else 0

def replace(src, dst):
    global calls
    calls += 1
    if counter:
        with open(counter, "w") as f:
            f.write(str(calls))
    if target and calls >= target:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst)

os.replace = replace
from sam.cli import main
code = main(sys.argv[1:])
print("WRITES", calls)
sys.exit(code)
"""

KILLS = 6
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
_TIMING_FIELDS = {"time", "step_time", "images_per_sec", "seconds"}


def _cli(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sam.cli", *argv, "--no-progress"], capture_output=True, text=True,
                          timeout=600, env=_ENV, **kwargs)


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "kill_in_write.py"
    script.write_text(_KILL_IN_WRITE)
    return script


def _kill_in_write(argv: list[str], script: Path, counter: Path, target: int) -> int:
    done = subprocess.run([sys.executable, str(script), *argv, "--no-progress"], capture_output=True, text=True,
                          timeout=600, env={**_ENV, "KILL_AT_RENAME": str(target), "WRITE_COUNTER": str(counter)})
    return done.returncode


def _kill_after(argv: list[str], script: Path, counter: Path, ready: Callable[[str], bool], delay: float) -> int:
    """Start the command (with progress lines: its standard error is a file), wait until ``ready`` holds for what
    it has printed there, then SIGKILL it after ``delay`` seconds."""
    log = counter.with_name("stderr.log")
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**_ENV, "WRITE_COUNTER": str(counter)})
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline and not ready(log.read_text()):
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        return process.wait(timeout=60)


def _writes_of(argv: list[str], tmp_path: Path) -> int:
    """How many atomic file writes an uninterrupted run makes (os.replace calls), to draw kill points from."""
    done = subprocess.run([sys.executable, str(_script(tmp_path)), *argv, "--no-progress"], capture_output=True,
                          text=True, timeout=600, env=_ENV)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split("WRITES")[-1])


def _interrupt_and_finish(argv: list[str], resume: list[str], total_writes: int, progress: Callable[[], float],
                          seed: int, tmp_path: Path, delay: float) -> list[str]:
    """Kill the command ``KILLS`` times, inside a write and at a random time by turns, resuming after each; then
    finish it.

    Kill ``i`` falls in the ``i``-th of ``KILLS`` equal stretches of the run: inside the write whose number (over
    every process so far) first reaches a point drawn from that stretch of an uninterrupted run's writes (a
    resumed run writes some files again, so it lands a little early), or, once the process has printed a
    progress line and ``progress()`` (the fraction of the work saved on disk) has reached the stretch, up to
    ``delay`` seconds later.

    Returns:
        What happened at each kill, for the assertion messages.
    """
    script, counter = _script(tmp_path), tmp_path / "writes"
    rng = random.Random(seed)
    history = []
    for i in range(KILLS):
        command = argv if i == 0 else [*argv, *resume]
        low, high = i / KILLS, (i + 1) / KILLS
        if i % 2 == 0:
            target = max(1, math.ceil(rng.uniform(low, high) * total_writes))
            code = _kill_in_write(command, script, counter, target)
            history.append(f"killed in write {target} of {total_writes}: exit {code}")
        else:
            wait = rng.uniform(0.0, delay)
            code = _kill_after(command, script, counter, lambda log, low=low: "%" in log and progress() >= low, wait)
            history.append(f"killed {wait:.2f} s after progress {progress():.2f} >= {low:.2f}: exit {code}")
        assert code in (-signal.SIGKILL, 0), history  # 0: it finished before the kill point
    # A write kill always lands (its point is reached no later than in an uninterrupted run): none found the work
    # finished, so the timed kills before them did not either, and the kills reached the last stretch.
    assert all(line.endswith(f"exit {-signal.SIGKILL}") for line in history[::2]), history
    done = _cli([*argv, *resume])
    assert done.returncode == 0, (history, done.stderr)
    return history


def _leftovers(directory: Path) -> list[Path]:
    """Temporary and partial files of any kind: ours (``.NAME.HOST.PID.XXXXXXXX.tmp``), any other hidden file,
    ``*.tmp``, ``*.part``, ``*~``, ``tempfile``'s ``tmpXXXXXXXX`` and ``*.partial.pt``."""
    return sorted(p for p in directory.rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".part", "~"))
                  or p.name.endswith(".partial.pt") or re.fullmatch(r"tmp\w{8}(\.\w+)?", p.name))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", "--out", str(out), "--epochs", "2", "--batch-size", "256", "--no-progress"]) == 0
    return out


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMING_FIELDS} for line in lines]


def _same(a: object, b: object) -> bool:
    """Equal bit for bit: tensors by ``torch.equal``, containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _points_done(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["points_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _stages_done(out: Path) -> int:
    """Stages of the Hessian analysis saved in its partial file (6 when its results are written)."""
    if (out / "hessian.json").exists():
        return 6
    try:
        state = torch.load(out / "hessian.partial.pt", weights_only=True)
    except Exception:  # noqa: BLE001 - absent, or renamed over while read
        return 0
    return int("eigen" in state) + int("trace" in state) + len(state.get("slq_runs", {}))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_killed_at_random_points_resumes_to_the_same_weights(tmp_path, seed):
    flags = ["--optimizer", "sam", "--epochs", "8", "--batch-size", "128", "--snapshot-every", "3"]
    reference = tmp_path / "reference"
    assert _cli(["train", *flags, "--out", str(reference)]).returncode == 0
    run = tmp_path / "killed"
    argv = ["train", *flags, "--out", str(run)]
    writes = _writes_of(["train", *flags, "--out", str(tmp_path / "counted")], tmp_path)
    history = _interrupt_and_finish(argv, ["--resume"], writes, lambda: _lines(run / "metrics.jsonl") / 8, seed,
                                    tmp_path, 0.6)

    for name in ("model.pt", "snapshots/epoch_0003.pt", "snapshots/epoch_0006.pt"):
        ours, theirs = torch.load(run / name, weights_only=True), torch.load(reference / name, weights_only=True)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), (name, history)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["epoch_0003.pt", "epoch_0006.pt"], history
    state, expected = torch.load(run / "state.pt", weights_only=True), torch.load(reference / "state.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], expected["model"][k]) for k in expected["model"])
    assert state["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    assert all("momentum_buffer" in buffers for buffers in expected["optimizer"]["state"].values())
    for part in ("optimizer", "scheduler", "scaler", "rng_cpu", "epoch"):  # SGD's momentum, bit for bit, and the rest
        assert _same(state[part], expected[part]), (part, history)
    assert _records(run) == _records(reference), history
    assert _leftovers(run) == [], history


@pytest.mark.slow
def test_surface_grid_killed_at_random_points_resumes_to_the_same_values(trained, tmp_path):
    flags = ["--dim", "2", "--steps", "7", "--split", "test"]
    reference = tmp_path / "reference"
    assert _cli(["surface", str(trained), *flags, "--out", str(reference)]).returncode == 0
    out = tmp_path / "killed"
    argv = ["surface", str(trained), *flags, "--out", str(out)]
    writes = _writes_of(["surface", str(trained), *flags, "--out", str(tmp_path / "counted")], tmp_path)
    history = _interrupt_and_finish(argv, [], writes, lambda: _points_done(out / "surface_2d_test.json") / 49, 2,
                                    tmp_path, 0.3)

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
    writes = _writes_of(["hessian", str(trained), *flags, "--out", str(tmp_path / "counted")], tmp_path)
    assert writes >= 8  # each stage (eigenpairs, trace, four SLQ runs) is saved, then the two result files
    history = _interrupt_and_finish(argv, ["--resume"], writes, lambda: _stages_done(out) / 6, 3, tmp_path, 1.0)

    ours, theirs = np.load(out / "hessian.npz"), np.load(reference / "hessian.npz")
    assert ours.files == theirs.files
    for name in ours.files:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{name}: {history}")
    scalars = {k: v for k, v in json.loads((out / "hessian.json").read_text()).items() if k not in _TIMING_FIELDS}
    expected = {k: v for k, v in json.loads((reference / "hessian.json").read_text()).items() if k not in _TIMING_FIELDS}
    assert scalars == expected, history
    assert _leftovers(out) == [], history


def test_the_leftover_check_finds_every_kind_of_temporary_file(tmp_path):
    names = [".model.pt.0a1b2c3d.12.abcdefgh.tmp", "state.pt.tmp", ".~lock.report.html#", "tmpab12cd34",
             "tmp_x1y2z3w.npz", "hessian.partial.pt", "metrics.jsonl~", "figure.png.part"]
    (tmp_path / "snapshots").mkdir()
    for name in names:
        (tmp_path / "snapshots" / name).write_bytes(b"")
    for name in ("model.pt", "metrics.jsonl", "surface_2d.npz", "hessian.json", "template.json"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in _leftovers(tmp_path)] == sorted(names)
