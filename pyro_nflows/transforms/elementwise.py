r"""Element-wise flows: each coordinate is mapped on its own,
:math:`y_i = f_i(x_i)`, so the Jacobian is diagonal and
:math:`\log|\det J| = \sum_i \log f_i'(x_i)`. Every inverse is exact and costs
one pass.

- :class:`ElementwiseAffine`: :math:`y = e^{s} \odot x + t`.
- :class:`ActNorm`: the same, initialised from the first batch that passes
  through it so that the batch comes out with zero mean and unit variance
  (Glow [1]).
- :class:`ElementwiseSpline`: a monotonic rational-quadratic spline per
  coordinate on :math:`[-B, B]`, the identity outside (Durkan et al. [2]);
  the spline itself is :func:`~pyro_nflows.transforms.splines.rational_quadratic_spline`.

Like Pyro's ``Spline`` and torch's ``AffineTransform``, they act on each
coordinate, ``event_dim = 0``: ``log_abs_det_jacobian`` has the shape of
``x`` (one :math:`\log f_i'(x_i)` per coordinate), and a
``TransformedDistribution`` sums it over the event of its base. The
parameters still have one entry per coordinate, so the last dimension of
``x`` must be ``input_dim``.

Each has a conditional version (``conditional_elementwise_affine``,
``conditional_elementwise_spline``, Pyro's ``conditional_spline``) whose
parameters a network computes from a context.

References:

[1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
[2] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural
    Spline Flows. arXiv:1906.04032
"""

from __future__ import annotations

from typing import Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import constraints

from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform, ParameterFn, resolve
from pyro_nflows.transforms.initialization import ActNormInitialization
from pyro_nflows.transforms.splines import rational_quadratic_spline
from pyro_nflows.validation import check_count, check_input_dim, check_positive, check_spline_order

__all__ = [
    "ActNorm",
    "ConditionalElementwiseAffine",
    "ConditionalElementwiseSpline",
    "ConditionedElementwiseAffine",
    "ConditionedElementwiseSpline",
    "ElementwiseAffine",
    "ElementwiseSpline",
    "actnorm",
    "conditional_elementwise_affine",
    "conditional_elementwise_spline",
    "conditional_spline",
    "elementwise_affine",
    "elementwise_spline",
    "spline",
]


class _Elementwise(FlowTransform):
    """A flow on each coordinate (``event_dim = 0``), increasing."""

    domain = constraints.real
    codomain = constraints.real
    sign = +1


# ---------------------------------------------------------------------------
# Affine
# ---------------------------------------------------------------------------


class ConditionedElementwiseAffine(_Elementwise):
    r"""A scale and shift per coordinate with given parameters,

    .. math:: y = e^{s} \odot x + t, \qquad \log|\det J|_i = s_i;

    inverse :math:`x = e^{-s} \odot (y - t)`, the same cost.

    :param input_dim: the number of coordinates :math:`D`.
    :param log_scale: :math:`s`, shape ``(..., D)``, or a callable returning it.
    :param shift: :math:`t`, shape ``(..., D)``, or a callable.
    """

    def __init__(self, input_dim: int, log_scale=None, shift=None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.log_scale = log_scale
        self.shift = shift

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x * resolve(self.log_scale).exp() + resolve(self.shift)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - resolve(self.shift)) * torch.exp(-resolve(self.log_scale))

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_scale = resolve(self.log_scale).to(x.dtype)
        return log_scale.expand(torch.broadcast_shapes(x.shape, log_scale.shape))


class ElementwiseAffine(ConditionedElementwiseAffine, TransformModule):
    r"""A learnable per-coordinate scale and shift,

    .. math:: y = e^{s} \odot x + t, \qquad \log|\det J|_i = s_i,

    starting at the identity. Inverse: :math:`x = e^{-s} \odot (y - t)`.

    Example::

        >>> t = ElementwiseAffine(3)
        >>> t(torch.ones(3))
        tensor([1., 1., 1.], grad_fn=<AddBackward0>)
    """

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(input_dim, cache_size=cache_size)
        self.log_scale = nn.Parameter(torch.zeros(input_dim))
        self.shift = nn.Parameter(torch.zeros(input_dim))


class ConditionalElementwiseAffine(ConditionalFlow):
    """A scale and shift per coordinate that an MLP computes from a context;
    ``condition(c)`` returns a :class:`ConditionedElementwiseAffine`."""

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None):
        super().__init__(input_dim, context_dim, [(input_dim,), (input_dim,)], hidden_dims)

    def _condition(self, log_scale: ParameterFn, shift: ParameterFn) -> ConditionedElementwiseAffine:
        return ConditionedElementwiseAffine(self.input_dim, log_scale, shift)


class ActNorm(ActNormInitialization, ElementwiseAffine):
    r"""Activation normalisation (Glow [1]): an :class:`ElementwiseAffine` whose
    scale and shift are set by the first batch that passes through it, in
    either direction, so that this batch comes out with zero mean and unit
    variance per coordinate. Afterwards they are ordinary learnable parameters.

    The flag saying whether it has been initialised is a buffer, so it
    travels with ``state_dict``: a loaded model is not initialised again.
    The first batch must hold at least two points, and no coordinate may be
    constant in it (its scale would be infinite); otherwise ``ValueError``.
    To initialise from chosen data, call :meth:`initialize` yourself.
    """

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(input_dim, cache_size=cache_size)
        self._init_initialization()

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, initialized={bool(self.initialized)}"


# ---------------------------------------------------------------------------
# Rational-quadratic splines
# ---------------------------------------------------------------------------


class ConditionedElementwiseSpline(_Elementwise):
    r"""A monotonic rational-quadratic spline per coordinate with given knots
    (Durkan et al. [2]): :math:`K` bins on :math:`[-B, B]`, the identity
    outside, with slope 1 where the two meet.

    :math:`\log|\det J|_i = \log f_i'(x_i)`; the inverse solves one quadratic
    per coordinate, the same cost as the forward pass.

    :param input_dim: the number of coordinates :math:`D`.
    :param widths: unnormalised bin widths, shape ``(..., D, K)``, or a callable.
    :param heights: unnormalised bin heights, shape ``(..., D, K)``, or a callable.
    :param derivatives: unnormalised interior derivatives, shape ``(..., D, K - 1)``, or a callable.
    :param bound: :math:`B`.
    :param output_scale: a constant factor on all three (see
        :class:`~pyro_nflows.transforms.coupling.ConditionedSplineCoupling`).
    """

    def __init__(
        self,
        input_dim: int,
        widths=None,
        heights=None,
        derivatives=None,
        bound: float = 3.0,
        output_scale: float = 1.0,
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.bound = check_positive("bound", bound)
        self.output_scale = check_positive("output_scale", output_scale)
        self.widths, self.heights, self.derivatives = widths, heights, derivatives

    def _spline(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.output_scale
        widths, heights, derivatives = (scale * resolve(p) for p in (self.widths, self.heights, self.derivatives))
        return rational_quadratic_spline(x, widths, heights, derivatives, bound=self.bound, inverse=inverse)

    # Each direction's pass gives the log-derivatives too: FlowTransform hands
    # them over, so TransformedDistribution.log_prob evaluates the spline once.
    def _call_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._spline(x, inverse=False)

    def _inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, inverse_log_det = self._spline(y, inverse=True)
        return x, -inverse_log_det

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, bound={self.bound}"


class ElementwiseSpline(ConditionedElementwiseSpline, TransformModule):
    r"""A learnable monotonic rational-quadratic spline per coordinate
    (Durkan et al. [2]): :math:`K` bins on :math:`[-B, B]`, the identity
    outside, with slope 1 where the two meet. Starts at the identity.
    Pyro's ``Spline`` with ``order="quadratic"``.

    :param input_dim: the number of coordinates :math:`D`.
    :param count_bins: the number of bins :math:`K`.
    :param bound: the half-width :math:`B` of the interval the spline covers.

    Example::

        >>> t = ElementwiseSpline(2)
        >>> x = torch.randn(5, 2)
        >>> t.log_abs_det_jacobian(x, t(x)).shape  # one log-derivative per coordinate
        torch.Size([5, 2])
    """

    def __init__(self, input_dim: int, count_bins: int = 8, bound: float = 3.0, cache_size: int = 1):
        super().__init__(input_dim, bound=bound, cache_size=cache_size)
        self.count_bins = check_count("count_bins", count_bins, minimum=2)
        self.widths = nn.Parameter(torch.zeros(input_dim, count_bins))
        self.heights = nn.Parameter(torch.zeros(input_dim, count_bins))
        self.derivatives = nn.Parameter(torch.zeros(input_dim, count_bins - 1))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count_bins={self.count_bins}, bound={self.bound}"


class ConditionalElementwiseSpline(ConditionalFlow):
    r"""A rational-quadratic spline per coordinate whose knots an MLP computes
    from a context (Pyro's ``ConditionalSpline`` with ``order="quadratic"``);
    ``condition(c)`` returns a :class:`ConditionedElementwiseSpline`. The
    network's outputs are multiplied by :math:`1/\sqrt{h}`, :math:`h` its last
    hidden width, as the spline couplings do."""

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        count_bins: int = 8,
        bound: float = 3.0,
    ):
        self.count_bins = check_count("count_bins", count_bins, minimum=2)
        shapes = [(input_dim, count_bins), (input_dim, count_bins), (input_dim, count_bins - 1)]
        super().__init__(input_dim, context_dim, shapes, hidden_dims)
        self.bound = check_positive("bound", bound)
        self.output_scale = self.net.last_width**-0.5

    def _condition(self, widths: ParameterFn, heights: ParameterFn, derivatives: ParameterFn):
        return ConditionedElementwiseSpline(self.input_dim, widths, heights, derivatives, self.bound, self.output_scale)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", count_bins={self.count_bins}, bound={self.bound}"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def elementwise_affine(input_dim: int) -> ElementwiseAffine:
    """A learnable per-coordinate scale and shift, starting at the identity."""
    return ElementwiseAffine(input_dim)


def conditional_elementwise_affine(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalElementwiseAffine:
    """A per-coordinate scale and shift that an MLP computes from a context."""
    return ConditionalElementwiseAffine(input_dim, context_dim, hidden_dims)


def actnorm(input_dim: int) -> ActNorm:
    """Glow's activation normalisation: an affine layer initialised from the first batch."""
    return ActNorm(input_dim)


def elementwise_spline(input_dim: int, count_bins: int = 8, bound: float = 3.0) -> ElementwiseSpline:
    """A learnable rational-quadratic spline per coordinate on ``[-bound, bound]``."""
    return ElementwiseSpline(input_dim, count_bins=count_bins, bound=bound)


def conditional_elementwise_spline(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    count_bins: int = 8,
    bound: float = 3.0,
) -> ConditionalElementwiseSpline:
    """A rational-quadratic spline per coordinate whose knots an MLP computes from a context."""
    return ConditionalElementwiseSpline(input_dim, context_dim, hidden_dims, count_bins, bound)


def spline(input_dim: int, count_bins: int = 8, bound: float = 3.0, order: str = "quadratic") -> ElementwiseSpline:
    """Pyro's ``spline`` helper, here: :func:`elementwise_spline` (``order`` must
    be ``"quadratic"``; Pyro's default is ``"linear"``, which is not implemented)."""
    check_spline_order(order)
    return elementwise_spline(input_dim, count_bins, bound)


def conditional_spline(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    count_bins: int = 8,
    bound: float = 3.0,
    order: str = "quadratic",
) -> ConditionalElementwiseSpline:
    """Pyro's ``conditional_spline`` helper, here: :func:`conditional_elementwise_spline`
    (``order`` as in :func:`spline`)."""
    check_spline_order(order)
    return conditional_elementwise_spline(input_dim, context_dim, hidden_dims, count_bins, bound)
