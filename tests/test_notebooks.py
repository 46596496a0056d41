"""The notebooks run top to bottom against a small results tree (real short runs, see test_figures.py), with their
outputs kept out of git, and between them they call every figure function."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_figures import shared_results_tree

from recurrent_bn import figures

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="session")
def results_tree(tmp_path_factory) -> Path:
    return shared_results_tree(tmp_path_factory)


def test_there_is_a_notebook_per_figure_group():
    assert [p.name for p in PATHS] == ["01_gradient_flow.ipynb", "02_mnist.ipynb", "03_language_modelling.ipynb",
                                       "04_ablations.ipynb", "05_paper_scale.ipynb"]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"


def test_the_notebooks_call_every_figure_function():
    source = "\n".join(cell.source for path in PATHS for cell in nbformat.read(path, as_version=4).cells)
    called = set(re.findall(r"figures\.(figure_\w+)\(", source))
    defined = {name for name in dir(figures) if re.fullmatch(r"figure_\w+", name)}
    assert called == defined


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs_top_to_bottom_on_stored_results(path, results_tree, monkeypatch):
    monkeypatch.setenv("RBN_RESULTS", str(results_tree))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert str(results_tree) in "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == sum("figures.figure_" in c.source for c in notebook.cells if c.cell_type == "code")
