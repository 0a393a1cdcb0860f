r"""Autoregressive flows, named by their cheap direction: MAF and IAF.

Both map noise :math:`z` to a sample :math:`x` coordinate by coordinate,
:math:`x_i = g(z_i; \theta_i)`, with an element-wise bijection :math:`g`
(affine, gated affine or a rational-quadratic spline) whose parameters come
from a :class:`~pyro_nflows.nn.MADE`. They differ in what the MADE reads:

- **MAF** (Papamakarios et al. [2]): :math:`\theta_i = \theta_i(x_{<i})`, the
  data side. Scoring data, :math:`z = g^{-1}(x; \theta(x))`, is one network
  pass: density estimation. Sampling is sequential in the coordinates.
- **IAF** (Kingma et al. [3]): :math:`\theta_i = \theta_i(z_{<i})`, the noise
  side. Sampling and scoring its own samples, :math:`x = g(z; \theta(z))`,
  is one pass: variational posteriors. Scoring outside data is sequential.

In Pyro's convention (a transform maps base to data) MAF's ``_inverse`` and
IAF's ``_call`` are the one-pass directions. The sequential direction uses
:meth:`MADE.invert <pyro_nflows.nn.MADE.invert>`, which computes each hidden
unit once, when its inputs become final: about one network pass of
arithmetic in :math:`D` small steps, where Pyro, zuko and nflows make
:math:`D` full passes. Both directions work in float32 and float64.

:math:`\log|\det J| = \sum_i \log|g'(z_i; \theta_i)|`, one network pass.

References:

[1] Mathieu Germain, Karol Gregor, Iain Murray, Hugo Larochelle. MADE: Masked
    Autoencoder for Distribution Estimation. arXiv:1502.03509
[2] George Papamakarios, Theo Pavlakou, Iain Murray. Masked Autoregressive
    Flow for Density Estimation. arXiv:1705.07057
[3] Diederik P. Kingma, Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya
    Sutskever, Max Welling. Improving Variational Inference with Inverse
    Autoregressive Flow. arXiv:1606.04934
[4] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural
    Spline Flows. arXiv:1906.04032
"""

from __future__ import annotations

from typing import Sequence

import torch
from pyro.distributions.torch_transform import TransformModule

from pyro_nflows.nn.made import MADE
from pyro_nflows.nn.widths import default_hidden_dims
from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform
from pyro_nflows.transforms.maps import AffineMap, GatedAffineMap, SplineMap, data_affine_map
from pyro_nflows.validation import check_bool, check_finite, check_input_dim, check_spline_order

__all__ = [
    "ConditionalMaskedAutoregressive",
    "ConditionedMaskedAutoregressive",
    "MaskedAutoregressive",
    "affine_autoregressive",
    "conditional_affine_autoregressive",
    "conditional_iaf",
    "conditional_maf",
    "conditional_spline_autoregressive",
    "iaf",
    "maf",
    "spline_autoregressive",
]


class ConditionedMaskedAutoregressive(FlowTransform):
    r"""An autoregressive flow :math:`x_i = g(z_i; \theta_i)` with
    :math:`\theta = \mathrm{MADE}(x)` (``made_reads="output"``, MAF) or
    :math:`\theta = \mathrm{MADE}(z)` (``made_reads="input"``, IAF).

    :param made: the :class:`~pyro_nflows.nn.MADE` giving :math:`\theta`.
    :param elementwise: an :class:`AffineMap`, :class:`GatedAffineMap` or :class:`SplineMap`.
    :param made_reads: ``"output"`` or ``"input"``.
    :param context: the context the MADE reads, if it takes one.

    The direction the MADE reads costs one pass; the other calls
    :meth:`MADE.invert <pyro_nflows.nn.MADE.invert>` (about one pass of
    arithmetic, in :math:`D` steps).
    """

    autoregressive = True
    sign = +1  # every coordinate increases with its own input, as Pyro's AffineAutoregressive says

    def __init__(
        self, made: MADE, elementwise, made_reads: str, context: torch.Tensor | None = None, cache_size: int = 1
    ):
        super().__init__(cache_size=cache_size)
        if made_reads not in ("input", "output"):
            raise ValueError(f"made_reads must be 'input' or 'output', got {made_reads!r}")
        if made.param_dim != elementwise.param_dim:
            raise ValueError(
                f"the MADE gives {made.param_dim} parameters per coordinate, the map needs {elementwise.param_dim}"
            )
        self.input_dim = made.input_dim
        self.made = made
        self.elementwise = elementwise
        self.made_reads = made_reads
        self.context = context

    def _theta(self, value: torch.Tensor) -> torch.Tensor:
        return self.made(value, self.context)

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        if self.made_reads == "input":
            return self.elementwise.forward(z, self._theta(z))[0]
        return self._sequential(z, inverse=False)

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        if self.made_reads == "output":
            return self.elementwise.inverse(x, self._theta(x))[0]
        return self._sequential(x, inverse=True)

    def _sequential(self, value: torch.Tensor, inverse: bool) -> torch.Tensor:
        """The direction the MADE does not read, by :meth:`MADE.invert`; a
        non-finite input raises ``ValueError`` and a result that overflows the
        dtype ``FloatingPointError`` (never a silent inf or NaN)."""
        who = f"{type(self).__name__} ({'inverse' if inverse else 'forward'}, the sequential direction)"
        check_finite(value, who)
        map_ = self.elementwise.inverse if inverse else self.elementwise.forward
        step_into = getattr(self.elementwise, "inverse_into" if inverse else "forward_into", None)
        result = self.made.invert(value, lambda v_i, theta_i: map_(v_i, theta_i)[0], self.context, step_into)
        finite = torch.isfinite(result)
        if not bool(finite.all()):
            bad = int((~finite.all(-1)).sum())
            raise FloatingPointError(
                f"{who} overflows {result.dtype} at {bad} of {finite[..., 0].numel()} points: each coordinate "
                "rescales the next ones, and at these points the result is beyond the dtype's range "
                "(points far in the tails of the flow, or, in float32, try float64)"
            )
        return result

    def _one_pass(self, value: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The cheap direction, with its log-determinant from the same pass."""
        map_ = self.elementwise.inverse if inverse else self.elementwise.forward
        result, log_det = map_(value, self._theta(value))
        return result, log_det.sum(-1)

    @property
    def _call_and_log_det(self):
        return (lambda z: self._one_pass(z, inverse=False)) if self.made_reads == "input" else None

    @property
    def _inverse_and_log_det(self):
        return (lambda x: self._one_pass(x, inverse=True)) if self.made_reads == "output" else None

    def log_abs_det_jacobian(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        log_det = self._take_log_det(z, x)
        if log_det is not None:
            return log_det
        theta = self._theta(z if self.made_reads == "input" else x)
        return self.elementwise.forward(z, theta)[1].sum(-1)


class MaskedAutoregressive(ConditionedMaskedAutoregressive, TransformModule):
    """A learnable autoregressive flow owning its MADE (see :func:`maf`,
    :func:`iaf`, :func:`spline_autoregressive` for the usual ones)."""

    def __init__(
        self,
        input_dim: int,
        elementwise,
        made_reads: str,
        hidden_dims: Sequence[int] | None = None,
        ordering="natural",
        identity_init: bool = True,
        cache_size: int = 1,
    ):
        check_input_dim(input_dim)
        hidden_dims = default_hidden_dims(input_dim, network="made") if hidden_dims is None else hidden_dims
        scale = _output_init_scale(input_dim, identity_init)
        made = MADE(input_dim, hidden_dims, elementwise.param_dim, ordering=ordering, output_init_scale=scale)
        super().__init__(made, elementwise, made_reads, cache_size=cache_size)


class ConditionalMaskedAutoregressive(ConditionalFlow):
    """An autoregressive flow whose MADE also reads a context (fed to every
    unit of its first layer, so every step sees it, as in [3]);
    ``condition(c)`` returns a :class:`ConditionedMaskedAutoregressive`."""

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        elementwise,
        made_reads: str,
        hidden_dims: Sequence[int] | None = None,
        ordering="natural",
        identity_init: bool = True,
    ):
        super().__init__(input_dim, context_dim)
        hidden_dims = default_hidden_dims(input_dim, context_dim, "made") if hidden_dims is None else hidden_dims
        self.made = MADE(
            input_dim,
            hidden_dims,
            elementwise.param_dim,
            context_dim=context_dim,
            ordering=ordering,
            output_init_scale=_output_init_scale(input_dim, identity_init),
        )
        self.elementwise = elementwise
        self.made_reads = made_reads

    def _condition(self, context: torch.Tensor) -> ConditionedMaskedAutoregressive:
        return ConditionedMaskedAutoregressive(self.made, self.elementwise, self.made_reads, context)


def _output_init_scale(input_dim: int, identity_init: bool) -> float:
    r"""The MADE's output-layer factor: 1e-2, near the identity, or
    :math:`1/\sqrt{D}`, a mild random start (see :func:`maf`)."""
    return 1e-2 if check_bool("identity_init", identity_init) else input_dim**-0.5


def _gate_bias(made: MADE, value: float) -> None:
    """Start IAF's gates open at sigmoid(value) (the output bias of every gate row)."""
    with torch.no_grad():
        made.biases[-1][1 :: made.param_dim] = value


def maf(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    ordering="natural",
    identity_init: bool = True,
) -> MaskedAutoregressive:
    r"""Masked autoregressive flow [2]: affine, :math:`\theta` from the data
    side. ``log_prob`` of data is one network pass; sampling is sequential
    (about one pass of arithmetic, see :mod:`pyro_nflows.nn.made`).

    ``identity_init=True`` starts near the identity: the MADE's output
    weights are torch's default initialisation times 1e-2. ``False`` starts
    as a mild random map: those weights divided by :math:`\sqrt{D}` instead,
    so that the spread of the initial log-determinant, a sum of :math:`D`
    random terms, does not grow with the dimension (biases zero either way).
    :func:`~pyro_nflows.density.fit` uses ``False``, as for its couplings
    (see :mod:`~pyro_nflows.transforms.coupling`), because a density model
    has no base to stay at and trains better from there (measured:
    benchmarks/README.md#maf-start).

    Example::

        >>> import pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
        >>> d = dist.TransformedDistribution(base, [maf(3)])
        >>> d.log_prob(torch.randn(5, 3)).shape
        torch.Size([5])
    """
    return MaskedAutoregressive(input_dim, data_affine_map(), "output", hidden_dims, ordering, identity_init)


def _affine_map(stable: bool) -> AffineMap:
    return GatedAffineMap() if check_bool("stable", stable) else AffineMap()


def iaf(
    input_dim: int, hidden_dims: Sequence[int] | None = None, *, stable: bool = False, ordering="natural"
) -> MaskedAutoregressive:
    r"""Inverse autoregressive flow [3]: affine, :math:`\theta` from the noise
    side. Sampling and scoring its own samples is one pass; scoring outside
    data is sequential. ``stable=True`` is the gated update
    :math:`\sigma z + (1 - \sigma) m` with the gates starting at
    :math:`\sigma(1.5) \approx 0.82`. Pyro's ``affine_autoregressive`` is
    this flow (:func:`affine_autoregressive` takes its arguments)."""
    flow = MaskedAutoregressive(input_dim, _affine_map(stable), "input", hidden_dims, ordering)
    if stable:
        _gate_bias(flow.made, 1.5)
    return flow


def affine_autoregressive(
    input_dim: int, hidden_dims: Sequence[int] | None = None, *, stable: bool = False, ordering="natural"
) -> MaskedAutoregressive:
    r"""Pyro's ``affine_autoregressive`` helper, here: :func:`iaf` (its log-scale
    is bounded by a soft clamp, not Pyro's ``log_scale_min_clip`` /
    ``log_scale_max_clip``, which it does not take; its gates start at
    :math:`\sigma(1.5)`, Pyro's ``sigmoid_bias`` is 2)."""
    return iaf(input_dim, hidden_dims, stable=stable, ordering=ordering)


def spline_autoregressive(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    count_bins: int = 8,
    bound: float = 3.0,
    order: str = "quadratic",
    *,
    ordering="natural",
    direction: str = "iaf",
) -> MaskedAutoregressive:
    """Autoregressive rational-quadratic spline flow [4]; ``direction="iaf"``
    (the default, as Pyro's: one-pass sampling, for guides and posteriors) or
    ``"maf"`` (one-pass scoring, for density estimation: what
    :func:`~pyro_nflows.density.fit`'s ``"nsf"`` uses). The positional
    arguments are Pyro's; ``order`` must be ``"quadratic"`` (Pyro's default,
    ``"linear"``, is not implemented)."""
    check_spline_order(order)
    elementwise = _direction_spline(direction, count_bins, bound)
    return MaskedAutoregressive(input_dim, elementwise, _made_reads(direction), hidden_dims, ordering)


def conditional_maf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    ordering="natural",
    identity_init: bool = True,
) -> ConditionalMaskedAutoregressive:
    """MAF whose MADE also reads a context; ``identity_init`` as in :func:`maf`."""
    return ConditionalMaskedAutoregressive(
        input_dim, context_dim, data_affine_map(), "output", hidden_dims, ordering, identity_init
    )


def conditional_iaf(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    stable: bool = False,
    ordering="natural",
) -> ConditionalMaskedAutoregressive:
    """IAF whose MADE also reads a context: the amortized posterior of Kingma et al. [3]."""
    flow = ConditionalMaskedAutoregressive(input_dim, context_dim, _affine_map(stable), "input", hidden_dims, ordering)
    if stable:
        _gate_bias(flow.made, 1.5)
    return flow


def conditional_affine_autoregressive(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    stable: bool = False,
    ordering="natural",
) -> ConditionalMaskedAutoregressive:
    """Pyro's ``conditional_affine_autoregressive`` helper, here: :func:`conditional_iaf`
    (see :func:`affine_autoregressive`)."""
    return conditional_iaf(input_dim, context_dim, hidden_dims, stable=stable, ordering=ordering)


def conditional_spline_autoregressive(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    count_bins: int = 8,
    bound: float = 3.0,
    order: str = "quadratic",
    *,
    ordering="natural",
    direction: str = "iaf",
) -> ConditionalMaskedAutoregressive:
    """Autoregressive spline flow whose MADE also reads a context (arguments as
    :func:`spline_autoregressive`'s, Pyro's positional order)."""
    check_spline_order(order)
    elementwise = _direction_spline(direction, count_bins, bound)
    return ConditionalMaskedAutoregressive(
        input_dim, context_dim, elementwise, _made_reads(direction), hidden_dims, ordering
    )


def _direction_spline(direction: str, count_bins: int, bound: float) -> SplineMap:
    """The spline evaluated in the direction that is trained: from the data
    for ``"maf"``, from the noise for ``"iaf"``."""
    return SplineMap(count_bins, bound, spline_from="x" if _made_reads(direction) == "output" else "z")


def _made_reads(direction: str) -> str:
    if direction not in ("maf", "iaf"):
        raise ValueError(f"direction must be 'maf' or 'iaf', got {direction!r}")
    return "output" if direction == "maf" else "input"
