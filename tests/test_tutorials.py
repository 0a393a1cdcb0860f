"""Every tutorial notebook runs from top to bottom (in its short "smoke test" form, selected by
the ``CI`` environment variable, as Pyro's tutorials do), and the tour names every flow family.

The notebooks (``tutorials/*.ipynb``) are saved with the outputs of a full-size run; here they
are executed with nbclient in a temporary working directory, and the executed copy is discarded.
"""

import json
import os
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def _source(path: Path) -> str:
    """The text of a notebook's cells, code and Markdown."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells)


def test_there_are_tutorials():
    assert {"flow_tour", "flow_guides", "vae_posteriors", "density_estimation"} <= {p.stem for p in NOTEBOOKS}
    assert not list((ROOT / "tutorials").glob("*.py")), "one source per tutorial: the .ipynb"


def test_the_tour_names_every_family():
    from pyro_nflows.registry import FLOWS

    source = _source(ROOT / "tutorials" / "flow_tour.ipynb")
    missing = [name for name in FLOWS if f'"{name}"' not in source]
    assert not missing, f"flow families missing from tutorials/flow_tour.ipynb: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs(path, tmp_path, monkeypatch):
    # The kernel inherits this process's environment. One thread, as conftest.py sets for the
    # tests in this process (a kernel does not inherit torch.set_num_threads): with the other core
    # busy, two threads made these runs several times slower. PYTHONPATH: the checkout's package,
    # even where another copy is installed.
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    before = sorted((ROOT / "tutorials").iterdir())
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback
    assert sorted((ROOT / "tutorials").iterdir()) == before, "a tutorial wrote files into tutorials/"
