"""notebooks/reproduce_tables.ipynb runs top to bottom on hand-made records (nbclient, the project's own kernel)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from mqb.results import write_json_atomic
from tests.analysis.test_report import MD_SWIN, MD_UNET, grid

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "reproduce_tables.ipynb"


def test_reproduce_tables_notebook(tmp_path, monkeypatch):
    for r in grid():
        write_json_atomic(tmp_path / f"{r['id']}.json", r)
    monkeypatch.setenv("MQB_RESULTS", str(tmp_path))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3" resolves to the running interpreter (jupyter_client swaps a "python" argv for sys.executable)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert f"{tmp_path}: 14 configs, 0 failed" in text
    for line in (MD_SWIN[0], MD_SWIN[4], MD_UNET[0], MD_UNET[1]):
        assert line in text  # the Markdown table
    assert r"\multirow{7}{*}{swin\_unetr}" in text  # the LaTeX table
    assert "unet,btcv,w4a4,per_tensor,rtn,0.17," in text  # the CSV
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 4 and "dsc_unet_btcv.png" in text and "per_class_delta_dsc_unet_btcv.png" in text
