"""One table of every flow, by name, so that a stack can be written as a string.

A *spec* is a ``+``-separated list of items, each ``name``, ``name:N`` or
``name:N(key=value, ...)``::

    "householder:4"                      one Householder module with 4 reflections
    "actnorm+lu_linear+elementwise_spline:2(count_bins=16)"

What ``N`` means is the family's own (``available_flows()`` lists it): for most
it is the number of stacked layers; for ``householder`` the number of
reflections in one module, for ``convex_triangular_linear`` the number of
matrices. ``key=value`` options go to the family's helper (values are Python
literals; anything else is taken as a string).

:func:`build_flow` turns a spec into a list of transform modules. With a
``context_dim`` it builds the conditional version of every family that has
one; families without one (``permute``, ``actnorm``, ...) are used as they are,
which :class:`pyro.distributions.ConditionalTransformedDistribution` accepts.
The command line, the autoguides and the VAE posteriors all build their flows
here.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from pyro_nflows.transforms import elementwise, linear, permutation
from pyro_nflows.validation import check_count, check_input_dim

__all__ = ["FLOWS", "FlowEntry", "available_flows", "build_flow", "parse_spec"]


@dataclass(frozen=True)
class FlowEntry:
    """A flow family: its helper, its conditional helper (or ``None``), and
    what the ``N`` of ``name:N`` sets (``count``: a keyword of the helpers, or
    ``None`` for "N stacked layers")."""

    name: str
    build: Callable[..., Any]
    build_conditional: Callable[..., Any] | None
    summary: str
    count: str | None = None

    def options(self, conditional: bool) -> list[str]:
        """The keyword options the helper takes besides the dimensions."""
        helper = self.build_conditional if conditional and self.build_conditional else self.build
        skip = {"input_dim", "context_dim"}
        return [p for p in inspect.signature(helper).parameters if p not in skip]


FLOWS: dict[str, FlowEntry] = {
    entry.name: entry
    for entry in [
        FlowEntry(
            "householder",
            linear.householder,
            linear.conditional_householder,
            "product of N Householder reflections (orthogonal, volume preserving)",
            count="count_transforms",
        ),
        FlowEntry(
            "triangular_linear",
            linear.triangular_linear,
            linear.conditional_triangular_linear,
            "LinIAF: unit lower triangular matrix (volume preserving)",
        ),
        FlowEntry(
            "convex_triangular_linear",
            linear.convex_triangular_linear,
            linear.conditional_convex_triangular_linear,
            "ccLinIAF: convex combination of N unit lower triangular matrices",
            count="count_matrices",
        ),
        FlowEntry("lu_linear", linear.lu_linear, None, "affine map P L U x + b"),
        FlowEntry("qr_linear", linear.qr_linear, None, "affine map Q R x + b, Q a product of reflections"),
        FlowEntry("elementwise_affine", elementwise.elementwise_affine, None, "per-coordinate scale and shift"),
        FlowEntry("actnorm", elementwise.actnorm, None, "scale and shift initialised from the first batch (Glow)"),
        FlowEntry(
            "elementwise_spline",
            elementwise.elementwise_spline,
            None,
            "monotonic rational-quadratic spline per coordinate",
        ),
        FlowEntry("permute", permutation.random_permutation, None, "fixed random permutation of the coordinates"),
    ]
}

ALIASES = {"convex_triangular": "convex_triangular_linear", "cclinif": "convex_triangular_linear"}

_ITEM = re.compile(r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*(?P<count>[^(\s]+))?\s*(?:\((?P<options>.*)\))?\s*$")


def _lookup(name: str) -> FlowEntry:
    name = ALIASES.get(name, name)
    if name not in FLOWS:
        known = ", ".join(sorted(FLOWS) + sorted(ALIASES))
        raise ValueError(f"unknown flow {name!r}; known flows: {known}")
    return FLOWS[name]


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(spec: str) -> list[tuple[FlowEntry, int | None, dict[str, Any]]]:
    """Split a spec into ``(entry, N or None, options)`` items; ``ValueError`` on bad syntax."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a flow spec must be a non-empty string such as 'householder:4', got {spec!r}")
    items = []
    for text in spec.split("+"):
        match = _ITEM.match(text)
        if match is None:
            raise ValueError(
                f"cannot parse {text.strip()!r} in flow spec {spec!r}; "
                "write name, name:N or name:N(key=value, ...)"
            )
        entry = _lookup(match["name"])
        count = None
        if match["count"] is not None:
            try:
                count = int(match["count"])
            except ValueError:
                raise ValueError(f"in flow spec {spec!r}, N must be an integer, got {match['count']!r}") from None
            check_count(f"N in {text.strip()!r}", count)
        options = {}
        if match["options"] and match["options"].strip():
            for pair in match["options"].split(","):
                key, sep, value = pair.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"in flow spec {spec!r}, options must read key=value, got {pair.strip()!r}")
                options[key.strip()] = _parse_value(value.strip())
        items.append((entry, count, options))
    return items


def build_flow(spec: str, input_dim: int, context_dim: int | None = None) -> list:
    """Build the transforms a spec names, for events of size ``input_dim``.

    With ``context_dim``, families that have a conditional version are built
    conditional on a context of that width.

    >>> [type(t).__name__ for t in build_flow("householder:4+lu_linear:2", 5)]
    ['Householder', 'LULinear', 'LULinear']
    """
    check_input_dim(input_dim)
    if context_dim is not None:
        check_count("context_dim", context_dim)
    transforms = []
    for entry, count, options in parse_spec(spec):
        conditional = context_dim is not None and entry.build_conditional is not None
        allowed = entry.options(conditional)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"flow {entry.name!r} takes no option {unknown}; its options are {allowed}")
        layers = 1
        if count is not None:
            if entry.count is None:
                layers = count
            else:
                options[entry.count] = count
        for _ in range(layers):
            if conditional:
                transforms.append(entry.build_conditional(input_dim, context_dim, **options))
            else:
                transforms.append(entry.build(input_dim, **options))
    return transforms


def available_flows() -> str:
    """A table of the known flows: name, what ``N`` sets, conditional or not, summary."""
    rows = []
    for entry in FLOWS.values():
        count = entry.count or "layers"
        conditional = "yes" if entry.build_conditional else "no"
        rows.append(f"{entry.name:<26} N={count:<17} conditional={conditional:<4} {entry.summary}")
    return "\n".join(rows)
