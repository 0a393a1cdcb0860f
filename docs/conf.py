"""Sphinx configuration of the pyro_nflows documentation.

Build (the README's command)::

    pip install ".[docs]" && sphinx-build -W -b html docs docs/_build/html

The build needs no network: nothing below downloads anything. Two choices
follow from that, both explained where they are set:

- intersphinx reads small inventories shipped in ``docs/_inventories/``
  rather than Pyro's and PyTorch's own ``objects.inv``;
- MathJax is loaded by the reader's browser (from its CDN, as Sphinx does by
  default), or from a local copy named by ``PYRO_NFLOWS_DOCS_MATHJAX``.

The project's own helpers (cross-references to re-exported names, the
references blocks of docstrings, links to ``benchmarks/README.md``) are in
``docs/_ext/nflows_docs.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the checkout's package, installed or not; the local extension lives in _ext.
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]

import nflows_docs  # noqa: E402

import pyro_nflows  # noqa: E402

project = "pyro_nflows"
author = "the pyro_nflows contributors"
copyright = "the pyro_nflows contributors"  # noqa: A001 (Sphinx's name)
release = version = pyro_nflows.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinxarg.ext",
    "myst_nb",  # Markdown pages (it includes myst-parser) and, later, the tutorials' notebooks
    "nflows_docs",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# -- API reference ------------------------------------------------------------------------------
# autosummary writes one page per module into api/generated/ (not committed: .gitignore); the
# template (_templates/autosummary/module.rst) gives a package its docstring and its modules, and a
# module its docstring and the members its __all__ names, in __all__'s order.
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "signature"
add_module_names = False
nflows_docs.clean_generated(DOCS / "api" / "generated")

# -- Markdown and notebooks ----------------------------------------------------------------------
# The tutorials (tutorials/*.ipynb, saved with their outputs) are shown as saved: never executed
# here. nflows_docs copies them into docs/tutorials/ (not committed) before the build reads it, and
# puts the toctree of those there are on the tutorials page (a toctree naming a notebook that is
# not there yet, or a glob matching none, is a warning).
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# The tutorials page lists the notebooks there are (none yet: the tutorials are scripts today), in
# this order, then any others by name.
nflows_docs_notebooks = str(ROOT / "tutorials")
nflows_docs_notebook_order = ["flow_tour", "flow_guides", "vae_posteriors", "density_estimation"]

# -- Cross-references to Pyro and PyTorch --------------------------------------------------------
# Sphinx would download https://docs.pyro.ai/en/stable/objects.inv and
# https://pytorch.org/docs/stable/objects.inv; the build must work offline (CI has no network), and
# a fetch that fails is a warning. So the inventories are read from docs/_inventories/*.txt: the
# Pyro and PyTorch objects this documentation names, each with the page and anchor it has on those
# sites (checked against their documentation sources; see the files' headers). A name not listed
# stays plain text. nflows_docs compresses the text files into Sphinx's inventory format at startup.
# PYRO_NFLOWS_DOCS_INTERSPHINX=online uses the sites' full inventories instead (needs the network).
_ONLINE = os.environ.get("PYRO_NFLOWS_DOCS_INTERSPHINX") == "online"
intersphinx_mapping = {
    "pyro": ("https://docs.pyro.ai/en/stable/", None if _ONLINE else nflows_docs.inventory(DOCS, "pyro")),
    "torch": ("https://pytorch.org/docs/stable/", None if _ONLINE else nflows_docs.inventory(DOCS, "torch")),
}
intersphinx_timeout = 10

# -- Equations -------------------------------------------------------------------------------------
# The docstrings' ``.. math::`` and :math: are typeset by MathJax in the reader's browser; the build
# itself fetches nothing. By default the pages load MathJax from Sphinx's CDN URL. For reading the
# pages offline, PYRO_NFLOWS_DOCS_MATHJAX names a local MathJax: a MathJax 3/4 ``tex-mml-chtml.js``,
# or MathJax 2's ``MathJax.js`` (Debian's libjs-mathjax: /usr/share/javascript/mathjax/MathJax.js).
_MATHJAX = os.environ.get("PYRO_NFLOWS_DOCS_MATHJAX")
if _MATHJAX:
    mathjax_path = nflows_docs.local_mathjax(_MATHJAX)
    if "/MathJax.js?" in mathjax_path:
        # MyST wraps Markdown pages in a "tex2jax_ignore mathjax_ignore" container (so that a stray
        # "$" is left alone) and tells MathJax 3 to typeset the "math" spans inside it
        # (processHtmlClass); MathJax 2 reads the same rule from its own option.
        mathjax2_config = {"tex2jax": {"processClass": "tex2jax_process|mathjax_process|math|output_area"}}

# -- HTML --------------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"pyro_nflows {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Normalizing flows for Pyro",
    "page_width": "1180px",
    "sidebar_width": "250px",
    "fixed_sidebar": True,
}
