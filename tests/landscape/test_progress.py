"""Progress on a terminal is a live bar; in a log or a pipe it is whole lines, one per update or per tenth."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys

from landscape.progress import LineProgress, interactive, progress_bar


def test_a_log_gets_one_line_per_tenth_of_the_work_and_no_control_characters():
    log = io.StringIO()
    bar = progress_bar(total=437, desc="surface", unit="pt", stream=log)
    for _ in range(437):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert isinstance(bar, LineProgress)
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [str(p) for p in range(10, 101, 10)]
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[-1].startswith("surface: 100% (437/437 pt, ")


def test_each_update_is_a_line_with_its_postfix_when_asked_and_nothing_when_disabled():
    log = io.StringIO()
    epochs = progress_bar(range(2, 5), desc="train sam", unit="epoch", initial=2, total=5, lines="each", stream=log)
    for epoch in epochs:
        epochs.set_postfix(test_acc=f"{epoch / 10:.3f}")
    assert log.getvalue().splitlines()[0].startswith("train sam: 60% (3/5 epoch, ")
    assert log.getvalue().splitlines()[-1].endswith("test_acc=0.400")
    quiet = io.StringIO()
    for _ in progress_bar(range(3), lines=None, stream=quiet):
        pass
    for _ in progress_bar(range(3), enabled=False, stream=quiet):
        pass
    assert quiet.getvalue() == ""


def test_a_resumed_bar_counts_from_where_it_was_and_a_bar_without_total_counts_up():
    log = io.StringIO()
    bar = progress_bar(total=10, initial=5, desc="grid", stream=log)
    bar.update(1)
    assert log.getvalue().startswith("grid: 60% (6/10 it")  # the tenths up to 50% were done before
    log = io.StringIO()
    bar = progress_bar(desc="loader", lines="each", stream=log)
    bar.update(2)
    assert log.getvalue().startswith("loader: (2 it, ")


def test_a_terminal_gets_the_live_bar():
    leader, follower = pty.openpty()
    try:
        with os.fdopen(os.dup(follower), "w") as terminal:
            assert interactive(terminal)
            bar = progress_bar(total=3, desc="work", stream=terminal)
            assert not isinstance(bar, LineProgress)
            bar.close()
    finally:
        os.close(leader)
        os.close(follower)
    assert not interactive(io.StringIO())


def test_the_command_line_through_a_pipe_writes_one_plain_line_per_epoch(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sam.cli", "train", "--epochs", "3", "--batch-size", "256",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, check=True)
    assert "\r" not in done.stderr and "\x1b[" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 3, done.stderr
    for epoch, line in enumerate(lines, start=1):
        assert line.startswith(f"train sgd: {round(100 * epoch / 3)}% ({epoch}/3 epoch, ") and "test_acc=" in line
    analysis = subprocess.run([sys.executable, "-m", "sam.cli", "surface", str(tmp_path / "run"), "--steps", "9",
                               "--split", "test"], capture_output=True, text=True, check=True)
    assert "\r" not in analysis.stderr and "\x1b[" not in analysis.stderr
    assert analysis.stderr.splitlines() == [line for line in analysis.stderr.splitlines() if line.startswith("surface: ")]
    assert len(analysis.stderr.splitlines()) == 10  # 81 points: one line per tenth
