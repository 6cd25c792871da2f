"""The committed walkthrough notebook was executed top to bottom without errors.

Re-executing it needs mini-MIAS and minutes of CPU, so the suite only reads the saved file;
`python -m tools.run_notebook` refreshes it (and refuses to save a run with a failed cell).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "notebooks" / "walkthrough.ipynb"
MAX_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def notebook() -> nbformat.NotebookNode:
    parsed = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(parsed)
    return parsed


def test_notebook_is_small_enough_to_review() -> None:
    assert NOTEBOOK.stat().st_size < MAX_BYTES


def test_every_code_cell_ran_in_order_without_errors(notebook: nbformat.NotebookNode) -> None:
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 8
    counts = [cell.get("execution_count") for cell in code]
    assert all(isinstance(c, int) for c in counts), f"unexecuted cells: {counts}"
    assert counts == list(range(1, len(code) + 1)), f"not one clean top-to-bottom run: {counts}"
    for cell in code:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"{output.get('ename')}: {output.get('evalue')}"
            if output["output_type"] == "stream" and output["name"] == "stderr":
                assert "Traceback" not in output["text"]


def test_figures_and_sections_are_present(notebook: nbformat.NotebookNode) -> None:
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(images) >= 8, "data, preprocessing, training, ROC, confusion, calibration, gallery"
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert "../shared/data/mias" in first.source and "tools.run_notebook" in first.source
    headings = " ".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    for section in ("Data", "Preprocessing", "Training", "Evaluation", "Heatmaps"):
        assert section in headings
