"""The notebooks in ``notebooks/`` run from top to bottom without an error, at their small size.

Each notebook is executed in a fresh Jupyter kernel (nbclient) with ``SAM_LANDSCAPE_NOTEBOOK_SMALL=1`` (tiny
sizes) and ``SAM_LANDSCAPE_NOTEBOOK_RUNS`` pointing into a temporary directory; the kernel inherits this
process's environment. The kernel runs on this very interpreter (``sys.executable``, through a kernel spec
written for the test), never on whatever ``python`` comes first on the PATH. The runs directory is shared by
the three notebooks: they train the same two digits runs with ``resume=True``, so the first notebook trains
them and the others reuse them (each notebook still trains them itself when run alone).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["quickstart.ipynb", "explore_a_minimum.ipynb", "reproduce_paper_figures.ipynb"]
KERNEL_NAME = "python3"
CELL_TIMEOUT = 600
DISPLAY_TYPES = ("image/png", "application/vnd.plotly.v1+json", "text/html")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a ``python3`` kernel spec that launches ipykernel on ``sys.executable``."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (sam-landscape tests)",
        "language": "python",
    }))
    return root


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebooks") / "runs"


def _display_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """The MIME types of every rich output (a figure, an image, an HTML table) of the executed notebook."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") in ("display_data", "execute_result"):
                found.extend(t for t in output.get("data", {}) if t in DISPLAY_TYPES)
    return found


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_small_size(name, tmp_path, kernel_dir, runs_dir, monkeypatch):
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    saved_outputs = [cell for cell in nb.cells if cell.cell_type == "code" and cell.get("outputs")]
    assert not saved_outputs, f"{name} is saved with outputs; clear them before committing"

    monkeypatch.setenv("SAM_LANDSCAPE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("SAM_LANDSCAPE_NOTEBOOK_RUNS", str(runs_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    client = nbclient.NotebookClient(
        nb, km=manager, timeout=CELL_TIMEOUT, startup_timeout=120, allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    client.execute()  # raises nbclient.exceptions.CellExecutionError at the first failing cell
    print(f"{name}: executed in {time.perf_counter() - start:.1f} s")

    displayed = _display_outputs(nb)
    assert displayed, f"{name} displayed no figure, image or HTML output"
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
