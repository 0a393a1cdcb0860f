"""Every tutorial runs from top to bottom (in its short "smoke test" form,
selected by the ``CI`` environment variable, as Pyro's tutorials do)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("*.py"))


def test_there_are_tutorials():
    assert TUTORIALS


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    # One thread, as conftest.py sets for the tests in this process (a subprocess does not inherit
    # torch.set_num_threads): with the other core busy, two threads made these runs 6-10 times slower.
    environment = {**os.environ, "CI": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
