"""The notebooks run top to bottom (nbclient, the project's own kernel)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

# reproduce_tables.ipynb needs result records: tests/analysis/test_report_notebook.py runs it
NOTEBOOKS = [Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert "relative output error" in outputs and "per_voxel" in outputs
