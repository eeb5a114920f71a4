"""Files a person can open, written so that a kill never tears them and read with errors that name them.

Writes go to a temporary file beside the target, are flushed to disk, then renamed over it, so a reader
(or a resumed run) sees either the old file or the new one. A process killed with ``SIGKILL`` between
creating the temporary file and renaming it cannot clean up after itself: the temporary file's name
records the host and process that made it (``.NAME.HOST.PID.XXXXXXXX.tmp``), its writer holds an
``fcntl.flock`` on it until the rename, and :func:`remove_stale_temporaries`, called when a command starts
on a directory, deletes the ones nobody holds any more. The lock, not the process id, says whether the
writer is alive: in containers every writer may be PID 1. Where ``fcntl`` is missing (Windows) or the
file system refuses locks, a temporary file is stale when its process, on this host, is gone.

Reads of what the toolkit wrote (JSON, JSON lines, ``torch.save`` files) raise :class:`CorruptFileError`, a
``ValueError`` whose one-line message names the file and what is wrong with it, instead of the parser's
own error; the command line turns it into ``error: ...`` and exit code 2. Checkpoints are read with
``torch.load(weights_only=True)``: a file holding pickled Python objects is refused, never executed.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write_json(folder / "config.json", {"rho": 0.05})
    >>> read_json(folder / "config.json")
    {'rho': 0.05}
    >>> _ = (folder / "broken.json").write_text('{"rho": 0.05')
    >>> read_json(folder / "broken.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    landscape.storage.CorruptFileError: .../broken.json is not valid JSON (Expecting ',' delimiter: line 1 column 13); ...
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

try:
    import fcntl
except ImportError:  # Windows: staleness falls back to the process id in the name
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CorruptFileError",
    "atomic_write",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "remove_stale_temporaries",
    "read_json",
    "read_jsonl",
    "load_weights",
    "differing_keys",
    "file_sha256",
]


class CorruptFileError(ValueError):
    """A file the toolkit reads is unreadable, truncated, unsafe or not what it should hold."""


# ---------------------------------------------------------------------------------------------- writes


def _host_id() -> str:
    """Eight hex digits naming this machine in temporary-file names (host names may hold dots)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it sets it: read it once, at import, before any thread writes
    os.umask(mask)
    return mask


_UMASK = _read_umask()
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp$")
# A temporary file of another machine is deleted only when its lock is free and it is this old: a file
# system whose locks do not reach other machines (NFS with local_lock) would show a live writer's lock free.
_FOREIGN_STALE_SECONDS = 3600.0


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{_host_id()}.{os.getpid()}."


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, and rename it over ``path``.

    The temporary file is locked (``fcntl.flock``) from its creation until it is renamed, which tells
    :func:`remove_stale_temporaries` in any process that it is being written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _locked_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # renamed while open, so locked until then (Windows cannot rename an open file)
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _locked_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (mode 0600 until chmod), open and locked by this process.

    A cleaner may lock the file between its creation and our lock: then it deletes it, and we take
    another one (the link count of what we hold is 0).
    """
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
        if fcntl is None:
            return fd, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a cleaner holds it, for the time of an unlink
        except OSError:  # a file system without locks: the process id in the name is all there is
            return fd, tmp
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks (a large checkpoint is never held whole)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temporaries(directory: str | Path, *, recursive: bool = False) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` in ``directory`` whose writer is gone.

    A temporary file is stale when nobody holds its lock (its writer was killed before it could rename
    or delete it; the kernel dropped the lock with the process), taken here without waiting. A file made
    on another host must also be an hour old, in case the file system's locks do not reach across
    machines. Without ``fcntl``, or on a file system that refuses locks, a file is stale when it was
    made on this host by a process that no longer runs. Every other file is left alone.

    Returns:
        The files deleted.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    here = _host_id()
    removed = []
    for candidate in directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp"):
        match = _TEMPORARY.match(candidate.name)
        if match is None:
            continue
        if _remove_if_stale(candidate, match["host"] == here, int(match["pid"])):
            removed.append(candidate)
    return removed


def _remove_if_stale(candidate: Path, same_host: bool, pid: int) -> bool:
    """Delete ``candidate`` if its writer is gone (see :func:`remove_stale_temporaries`); whether it did."""
    held = _lock_if_free(candidate)
    if held is None:  # no locks here: judge by the process id
        if not same_host or _process_alive(pid):
            return False
        return _unlink(candidate)
    if held is False:
        return False
    try:
        if not same_host and time.time() - os.fstat(held).st_mtime < _FOREIGN_STALE_SECONDS:
            return False
        return _unlink(candidate)  # under the lock: a writer still waiting to lock it finds it gone, takes another
    finally:
        os.close(held)


def _lock_if_free(path: Path) -> int | bool | None:
    """An open descriptor holding ``path``'s lock, ``False`` when someone else holds it (or it is gone), or
    ``None`` when locks cannot be used (no ``fcntl``, a file system without them, a file we cannot open)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR)  # a lock over NFS needs a file open for writing
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        return False if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    return fd


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:  # another process cleaned it first
        return False
    return True


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM  # it exists, under another user
    return True


# ----------------------------------------------------------------------------------------------- reads


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``.

    Raises:
        FileNotFoundError: there is no such file.
        CorruptFileError: it is not UTF-8 JSON (the message gives the line and column).
    """
    path = Path(path)
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{path} is not valid JSON ({error.msg}: line {error.lineno} column {error.colno}); "
                               "it may be truncated or edited by hand") from None


def read_jsonl(path: str | Path) -> list[Any]:
    """One JSON value per non-empty line of ``path``.

    Raises:
        FileNotFoundError: there is no such file.
        CorruptFileError: a line is not JSON (the message gives its number).
    """
    path = Path(path)
    values = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise CorruptFileError(f"{path} line {number} is not valid JSON ({error.msg}: column {error.colno}); "
                                   "it may be truncated or edited by hand") from None
    return values


def load_weights(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors that name the file.

    Only tensors and plain containers are loaded; a file holding pickled Python objects is refused, not
    executed.

    Raises:
        FileNotFoundError: there is no such file.
        CorruptFileError: the file is empty, truncated, not a ``torch.save`` file, or holds objects other
            than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path} is empty (0 bytes): the process writing it was killed or the disk was full")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # the unpickler met a class or function to import
        if found:
            raise CorruptFileError(f"{path} holds pickled Python objects ({found[1]}), not just tensors; it is not "
                                   "loaded (weights_only=True): save a plain state_dict with "
                                   "torch.save(model.state_dict(), path)") from None
        raise CorruptFileError(f"{path} is not a torch.save file (unreadable pickle stream)") from None
    except Exception as error:  # noqa: BLE001 - unpickling garbage raises almost anything (KeyError, EOFError, ...)
        raise CorruptFileError(f"{path} is truncated or not a torch.save file ({type(error).__name__}: "
                               f"{_first_line(error)})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except IsADirectoryError:
        raise CorruptFileError(f"{path} is a directory, not a file") from None
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path} is not UTF-8 text (byte {error.start}); it may be a binary file") from None


def _first_line(error: BaseException) -> str:
    """The first sentence of an error's message (torch's go on for several lines of advice)."""
    text = " ".join(str(error).split())
    return text.split(". ")[0].rstrip(".")[:200] if text else type(error).__name__


_MISSING = object()


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between a saved configuration and the current one (a key
    present in only one of them differs, even when its value is ``None``)."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k, _MISSING) != current.get(k, _MISSING))
