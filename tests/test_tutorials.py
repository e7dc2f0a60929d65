"""Tutorials are executed (in fast mode) so that a tutorial that no longer runs fails CI."""

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted((Path(__file__).parents[1] / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SCBRANCH_TUTORIAL_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel must be this interpreter (the venv's), whatever PATH says
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    assert any(o.get("data", {}).get("text/plain") == "True" for o in nb.cells[-1]["outputs"])


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_stored_tutorials_show_their_figures(path):
    # the site renders the stored outputs: notebooks executed with a non-interactive backend
    # stored no figure, and the text pointed at plots nobody could see
    nb = nbformat.read(path, as_version=4)
    plotting = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and ("sb.pl." in cell.source or "sc.pl." in cell.source)
    ]
    blank = [
        i
        for i in plotting
        if not any("image/png" in o.get("data", {}) for o in nb.cells[i].get("outputs", []))
    ]
    assert plotting and not blank, f"cells {blank} of {path.name} plot but store no figure"
