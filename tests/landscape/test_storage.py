"""Atomic writes leave nothing behind, stale temporary files are cleaned, bad files are named in one line."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from landscape import storage
from landscape.storage import CorruptFileError


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def _other_host() -> str:
    return "0" * 8 if storage._host_id() != "0" * 8 else "1" * 8


@contextlib.contextmanager
def _held(path):
    """``path`` open and locked, as a live writer holds its temporary file (a no-op without fcntl)."""
    fd = os.open(path, os.O_RDWR)
    try:
        if storage.fcntl is not None:
            storage.fcntl.flock(fd, storage.fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.mark.parametrize("locks", [True, False], ids=["flock", "without-fcntl"])
def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path, monkeypatch, locks):
    if not locks:  # a platform without fcntl (Windows): the process id in the name decides
        monkeypatch.setattr(storage, "fcntl", None)
    host = storage._host_id()
    dead = tmp_path / f".model.pt.{host}.{_dead_pid()}.abcd1234.tmp"
    alive = tmp_path / f".model.pt.{host}.{os.getpid()}.abcd1234.tmp"
    elsewhere = tmp_path / f".model.pt.{_other_host()}.{_dead_pid()}.abcd1234.tmp"
    foreign = tmp_path / ".notes.tmp"
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f".state.pt.{host}.{_dead_pid()}.zz_9zz9z.tmp"
    for path in (dead, alive, elsewhere, foreign, nested):
        path.write_bytes(b"")
    with _held(alive):  # its writer is alive and writing
        assert storage.remove_stale_temporaries(tmp_path) == [dead]
        assert alive.exists() and elsewhere.exists() and foreign.exists() and nested.exists()
        assert storage.remove_stale_temporaries(tmp_path, recursive=True) == [nested]
    assert storage.remove_stale_temporaries(tmp_path / "missing") == []


def test_the_lock_not_the_process_id_tells_a_live_writer_in_a_container(tmp_path):
    """Every writer in a container may be PID 1: a dead one's file is stale, a live one's is not."""
    host = storage._host_id()
    killed = tmp_path / f".model.pt.{host}.1.abcd1234.tmp"  # its process was killed with its container
    writing = tmp_path / f".state.pt.{host}.1.efgh5678.tmp"
    mine = tmp_path / f".metrics.jsonl.{host}.{os.getpid()}.ijkl9012.tmp"  # left by an earlier PID 1
    dead_but_held = tmp_path / f".config.json.{host}.{_dead_pid()}.mnop3456.tmp"  # e.g. a forked child holds it
    for path in (killed, writing, mine, dead_but_held):
        path.write_bytes(b"")
    with _held(writing), _held(dead_but_held):
        assert sorted(storage.remove_stale_temporaries(tmp_path)) == sorted([killed, mine])
    assert writing.exists() and dead_but_held.exists()


def test_a_temporary_file_of_another_host_is_removed_only_when_free_and_old(tmp_path):
    fresh = tmp_path / f".model.pt.{_other_host()}.7.abcd1234.tmp"
    old = tmp_path / f".state.pt.{_other_host()}.7.efgh5678.tmp"
    old_held = tmp_path / f".config.json.{_other_host()}.7.ijkl9012.tmp"
    for path in (fresh, old, old_held):
        path.write_bytes(b"")
    for path in (old, old_held):
        os.utime(path, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    with _held(old_held):
        assert storage.remove_stale_temporaries(tmp_path) == [old]
    assert fresh.exists() and old_held.exists()


def test_a_writer_holds_its_temporary_file_until_the_rename(tmp_path, monkeypatch):
    """A cleaner running while a file is written (here: a dead process id in the name) leaves it alone."""
    dead = _dead_pid()
    monkeypatch.setattr(storage, "_temporary_prefix", lambda path: f".{path.name}.{storage._host_id()}.{dead}.")
    removed = []

    def write(f):
        f.write(b"weights")
        removed.extend(storage.remove_stale_temporaries(tmp_path))

    storage.atomic_write(tmp_path / "model.pt", write)
    assert removed == [] and (tmp_path / "model.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.skipif(storage.fcntl is None, reason="without fcntl there is no lock to race for")
def test_a_writer_whose_new_file_a_cleaner_deleted_takes_another(tmp_path, monkeypatch):
    made = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp(**kwargs):
        fd, name = real_mkstemp(**kwargs)
        made.append(name)
        if len(made) == 1:  # a cleaner locked and deleted it before the writer could lock it
            os.unlink(name)
        return fd, name

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
    storage.atomic_write_text(tmp_path / "metrics.jsonl", "{}\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    assert len(made) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_the_umask_is_read_once_not_on_every_write(tmp_path, monkeypatch):
    def umask(mask):
        raise AssertionError("os.umask called during a write (it changes the mask for every thread)")

    monkeypatch.setattr(os, "umask", umask)
    storage.atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~storage._UMASK


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    storage.atomic_write_text(target, "old\n")

    def failing(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        storage.atomic_write(target, failing)
    assert target.read_text() == "old\n" and sorted(tmp_path.iterdir()) == [target]


def test_reading_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(CorruptFileError, match=r"config.json is not valid JSON \(Expecting value: line 2 column 7\)"):
        storage.read_json(path)
    path.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(CorruptFileError, match=r"config.json is not UTF-8 text \(byte 0\)"):
        storage.read_json(path)
    with pytest.raises(FileNotFoundError, match="nowhere.json not found"):
        storage.read_json(tmp_path / "nowhere.json")
    lines = tmp_path / "metrics.jsonl"
    lines.write_text('{"epoch": 1}\n\n{"epoch": 2\n')
    with pytest.raises(CorruptFileError, match=r"metrics.jsonl line 3 is not valid JSON"):
        storage.read_jsonl(lines)
    lines.write_text('{"epoch": 1}\n\n{"epoch": 2}\n')
    assert storage.read_jsonl(lines) == [{"epoch": 1}, {"epoch": 2}]


class _Payload:
    def __reduce__(self):
        return (print, ("executed",))


def test_loading_weights_refuses_every_kind_of_bad_file(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0)}, good)
    assert torch.equal(storage.load_weights(good)["w"], torch.arange(3.0))
    cases = {
        "empty.pt": (b"", r"is empty \(0 bytes\)"),
        "truncated.pt": (good.read_bytes()[:60], "is truncated or not a torch.save file"),
        "text.pt": (b"hello world" * 10, "is truncated or not a torch.save file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CorruptFileError, match=message) as caught:
            storage.load_weights(tmp_path / name)
        assert name in str(caught.value) and "\n" not in str(caught.value)
    torch.save({"w": _Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(CorruptFileError, match=r"unsafe.pt holds pickled Python objects \(print\)"):
        storage.load_weights(tmp_path / "unsafe.pt")
    assert "executed" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        storage.load_weights(tmp_path / "missing.pt")
