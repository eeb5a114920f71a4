"""Saving analysis results as plain files: ``NAME.json`` for scalars and metadata, ``NAME.npz`` for arrays.

Both are written atomically, the ``.npz`` first: the ``.json`` is the commit point, so a result is
finished only when both are there (:func:`results_complete`), and a lone ``.npz`` is what a kill between
the two writes left. Existing results are never overwritten unless asked for.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .storage import atomic_write, atomic_write_json

__all__ = ["save_results", "result_paths", "results_complete"]


def result_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{name}.json", out / f"{name}.npz"


def results_complete(out_dir: str | Path, name: str) -> bool:
    """Whether ``out_dir`` holds a finished result ``name``: its ``.npz`` and, written after it, its ``.json``."""
    return all(path.exists() for path in result_paths(out_dir, name))


def save_results(
    out_dir: str | Path, name: str, scalars: dict[str, Any], arrays: dict[str, np.ndarray], *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``arrays`` to ``out_dir/name.npz``, then ``scalars`` to ``out_dir/name.json`` (the commit point).

    Raises:
        FileExistsError: a result of that name exists and ``overwrite`` is False.
    """
    json_path, npz_path = result_paths(out_dir, name)
    existing = [str(p) for p in (json_path, npz_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{' and '.join(existing)} already exist; pass --overwrite to replace them")

    def write_npz(f: Any) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        f.write(buffer.getvalue())

    atomic_write(npz_path, write_npz)
    atomic_write_json(json_path, scalars)
    return json_path, npz_path
