"""Atomic writes leave nothing behind, stale temporary files are cleaned, bad files are named in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from landscape import storage
from landscape.storage import CorruptFileError


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    host = storage._host_id()
    dead = tmp_path / f".model.pt.{host}.{_dead_pid()}.abcd1234.tmp"
    alive = tmp_path / f".model.pt.{host}.{os.getpid()}.abcd1234.tmp"
    elsewhere = tmp_path / f".model.pt.{'0' * 8 if host != '0' * 8 else '1' * 8}.{_dead_pid()}.abcd1234.tmp"
    foreign = tmp_path / ".notes.tmp"
    (tmp_path / "sub").mkdir()
    nested = tmp_path / "sub" / f".state.pt.{host}.{_dead_pid()}.zz_9zz9z.tmp"
    for path in (dead, alive, elsewhere, foreign, nested):
        path.write_bytes(b"")
    assert storage.remove_stale_temporaries(tmp_path) == [dead]
    assert alive.exists() and elsewhere.exists() and foreign.exists() and nested.exists()
    assert storage.remove_stale_temporaries(tmp_path, recursive=True) == [nested]
    assert storage.remove_stale_temporaries(tmp_path / "missing") == []


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
