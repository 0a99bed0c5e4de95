"""Every notebook executes top to bottom at SIZE = 'small' (so they never rot).

The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH), so the
notebooks see the same jaxcryo as the tests. Skipped where nbclient/ipykernel are absent.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
NAMES = ["01_quickstart.ipynb", "02_conditioning.ipynb", "03_convergence.ipynb", "04_refine.ipynb"]


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    """A kernelspec that runs sys.executable, found first on JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "jaxcryo-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxcryo test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return "jaxcryo-test"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_at_small_size(name, this_python_kernel, tmp_path):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    size_cell = next(c for c in nb.cells if c.cell_type == "code")
    assert size_cell.source.startswith('SIZE = "small"'), "the first code cell is the size switch"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    client = nbclient.NotebookClient(nb, kernel_name=this_python_kernel, timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failure
    print(f"{name}: {time.perf_counter() - t0:.1f} s")
