"""The documentation's own Sphinx helpers (loaded by docs/conf.py as the extension ``nflows_docs``).

- :func:`resolve_public_name`: a docstring may name an object by the path users import it from
  (``pyro_nflows.transforms.Householder``, ``pyro_nflows.vae.VAE``); the API reference documents
  it where it is defined (``pyro_nflows.transforms.linear.Householder``). Unresolved references to
  ``pyro_nflows.*`` are looked up by importing the name and reading its ``__module__``.
- :func:`format_docstring`: the docstrings' plain-text conventions made links: a numbered
  reference list (``[1] Authors. Title. arXiv:1234.56789``, continued on indented lines) becomes
  one paragraph per reference with the arXiv id linked, and ``benchmarks/README.md#name`` links
  to that section of the benchmarks page.
- :func:`anchors_to_targets`: ``benchmarks/README.md`` marks its sections with raw HTML anchors
  (``<a id="name"></a>``, which GitHub shows); included in the docs they become MyST targets, so
  that ``[text](#name)`` links and the docstrings' links resolve.
- :func:`copy_notebooks` and :func:`notebooks_toctree`: the tutorials' notebooks live in
  ``tutorials/``, outside the source folder; they are copied into ``docs/tutorials/`` (not
  committed) before the build reads it, and the tutorials page lists those there are.
- :func:`skip_inherited_forward`: no torch boilerplate for undocumented ``forward`` methods.
- :func:`inventory` and :func:`local_mathjax`: the offline intersphinx inventories and a local
  MathJax (see docs/conf.py for why).
"""

from __future__ import annotations

import atexit
import importlib
import re
import shutil
import tempfile
import types
import zlib
from pathlib import Path

from sphinx.application import Sphinx

_TEMPORARY: list[Path] = []


def clean_generated(folder: Path) -> None:
    """Remove the autosummary pages of an earlier build (a renamed module would leave a stale page,
    which Sphinx then warns is in no toctree)."""
    shutil.rmtree(folder, ignore_errors=True)


def inventory(docs: Path, name: str) -> str:
    """Sphinx's compressed inventory made from ``docs/_inventories/<name>.txt``; returns its path.

    The text file holds a header of ``#`` lines (project, version, where the entries were checked)
    and one entry a line, as Sphinx's inventory format has them: ``name domain:role priority uri
    display-name`` (``$`` in the uri stands for the name, ``-`` as the display name for the name;
    Sphinx itself expands a ``$`` only at the end of the uri, so it is expanded here)."""
    text = (docs / "_inventories" / f"{name}.txt").read_text(encoding="utf-8")
    header = {}
    entries = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            header[key.strip().lower()] = value.strip()
        elif line.strip():
            entry, role, priority, uri, display = line.split(maxsplit=4)
            entries.append(" ".join([entry, role, priority, uri.replace("$", entry), display]))
    if not _TEMPORARY:
        _TEMPORARY.append(Path(tempfile.mkdtemp(prefix="pyro_nflows_docs_")))
        atexit.register(shutil.rmtree, _TEMPORARY[0], True)
    path = _TEMPORARY[0] / f"{name}.inv"
    head = (
        "# Sphinx inventory version 2\n"
        f"# Project: {header.get('project', name)}\n"
        f"# Version: {header.get('version', '')}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path.write_bytes(head.encode() + zlib.compress(("\n".join(entries) + "\n").encode(), 9))
    return str(path)


def local_mathjax(location: str) -> str:
    """The ``mathjax_path`` for a local MathJax file: a ``file:`` URL, with MathJax 2's
    configuration argument when the file is MathJax 2's ``MathJax.js``."""
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"PYRO_NFLOWS_DOCS_MATHJAX names {location!r}, which is not a file")
    url = path.as_uri()
    if path.name == "MathJax.js":
        url += "?config=TeX-AMS-MML_HTMLorMML"
    return url


def _import_public(target: str):
    """The object a dotted ``pyro_nflows.*`` path names, or ``None``."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def _defined_name(target: str) -> str | None:
    """Where the object that ``target`` names is defined: ``module.qualname`` (a module: its name;
    anything else, such as a constant: its owner's defined name, plus its own name)."""
    obj = _import_public(target)
    if obj is None:
        return None
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    owner, _, attribute = target.rpartition(".")
    owner_name = _defined_name(owner) if owner.startswith("pyro_nflows") else None
    return f"{owner_name}.{attribute}" if owner_name else None


def resolve_public_name(app: Sphinx, env, node, contnode):
    """``missing-reference``: resolve a ``pyro_nflows`` name to where it is defined and documented.

    ``pyro_nflows.vae.VAE`` is looked up as ``pyro_nflows.vae.model.VAE``; a bare name written in a
    module's docstring (``DensityModel`` in ``pyro_nflows.cli``, which imports it) as what that
    module (or the class the docstring belongs to) holds under that name."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if target.startswith("pyro_nflows."):
        candidates = [target]
    else:
        module, owner = node.get("py:module") or "", node.get("py:class")
        if not module.startswith("pyro_nflows") or target.startswith("."):
            return None
        candidates = ([f"{module}.{owner}.{target}"] if owner else []) + [f"{module}.{target}"]
    domain = env.get_domain("py")
    for candidate in candidates:
        defined = _defined_name(candidate)
        if defined is None or defined == target:
            continue
        found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], defined, node, contnode)
        if found is not None:
            return found
    return None


_REFERENCE = re.compile(r"^(\s*)\[(\d+)\]\s+\S")
_ARXIV = re.compile(r"(?<![\w/`<])arXiv:(\d{4}\.\d{4,5})(v\d+)?")
_BENCHMARK_LINK = re.compile(r"(?<![\w/`<])benchmarks/README\.md#([a-z0-9][a-z0-9-]*)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _literal_lines(lines: list[str]) -> list[bool]:
    """Which lines are code: literal blocks (after a line ending in ``::``, while indented deeper
    than it) and doctest blocks (from ``>>>`` to the next blank line)."""
    flags = []
    literal_indent = None  # the indentation of the "::" line whose block we are in
    in_doctest = False
    for line in lines:
        stripped = line.strip()
        if literal_indent is not None and stripped and _indent(line) <= literal_indent:
            literal_indent = None
        if in_doctest and not stripped:
            in_doctest = False
        if literal_indent is None and not in_doctest and stripped.startswith(">>>"):
            in_doctest = True
        flags.append(literal_indent is not None or in_doctest)
        if literal_indent is None and not in_doctest and stripped.endswith("::"):
            literal_indent = _indent(line)
    return flags


def _join_references(lines: list[str]) -> list[str]:
    """``[n] text`` followed by lines indented deeper: one line each, a blank line between them
    (otherwise reST reads the continuation as a definition, or as a block quote). Code is left
    as it is."""
    literal = _literal_lines(lines)
    out: list[str] = []
    index = 0
    while index < len(lines):
        match = None if literal[index] else _REFERENCE.match(lines[index])
        if match is None:
            out.append(lines[index])
            index += 1
            continue
        indent = len(match.group(1))
        joined = lines[index].rstrip()
        index += 1
        while index < len(lines) and lines[index].strip() and _indent(lines[index]) > indent:
            joined += " " + lines[index].strip()
            index += 1
        if out and out[-1].strip():
            out.append("")
        out.extend([joined, ""])
    return out


def _arxiv_link(match: re.Match) -> str:
    return f"`arXiv:{match.group(1)}{match.group(2) or ''} <https://arxiv.org/abs/{match.group(1)}>`__"


def _benchmark_link(match: re.Match) -> str:
    return f":ref:`benchmarks/README.md#{match.group(1)} <{match.group(1)}>`"


def format_docstring(app: Sphinx, what: str, name: str, obj, options, lines: list[str]) -> None:
    """``autodoc-process-docstring``: reference lists, arXiv ids and benchmark links (see above)."""
    joined = _join_references(lines)
    for index, (line, code) in enumerate(zip(joined, _literal_lines(joined))):
        if not code:
            joined[index] = _BENCHMARK_LINK.sub(_benchmark_link, _ARXIV.sub(_arxiv_link, line))
    lines[:] = joined


_ANCHOR = re.compile(r'^<a id="([A-Za-z0-9_-]+)"></a>\s*$', re.MULTILINE)


def anchors_to_targets(app: Sphinx, relative_path, parent_docname, content: list[str]) -> None:
    """``include-read``: ``<a id="name"></a>`` lines of an included Markdown file become ``(name)=``."""
    if str(relative_path).endswith(".md"):
        content[0] = _ANCHOR.sub(r"(\1)=", content[0])


def copy_notebooks(app: Sphinx, config) -> None:
    """``config-inited``: copy ``tutorials/*.ipynb`` into ``docs/tutorials/`` (a copy is rewritten
    only when its notebook changed, and copies of removed notebooks are deleted)."""
    source = Path(config.nflows_docs_notebooks)
    target = Path(app.srcdir) / "tutorials"
    notebooks = sorted(source.glob("*.ipynb")) if source.is_dir() else []
    target.mkdir(exist_ok=True)
    wanted = {path.name for path in notebooks}
    for stale in target.glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    for notebook in notebooks:
        copy = target / notebook.name
        if not copy.exists() or copy.read_bytes() != notebook.read_bytes():
            shutil.copyfile(notebook, copy)


def skip_inherited_forward(app: Sphinx, what: str, name: str, obj, skip: bool, options) -> bool | None:
    """``autodoc-skip-member``: a module's ``forward`` without a docstring of its own would show
    torch's ``Module.forward`` docstring ("Define the computation performed at every call..."),
    which says nothing about it; such a ``forward`` is left out."""
    if name == "forward" and what == "class" and getattr(obj, "__doc__", None) is None:
        return True
    return None


NOTEBOOKS_MARKER = "% notebooks-toctree"


def notebooks_toctree(app: Sphinx, docname: str, source: list[str]) -> None:
    """``source-read``: the line ``% notebooks-toctree`` of a page becomes a toctree of the copied
    notebooks, in ``nflows_docs_notebook_order`` and then by name (no toctree when there are none)."""
    if NOTEBOOKS_MARKER not in source[0]:
        return
    present = sorted(path.stem for path in (Path(app.srcdir) / "tutorials").glob("*.ipynb"))
    order = [name for name in app.config.nflows_docs_notebook_order if name in present]
    order += [name for name in present if name not in order]
    toctree = ""
    if order:
        toctree = "```{toctree}\n:maxdepth: 1\n\n" + "".join(f"tutorials/{name}\n" for name in order) + "```"
    source[0] = source[0].replace(NOTEBOOKS_MARKER, toctree)


def setup(app: Sphinx) -> dict:
    app.add_config_value("nflows_docs_notebooks", "", "env", types=frozenset({str}))
    app.add_config_value("nflows_docs_notebook_order", [], "env", types=frozenset({list}))
    app.connect("config-inited", copy_notebooks)
    app.connect("source-read", notebooks_toctree)
    app.connect("missing-reference", resolve_public_name)
    app.connect("autodoc-process-docstring", format_docstring)
    app.connect("autodoc-skip-member", skip_inherited_forward)
    app.connect("include-read", anchors_to_targets)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
