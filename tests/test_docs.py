"""The documentation builds with warnings as errors, offline, and documents every module.

One Sphinx build (``python -m sphinx -W``, as the README's command runs it) into a temporary
folder; the checks below read its pages. The test extra installs Sphinx (``pip install
".[test]"`` includes ``.[docs]``).
"""

import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyro_nflows

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYRO_NFLOWS_DOCS_")}
    environment["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               "-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the documentation build failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return out / "html"


def test_every_module_has_a_page(html):
    modules = [pyro_nflows.__name__] + [
        info.name for info in pkgutil.walk_packages(pyro_nflows.__path__, prefix="pyro_nflows.")
    ]
    missing = [name for name in modules[1:] if not (html / "api" / "generated" / f"{name}.html").is_file()]
    assert not missing, f"modules missing from the API reference (add them to docs/api/index.rst): {missing}"


def test_equations_and_cross_references(html):
    page = (html / "api" / "generated" / "pyro_nflows.transforms.planar_flow.html").read_text(encoding="utf-8")
    assert 'class="math' in page  # the docstrings' .. math:: reach MathJax
    assert "https://docs.pyro.ai/en/stable/distributions.html#pyro.distributions.TransformModule" in page
    assert "https://arxiv.org/abs/1505.05770" in page  # the references' arXiv ids are links


def test_benchmark_links_land_on_their_sections(html):
    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    anchors = re.findall(r'<a id="([A-Za-z0-9_-]+)"></a>', readme)
    page = (html / "benchmarks.html").read_text(encoding="utf-8")
    assert anchors and all(f'id="{anchor}"' in page for anchor in anchors)
    # a docstring's "benchmarks/README.md#name" is a link to that section
    planar = (html / "api" / "generated" / "pyro_nflows.transforms.planar_flow.html").read_text(encoding="utf-8")
    assert "benchmarks.html#planar-inverse-iterations" in planar


def test_command_line_page_has_every_command(html):
    import argparse

    from pyro_nflows.cli import _parser  # the function docs/cli.rst hands to sphinx-argparse

    (commands,) = [action for action in _parser()._actions if isinstance(action, argparse._SubParsersAction)]
    page = (html / "cli.html").read_text(encoding="utf-8")
    missing = [name for name in commands.choices if f'id="pyro-nflows-{name}"' not in page]
    assert commands.choices and not missing
