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

from pyro_nflows.transforms import (
    autoregressive,
    continuous_flow,
    conv,
    coupling,
    elementwise,
    glow_flow,
    linear,
    permutation,
    planar_flow,
    radial_flow,
    residual_flow,
    sylvester_flow,
)
from pyro_nflows.validation import check_count, check_input_dim

__all__ = [
    "ALIASES",
    "FLOWS",
    "Alternation",
    "FlowEntry",
    "available_flows",
    "build_flow",
    "canonical_name",
    "parse_spec",
]


@dataclass(frozen=True)
class Alternation:
    """How the layers of a stack alternate one option between two values, so
    that successive layers transform the coordinates different ways (a
    coupling's kept half, a MADE's ordering). Calling it with a layer's index
    in the stack and the spec's options returns that layer's options (a new
    dict).

    :param key: the option, e.g. ``"reverse"``.
    :param values: the two values, e.g. ``(False, True)``.
    :param spec_value: what a value written in the spec does: ``"starts"``
        (the first layer takes it and the layers alternate from there) or
        ``"holds"`` (every layer takes it: no alternation).
    :param only_if: ``(key, value)``: alternate only when that option has
        that value (Sylvester flows orient only their ``"triangular"`` kind).

    A spec value that is not one of ``values`` is passed on as written, for
    the layer's own check to refuse.
    """

    key: str
    values: tuple[Any, Any]
    spec_value: str = "starts"
    only_if: tuple[str, Any] | None = None

    def __call__(self, index: int, options: dict[str, Any]) -> dict[str, Any]:
        if self.only_if is not None and options.get(self.only_if[0]) != self.only_if[1]:
            return dict(options)
        start = 0
        if self.key in options:
            given = options[self.key]
            known = [type(given) is type(value) and given == value for value in self.values]
            if self.spec_value == "holds" or not any(known):
                return dict(options)
            start = known.index(True)
        return {**options, self.key: self.values[(start + index) % 2]}


def _quarter(channels: int) -> int:
    """The channels an unsqueeze gives: a quarter of those it takes (a multiple of 4)."""
    if channels % 4:
        raise ValueError(f"unsqueeze takes a multiple of 4 channels, got {channels}")
    return channels // 4


# Couplings keep the other half in every other layer; MADEs reverse their ordering.
_ALTERNATE_HALVES = Alternation("reverse", (False, True))
_ALTERNATE_ORDERINGS = Alternation("ordering", ("natural", "reversed"), spec_value="holds")


@dataclass(frozen=True)
class FlowEntry:
    """A flow family: its helper, its conditional helper (or ``None``), and
    what the ``N`` of ``name:N`` sets (``count``: a keyword of the helpers, or
    ``None`` for "N stacked layers"). ``alternate``, where given, is the
    :class:`Alternation` of an option between the layers of a stack.

    ``event`` is ``"vector"`` (the helpers take the event size ``input_dim``)
    or ``"image"`` (events of shape ``(C, H, W)``; the helpers take the
    channels ``C``); ``channels_after``, for an image layer that changes the
    number of channels (a squeeze), maps the channels it takes to those it gives."""

    name: str
    build: Callable[..., Any]
    build_conditional: Callable[..., Any] | None
    summary: str
    count: str | None = None
    alternate: Alternation | None = None
    event: str = "vector"
    channels_after: Callable[[int], int] | None = None

    def options(self, conditional: bool) -> list[str]:
        """The keyword options the helper takes besides the dimensions."""
        helper = self.build_conditional if conditional and self.build_conditional else self.build
        skip = {"input_dim", "context_dim", "channels"}
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
        FlowEntry(
            "elementwise_affine",
            elementwise.elementwise_affine,
            elementwise.conditional_elementwise_affine,
            "per-coordinate scale and shift",
        ),
        FlowEntry("actnorm", elementwise.actnorm, None, "scale and shift initialised from the first batch (Glow)"),
        FlowEntry(
            "elementwise_spline",
            elementwise.elementwise_spline,
            elementwise.conditional_elementwise_spline,
            "monotonic rational-quadratic spline per coordinate",
        ),
        FlowEntry("permute", permutation.random_permutation, None, "fixed random permutation of the coordinates"),
        FlowEntry(
            "planar",
            planar_flow.planar,
            planar_flow.conditional_planar,
            "planar flow x + u tanh(w.x + b) (Rezende & Mohamed); inverse by bracketed Newton",
        ),
        FlowEntry(
            "radial",
            radial_flow.radial,
            radial_flow.conditional_radial,
            "radial flow x + beta (x - x0) / (alpha + |x - x0|) (Rezende & Mohamed); closed-form inverse",
        ),
        FlowEntry(
            "sylvester",
            sylvester_flow.sylvester,
            sylvester_flow.conditional_sylvester,
            "Sylvester flow x + Q R tanh(R~ Q^T x + b) (van den Berg et al.); kind = orthogonal, "
            "householder or triangular; numerical inverse",
            alternate=Alternation("reverse", (False, True), only_if=("kind", "triangular")),
        ),
        FlowEntry(
            "affine_coupling",
            coupling.affine_coupling,
            coupling.conditional_affine_coupling,
            "RealNVP affine coupling x_b exp(s(x_a)) + t(x_a), bounded log-scale; layers alternate reverse",
            alternate=_ALTERNATE_HALVES,
        ),
        FlowEntry(
            "additive_coupling",
            coupling.additive_coupling,
            coupling.conditional_additive_coupling,
            "NICE additive coupling x_b + t(x_a) (volume preserving); layers alternate reverse",
            alternate=_ALTERNATE_HALVES,
        ),
        FlowEntry(
            "spline_coupling",
            coupling.spline_coupling,
            coupling.conditional_spline_coupling,
            "neural spline coupling: rational-quadratic splines of x_b, knots from x_a; layers alternate "
            "reverse; spline_from=z (noise side, default) or x (data side, what fit uses)",
            alternate=_ALTERNATE_HALVES,
        ),
        FlowEntry(
            "maf",
            autoregressive.maf,
            autoregressive.conditional_maf,
            "masked autoregressive flow (affine): one-pass scoring, fast sequential sampling; "
            "layers alternate ordering",
            alternate=_ALTERNATE_ORDERINGS,
        ),
        FlowEntry(
            "iaf",
            autoregressive.iaf,
            autoregressive.conditional_iaf,
            "inverse autoregressive flow (affine, stable=True gated): one-pass sampling; layers alternate ordering",
            alternate=_ALTERNATE_ORDERINGS,
        ),
        FlowEntry(
            "spline_autoregressive",
            autoregressive.spline_autoregressive,
            autoregressive.conditional_spline_autoregressive,
            "autoregressive rational-quadratic splines (direction iaf, the default, or maf); layers alternate ordering",
            alternate=_ALTERNATE_ORDERINGS,
        ),
        FlowEntry(
            "residual",
            residual_flow.residual,
            residual_flow.conditional_residual,
            "invertible residual block x + g(x), g Lipschitz (i-ResNet, Residual Flows); the other direction by "
            "fixed point; direction iaf (block samples, the default) or maf (block scores data, what fit uses); "
            "logdet exact, series or roulette",
        ),
        FlowEntry(
            "continuous",
            continuous_flow.continuous,
            continuous_flow.conditional_continuous,
            "continuous flow dx/dt = f(x, t) solved by an ODE solver (Neural ODE, FFJORD); trace exact or "
            "hutchinson; inverse by integrating backwards",
        ),
        FlowEntry(
            "conv1x1",
            conv.conv1x1,
            None,
            "images: Glow's invertible 1x1 convolution, decomposition lu or qr",
            event="image",
        ),
        FlowEntry(
            "emerging_conv",
            conv.emerging_conv,
            None,
            "images: emerging convolution, two masked convolutions; inverse by substitution",
            event="image",
        ),
        FlowEntry(
            "periodic_conv",
            conv.periodic_conv,
            None,
            "images: periodic (circular) convolution; log-det and inverse in the Fourier domain",
            event="image",
        ),
        FlowEntry(
            "actnorm2d",
            glow_flow.actnorm2d,
            glow_flow.conditional_actnorm2d,
            "images: per-channel scale and shift initialised from the first batch (Glow)",
            event="image",
        ),
        FlowEntry(
            "conv_affine_coupling",
            glow_flow.conv_affine_coupling,
            glow_flow.conditional_conv_affine_coupling,
            "images: affine coupling with a convolutional network, channel or checkerboard mask; "
            "layers alternate reverse",
            alternate=_ALTERNATE_HALVES,
            event="image",
        ),
        FlowEntry(
            "squeeze",
            glow_flow.squeeze,
            None,
            "images: space-to-depth by 2, (C, H, W) -> (4C, H/2, W/2)",
            event="image",
            channels_after=lambda channels: 4 * channels,
        ),
        FlowEntry(
            "unsqueeze",
            glow_flow.unsqueeze,
            None,
            "images: depth-to-space by 2, (4C, H, W) -> (C, 2H, 2W)",
            event="image",
            channels_after=_quarter,
        ),
    ]
}

# Other names a spec may use: the paper's (ccLinIAF) and a shorter one. The
# VAE posteriors read this table too.
ALIASES = {
    "convex_triangular": "convex_triangular_linear",
    "ccliniaf": "convex_triangular_linear",
    "iresnet": "residual",
    "resflow": "residual",
    "ffjord": "continuous",
}

_ITEM = re.compile(r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*(?P<count>[^(\s]+))?\s*(?:\((?P<options>.*)\))?\s*$")


def spec_event(spec: str) -> str:
    """``"vector"`` or ``"image"``: what the families a spec names act on."""
    return parse_spec(spec)[0][0].event


def canonical_name(name: str) -> str:
    """The registry's name for ``name``, which may be an alias (``"ccliniaf"``)."""
    return ALIASES.get(name, name)


def _lookup(name: str) -> FlowEntry:
    name = canonical_name(name)
    if name not in FLOWS:
        known = ", ".join(sorted(FLOWS) + sorted(ALIASES))
        raise ValueError(f"unknown flow {name!r}; known flows: {known}")
    return FLOWS[name]


def _parse_options(text: str | None, spec: str) -> dict[str, Any]:
    """``key=value, ...`` with Python literal values (a bare word is a string)."""
    if text is None or not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise ValueError(f"in flow spec {spec!r}, options must read key=value, ..., got {text.strip()!r}")
    options = {}
    for keyword in call.keywords:
        if isinstance(keyword.value, ast.Name):
            options[keyword.arg] = keyword.value.id
            continue
        try:
            options[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            raise ValueError(
                f"in flow spec {spec!r}, the value of {keyword.arg!r} must be a Python literal or a bare word"
            ) from None
    return options


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
        options = _parse_options(match["options"], spec)
        items.append((entry, count, options))
    return items


def build_flow(
    spec: str,
    input_dim: int,
    context_dim: int | None = None,
    repeat: int = 1,
    defaults: dict[str, Any] | None = None,
) -> list:
    """Build the transforms a spec names, for events of size ``input_dim``
    (for the image families, ``event="image"``, the channels of a ``(C, H,
    W)`` event; a squeeze in the spec multiplies them by 4 for the layers
    after it). A spec names vector families or image families, not both.

    With ``context_dim``, families that have a conditional version are built
    conditional on a context of that width. ``repeat`` stacks the whole spec
    that many times; a family's layers are counted across the repeats, so
    per-layer alternations (orderings, coupling halves) carry on from one
    repeat to the next. ``defaults`` are options for every family whose
    helper takes them, where the spec does not set them (``fit`` passes
    ``{"spline_from": "x"}``: its flows are trained by scoring data).

    >>> [type(t).__name__ for t in build_flow("householder:4+lu_linear:2", 5)]
    ['Householder', 'LULinear', 'LULinear']
    """
    check_input_dim(input_dim)
    check_count("repeat", repeat)
    if context_dim is not None:
        check_count("context_dim", context_dim)
    items = parse_spec(spec)
    events = {entry.event for entry, _, _ in items}
    if len(events) > 1:
        raise ValueError(f"the flow spec {spec!r} mixes vector and image flows; a spec is one or the other")
    transforms = []
    for round_index in range(repeat):
        for entry, count, options in items:
            layers, input_dim = _build_item(
                entry, count, dict(options), input_dim, context_dim, round_index, defaults or {}
            )
            transforms.extend(layers)
    return transforms


def _build_item(
    entry: FlowEntry, count, options: dict, input_dim: int, context_dim, round_index: int, defaults: dict
) -> tuple[list, int]:
    """The layers of one spec item, in repeat number ``round_index``, and the
    event size (or channels) after them."""
    conditional = context_dim is not None and entry.build_conditional is not None
    allowed = entry.options(conditional)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"flow {entry.name!r} takes no option {unknown}; its options are {allowed}")
    if count is not None and entry.count in options:
        raise ValueError(
            f"flow {entry.name!r}: N ({count}) sets {entry.count}, which the options set too "
            f"({options[entry.count]}); give it once"
        )
    options = {**{key: value for key, value in defaults.items() if key in allowed}, **options}
    layers = 1
    if count is not None:
        if entry.count is None:
            layers = count
        else:
            options[entry.count] = count
    transforms = []
    for index in range(round_index * layers, (round_index + 1) * layers):
        layer = entry.alternate(index, options) if entry.alternate else options
        if conditional:
            transforms.append(entry.build_conditional(input_dim, context_dim, **layer))
        else:
            transforms.append(entry.build(input_dim, **layer))
        if entry.channels_after is not None:
            input_dim = entry.channels_after(input_dim)
    return transforms, input_dim


def available_flows() -> str:
    """A table of the known flows: name, what ``N`` sets, conditional or not, summary."""
    rows = []
    for entry in FLOWS.values():
        count = entry.count or "layers"
        conditional = "yes" if entry.build_conditional else "no"
        rows.append(f"{entry.name:<26} N={count:<17} conditional={conditional:<4} {entry.summary}")
    return "\n".join(rows)
