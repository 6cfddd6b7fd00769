"""The example notebook (examples/lab.ipynb) runs, cell by cell, in a Jupyter kernel, as a
reader runs it: it cannot rot unnoticed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "lab.ipynb"


def test_the_example_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_the_example_notebook_runs_in_a_jupyter_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    outputs = {i: c.outputs for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(str(o.get("data", {}).get("text/plain", "")) + o.get("text", "")
                     for outs in outputs.values() for o in outs)
    html = "\n".join(o.get("data", {}).get("text/html", "") for outs in outputs.values()
                     for o in outs)
    images = [o for outs in outputs.values() for o in outs if "image/png" in o.get("data", {})]
    assert "<bnlab Result compare" in text and "all finished" in text
    assert "<img" in html  # the result rendered as its report, figures inline
    assert len(images) >= 2  # the two accuracy figures
    assert "Higher final test accuracy" in text  # the verdict printed
    assert "nomean" in text  # the own norm's row in the summary table
    assert text.rstrip().endswith("True")  # load() reads the same metrics back
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["nb-compare", "nb-nomean"]
