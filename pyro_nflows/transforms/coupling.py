r"""Coupling flows: half of the coordinates pass through unchanged and decide
how the other half is transformed.

Split :math:`x \in \mathbb{R}^D` into the first ``split_dim`` coordinates and
the rest. One part, :math:`x_a`, is *kept*; the other, :math:`x_b`, is
*transformed*, each coordinate by its own monotonic map whose parameters a
network computes from the kept part:

.. math::

    y_a = x_a, \qquad y_b = f\big(x_b;\ \theta(x_a)\big), \qquad
    \theta = \mathrm{MLP}(x_a)\ \ \big(\text{or}\ \mathrm{MLP}([x_a, c])
    \text{ given a context } c\big).

By default :math:`x_a` is the first part (``reverse=False``); with
``reverse=True`` the *second* part is kept and the first transformed. The
Jacobian is block triangular with the identity for :math:`x_a` and a diagonal
block for :math:`x_b`, so

.. math:: \log|\det J| = \sum_{i \in b} \log \frac{\partial f}{\partial x_i}\big(x_i;\ \theta(x_a)\big),

and the inverse is exact and costs one network pass: :math:`x_a = y_a`
gives :math:`\theta(x_a)`, then :math:`x_b = f^{-1}(y_b; \theta)`. The
log-determinant is recomputed from :math:`x` (no state is kept between calls).

==========================  ==============================================  ==========================
class                       :math:`f(x_b; \theta)`                          :math:`\log|\det J|`
==========================  ==============================================  ==========================
AdditiveCoupling (NICE)     :math:`x_b + t`                                 0 (volume preserving)
AffineCoupling (RealNVP)    :math:`(x_b - t) \odot e^{s}`,                  :math:`\sum_i s_i`
                            :math:`s = \tilde s / (1 + |\tilde s| / B)`
SplineCoupling (NSF)        a rational-quadratic spline per coordinate      :math:`\sum_i \log f_i'(x_i)`
==========================  ==============================================  ==========================

The coupling itself (split, network, join, inverse, log-determinant) is
written once, in :class:`ConditionedCoupling`; the three kinds differ only in
the element-wise map and the parameter shapes it needs. The spline is
:func:`~pyro_nflows.transforms.splines.rational_quadratic_spline`, the same
function the element-wise and autoregressive spline flows use.

**Bounded log-scale.** The affine coupling's log-scale is a soft clamp of the
network output, :math:`s = \tilde s / (1 + |\tilde s| / B)` with
``log_scale_bound`` :math:`B` (default 3): :math:`|s| < B`, so one layer
scales by at most :math:`e^{B}` and its inverse cannot blow up, while near
:math:`\tilde s = 0` it is the identity (:math:`s \approx \tilde s`), so small
outputs pass through unchanged ([2] uses a :math:`\tanh` the same way; this
bound's gradient fades more slowly near :math:`B`, see
:func:`~pyro_nflows.transforms.maps.soft_clamp`).

**Start at the identity, or not.** By default the last layer of every
coupling network starts at zero (as in Glow [4]), so a fresh coupling is the
identity: :math:`t = 0`, :math:`s = 0`, and all-zero spline parameters give
the identity spline. Gradients still reach the last layer from the first
step, and the rest of the network from the second. That is what a guide or a
VAE posterior wants: it starts as its base distribution. The affine and
additive couplings take ``identity_init=False`` to start as a mild random map
instead: torch's default initialisation of that layer, divided by
:math:`\sqrt{t}` for :math:`t` transformed coordinates, so that the spread
of the initial log-determinant (a sum of :math:`t` random terms) does not
grow with the dimension. A density model has no base to stay at, and
:func:`~pyro_nflows.density.fit` builds its affine and additive couplings
that way, because they train better from there. Spline couplings train
worse from a random start, so they always start at the identity and take no
such option (measured: benchmarks/README.md#coupling-start).

**Stacking.** One coupling leaves :math:`x_a` alone, so a stack must change
which part is kept between layers. The registry does it for you: in
``"affine_coupling:4"`` the layers alternate ``reverse=False, True, False,
True`` (starting from ``reverse`` if given); with hand-built stacks, alternate
``reverse`` or put a permutation between layers.

**Conditional couplings.** ``Conditional<X>Coupling(input_dim, context_dim, ...)``
feeds :math:`[x_a, c]` to the network; ``condition(c)`` returns a
``Conditioned<X>Coupling``. The context's batch shape broadcasts against
:math:`x`'s (``x`` of shape ``(3, 5, D)`` with a context of shape ``(5, C)``
or ``(1, C)``).

**Network size.** The default ``hidden_dims`` is
:func:`pyro_nflows.nn.default_hidden_dims` with ``network="coupling"``,
which states the rule. Spline couplings multiply the network's outputs by
:math:`1/\sqrt{h}`, :math:`h` the last hidden width, so that ordinary
weights give moderate splines (see :class:`ConditionedSplineCoupling`).

References:

[1] Laurent Dinh, David Krueger, Yoshua Bengio. NICE: Non-linear Independent
    Components Estimation. arXiv:1410.8516
[2] Laurent Dinh, Jascha Sohl-Dickstein, Samy Bengio. Density estimation using
    Real NVP. arXiv:1605.08803
[3] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural
    Spline Flows. arXiv:1906.04032
[4] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import torch
from pyro.distributions.torch_transform import TransformModule

from pyro_nflows.nn.dense import ContextNet
from pyro_nflows.nn.widths import default_hidden_dims
from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform
from pyro_nflows.transforms.maps import data_affine_map
from pyro_nflows.transforms.splines import rational_quadratic_spline
from pyro_nflows.validation import (
    check_bool,
    check_count,
    check_hidden_dims,
    check_input_dim,
    check_positive,
    check_spline_from,
)

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "ConditionalAdditiveCoupling",
    "ConditionalAffineCoupling",
    "ConditionalCoupling",
    "ConditionalSplineCoupling",
    "ConditionedAdditiveCoupling",
    "ConditionedAffineCoupling",
    "ConditionedCoupling",
    "ConditionedSplineCoupling",
    "SplineCoupling",
    "additive_coupling",
    "affine_coupling",
    "conditional_additive_coupling",
    "conditional_affine_coupling",
    "conditional_spline_coupling",
    "spline_coupling",
]

# A coupling network: from the kept coordinates (..., kept_dim) to the
# parameter tensors of the element-wise map, each with the same batch shape.
CouplingNet = Callable[[torch.Tensor], Union[torch.Tensor, Sequence[torch.Tensor]]]


# ---------------------------------------------------------------------------
# Argument checks and the network
# ---------------------------------------------------------------------------


def _check_split(input_dim: int, split_dim: int | None) -> int:
    """The size of the first part: ``split_dim``, or ``input_dim // 2`` if None."""
    input_dim = check_input_dim(input_dim)
    if input_dim < 2:
        raise ValueError(
            "a coupling flow needs input_dim >= 2 (one part to condition on, one to transform), "
            f"got input_dim={input_dim}; for a single coordinate use elementwise_affine or "
            "elementwise_spline (conditional_elementwise_affine or conditional_elementwise_spline with a context)"
        )
    if split_dim is None:
        return input_dim // 2
    if isinstance(split_dim, bool) or not isinstance(split_dim, int) or not 1 <= split_dim < input_dim:
        raise ValueError(
            f"split_dim must be an integer with 1 <= split_dim < input_dim = {input_dim} "
            f"(the size of the first part), got {split_dim!r}"
        )
    return split_dim


def _coupling_net(
    in_dim: int,
    hidden_dims: Sequence[int] | None,
    param_shapes: Sequence[tuple[int, ...]],
    input_dim: int,
    context_dim: int = 0,
    identity_init: bool = True,
) -> ContextNet:
    r"""A :class:`ContextNet` from ``in_dim`` inputs to ``param_shapes``. Its last
    layer is zero (identity start) if ``identity_init``, else torch's default
    divided by :math:`\sqrt{t}`, :math:`t` = ``param_shapes[0][0]`` the number
    of transformed coordinates (see the module docstring)."""
    if hidden_dims is None:
        hidden_dims = default_hidden_dims(input_dim, context_dim, "coupling")
    net = ContextNet(in_dim, check_hidden_dims(hidden_dims, minimum_layers=1), param_shapes)
    last = net.net.layers[-1]
    with torch.no_grad():
        if check_bool("identity_init", identity_init):
            last.weight.zero_()
            last.bias.zero_()
        else:
            transformed_dim = param_shapes[0][0]
            last.weight.mul_(transformed_dim**-0.5)
            last.bias.mul_(transformed_dim**-0.5)
    return net


# ---------------------------------------------------------------------------
# The coupling, written once
# ---------------------------------------------------------------------------


class ConditionedCoupling(FlowTransform):
    r"""A coupling transform with a given network (the maths; see the module docstring).

    :math:`y_a = x_a`, :math:`y_b = f(x_b; \theta(x_a))`. Subclasses give the
    element-wise map :math:`f` (:meth:`elementwise`) and the shapes of its
    parameters (:meth:`param_shapes`); this class does the rest.

    :param input_dim: the event size :math:`D \ge 2`.
    :param net: a callable from the kept coordinates, shape ``(..., kept_dim)``,
        to the parameters of :math:`f`: one tensor per entry of
        :meth:`param_shapes`, each of shape ``batch + shape`` where ``batch``
        broadcasts against the input's batch shape.
    :param split_dim: the size of the first part, ``x[..., :split_dim]``;
        default ``D // 2``; ``1 <= split_dim < D``.
    :param reverse: keep the second part and transform the first, instead
        of keeping the first and transforming the second.
    """

    sign = +1  # every transformed coordinate increases with its own input

    def __init__(
        self,
        input_dim: int,
        net: CouplingNet | None = None,
        split_dim: int | None = None,
        reverse: bool = False,
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        self.split_dim = _check_split(input_dim, split_dim)
        self.input_dim = input_dim
        self.reverse = check_bool("reverse", reverse)
        # kept_dim: coordinates passed through (the network's input);
        # transformed_dim: coordinates the element-wise map acts on.
        second_dim = input_dim - self.split_dim
        self.kept_dim = second_dim if reverse else self.split_dim
        self.transformed_dim = input_dim - self.kept_dim
        self.net = net

    # -- what a kind of coupling defines ------------------------------------

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes (without batch dimensions) of the parameters the network must return."""
        raise NotImplementedError

    def elementwise(
        self, x_b: torch.Tensor, params: Sequence[torch.Tensor], inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Apply :math:`f` (or :math:`f^{-1}`) to ``x_b``; return the result and the
        element-wise :math:`\log|f'|` of that direction, both of the broadcast shape."""
        raise NotImplementedError

    # -- the coupling ---------------------------------------------------------

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kept, transformed)`` parts of ``x``."""
        first, second = x[..., : self.split_dim], x[..., self.split_dim :]
        return (second, first) if self.reverse else (first, second)

    def join(self, kept: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`, broadcasting the two parts' batch shapes."""
        batch = torch.broadcast_shapes(kept.shape[:-1], transformed.shape[:-1])
        kept = kept.expand(batch + kept.shape[-1:])
        transformed = transformed.expand(batch + transformed.shape[-1:])
        parts = (transformed, kept) if self.reverse else (kept, transformed)
        return torch.cat(parts, dim=-1)

    def params(self, kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r""":math:`\theta(x_a)`: the network's output for the kept part."""
        params = self.net(kept)
        return (params,) if isinstance(params, torch.Tensor) else tuple(params)

    def _call_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, x_b = self.split(x)
        y_b, log_det = self.elementwise(x_b, self.params(kept), inverse=False)
        return self.join(kept, y_b), log_det.sum(-1)

    def _inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, y_b = self.split(y)
        x_b, inverse_log_det = self.elementwise(y_b, self.params(kept), inverse=True)
        return self.join(kept, x_b), -inverse_log_det.sum(-1)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, split_dim={self.split_dim}, reverse={self.reverse}"


# ---------------------------------------------------------------------------
# The three element-wise maps
# ---------------------------------------------------------------------------


class ConditionedAdditiveCoupling(ConditionedCoupling):
    r"""NICE's additive coupling [1]: :math:`y_b = x_b + t(x_a)`.

    Volume preserving (:math:`\log|\det J| = 0`, computed without the
    network); inverse :math:`x_b = y_b - t(x_a)`. The network returns the
    shift :math:`t`, shape ``(..., transformed_dim)``.
    """

    volume_preserving = True

    def param_shapes(self) -> list[tuple[int, ...]]:
        return [(self.transformed_dim,)]

    def elementwise(self, x_b, params, inverse):
        (shift,) = params
        y_b = x_b - shift if inverse else x_b + shift
        return y_b, torch.zeros_like(y_b)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # y carries the batch shape of x broadcast with that of a context.
        return x.new_zeros(torch.broadcast_shapes(x.shape[:-1], y.shape[:-1]))


class ConditionedAffineCoupling(ConditionedCoupling):
    r"""RealNVP's affine coupling [2], written in the direction that scores data:

    .. math:: x_b = y_b \odot e^{-s} + t, \qquad y_b = (x_b - t) \odot e^{s},
              \qquad s = \frac{\tilde s}{1 + |\tilde s| / B},
              \qquad \log|\det J| = \textstyle\sum_i s_i,

    with :math:`(\tilde s, t)` from the network, each of shape
    ``(..., transformed_dim)``, and the log-scale softly clamped to
    :math:`(-B, B)`, ``B = log_scale_bound``: the element-wise map is
    :class:`~pyro_nflows.transforms.maps.AffineMap` with
    ``shift_on="z"``, MAF's form. (Dinh et al. write
    :math:`y_b = x_b e^{s} + t`, the same family; see the ``AffineMap``
    docstring for why the shift goes on the side that is trained; measured:
    benchmarks/README.md#affine-map-form.)
    """

    def __init__(
        self,
        input_dim: int,
        net: CouplingNet | None = None,
        split_dim: int | None = None,
        reverse: bool = False,
        log_scale_bound: float = 3.0,
        cache_size: int = 1,
    ):
        super().__init__(input_dim, net, split_dim, reverse, cache_size=cache_size)
        self.map = data_affine_map(log_scale_bound)

    @property
    def log_scale_bound(self) -> float:
        return self.map.log_scale_bound

    def param_shapes(self) -> list[tuple[int, ...]]:
        return [(self.transformed_dim,), (self.transformed_dim,)]

    def log_scale(self, unbounded: torch.Tensor) -> torch.Tensor:
        r""":math:`s = \tilde s / (1 + |\tilde s| / B)`."""
        return self.map.log_scale(unbounded)

    def elementwise(self, x_b, params, inverse):
        unbounded, shift = params
        log_scale = self.log_scale(unbounded)
        y_b = self.map.apply(x_b, shift, log_scale, inverse)
        return y_b, (-log_scale if inverse else log_scale).expand(y_b.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", log_scale_bound={self.log_scale_bound}"


class ConditionedSplineCoupling(ConditionedCoupling):
    r"""Neural-spline coupling [3]: each transformed coordinate goes through its
    own monotonic rational-quadratic spline, :math:`K` bins on
    :math:`[-B, B]`, the identity outside,

    .. math:: y_i = \mathrm{RQS}\big(x_i;\ w_i, h_i, d_i\big), \qquad
              (w, h, d) = \mathrm{MLP}(x_a),

    with unnormalised widths and heights of shape ``(..., transformed_dim, K)``
    and interior derivatives of shape ``(..., transformed_dim, K - 1)`` (see
    :func:`~pyro_nflows.transforms.splines.rational_quadratic_spline`), all
    three multiplied by ``output_scale`` first. The inverse solves one
    quadratic per coordinate, exactly.

    :param spline_from: the side the spline reads. ``"z"`` (the default):
        the forward map (noise to data, what a guide or a VAE posterior
        samples with) is the spline, :math:`y_b = \mathrm{RQS}(x_b)`.
        ``"x"``: the inverse (data to noise, what a density estimator
        scores with) is the spline, :math:`x_b = \mathrm{RQS}(y_b)`, and
        the forward map solves its quadratic. The inverse of a
        rational-quadratic spline is not one, so these are two different
        families; each is cheap and exact both ways, but each trains better
        from its own side (as for
        :class:`~pyro_nflows.transforms.maps.SplineMap`), so
        :func:`~pyro_nflows.density.fit` builds its spline couplings with
        ``"x"`` unless the spec says otherwise, while guides, trained by
        sampling, keep ``"z"`` (measured: benchmarks/README.md#spline-side).

    :param output_scale: a constant factor on the network's outputs. The
        learnable couplings use :math:`1/\sqrt{h}`, :math:`h` the width of the
        network's last hidden layer, as the NSF reference code does for widths
        and heights [3] (we scale the derivatives too): each output sums
        :math:`h` hidden units, so without the factor ordinary weights give
        spline parameters of order :math:`\sqrt{h}`, nearly flat bins the
        inverse cannot resolve (measured: benchmarks/README.md#spline-output-scale).
    """

    def __init__(
        self,
        input_dim: int,
        net: CouplingNet | None = None,
        split_dim: int | None = None,
        reverse: bool = False,
        count_bins: int = 8,
        bound: float = 3.0,
        output_scale: float = 1.0,
        spline_from: str = "z",
        cache_size: int = 1,
    ):
        super().__init__(input_dim, net, split_dim, reverse, cache_size=cache_size)
        self.count_bins = check_count("count_bins", count_bins, minimum=2)
        self.bound = check_positive("bound", bound)
        self.output_scale = check_positive("output_scale", output_scale)
        self.spline_from = check_spline_from(spline_from)

    def param_shapes(self) -> list[tuple[int, ...]]:
        dim, bins = self.transformed_dim, self.count_bins
        return [(dim, bins), (dim, bins), (dim, bins - 1)]

    def elementwise(self, x_b, params, inverse):
        widths, heights, derivatives = (self.output_scale * p for p in params)
        spline_inverse = inverse != (self.spline_from == "x")  # the spline's own direction
        return rational_quadratic_spline(x_b, widths, heights, derivatives, bound=self.bound, inverse=spline_inverse)

    def extra_repr(self) -> str:
        options = f", count_bins={self.count_bins}, bound={self.bound}, spline_from={self.spline_from!r}"
        return super().extra_repr() + options


# ---------------------------------------------------------------------------
# Learnable couplings: the network is an MLP of the kept part
# ---------------------------------------------------------------------------


class AdditiveCoupling(ConditionedAdditiveCoupling, TransformModule):
    r"""Learnable NICE coupling [1], :math:`y_b = x_b + \mathrm{MLP}(x_a)`,
    starting at the identity; volume preserving.

    :param input_dim: the event size :math:`D \ge 2`.
    :param hidden_dims: hidden layer widths of the MLP (default:
        :func:`~pyro_nflows.nn.default_hidden_dims`, ``network="coupling"``).
    :param split_dim: the size of the first part (default ``D // 2``).
    :param reverse: transform the first part, conditioned on the second.
    :param identity_init: start at the identity (the network's last layer
        zero); ``False`` starts as a mild random map (torch's default
        initialisation of that layer divided by :math:`\sqrt{t}`), as
        :func:`~pyro_nflows.density.fit` does (see the module docstring;
        measured: benchmarks/README.md#coupling-start).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        split_dim: int | None = None,
        *,
        reverse: bool = False,
        identity_init: bool = True,
        cache_size: int = 1,
    ):
        super().__init__(input_dim, None, split_dim, reverse, cache_size=cache_size)
        self.net = _coupling_net(self.kept_dim, hidden_dims, self.param_shapes(), input_dim, 0, identity_init)


class AffineCoupling(ConditionedAffineCoupling, TransformModule):
    r"""Learnable RealNVP coupling [2], :math:`y_b = (x_b - t) \odot e^{s}`
    (so :math:`x_b = y_b \odot e^{-s} + t`) with
    :math:`(\tilde s, t) = \mathrm{MLP}(x_a)` and
    :math:`s = \tilde s / (1 + |\tilde s| / B)`, starting at the identity.

    Example::

        >>> import pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(4), torch.ones(4)).to_event(1)
        >>> layers = [AffineCoupling(4, reverse=bool(i % 2)) for i in range(4)]
        >>> flow = dist.TransformedDistribution(base, layers)
        >>> flow.log_prob(torch.zeros(2, 4)).shape
        torch.Size([2])

    :param input_dim: the event size :math:`D \ge 2`.
    :param hidden_dims: hidden layer widths of the MLP (default:
        :func:`~pyro_nflows.nn.default_hidden_dims`, ``network="coupling"``).
    :param split_dim: the size of the first part (default ``D // 2``).
    :param reverse: transform the first part, conditioned on the second.
    :param log_scale_bound: :math:`B`, the bound on :math:`|s|`.
    :param identity_init: start at the identity (the network's last layer
        zero); ``False`` starts as a mild random map (torch's default
        initialisation of that layer divided by :math:`\sqrt{t}`), as
        :func:`~pyro_nflows.density.fit` does (see the module docstring;
        measured: benchmarks/README.md#coupling-start).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        split_dim: int | None = None,
        *,
        reverse: bool = False,
        log_scale_bound: float = 3.0,
        identity_init: bool = True,
        cache_size: int = 1,
    ):
        super().__init__(input_dim, None, split_dim, reverse, log_scale_bound, cache_size=cache_size)
        self.net = _coupling_net(self.kept_dim, hidden_dims, self.param_shapes(), input_dim, 0, identity_init)


class SplineCoupling(ConditionedSplineCoupling, TransformModule):
    r"""Learnable neural-spline coupling [3]: a rational-quadratic spline per
    transformed coordinate, its knots an MLP of :math:`x_a`; starts at the identity.

    :param input_dim: the event size :math:`D \ge 2`.
    :param split_dim: the size of the first part (default ``D // 2``).
    :param hidden_dims: hidden layer widths of the MLP (default:
        :func:`~pyro_nflows.nn.default_hidden_dims`, ``network="coupling"``).
    :param count_bins: the number of bins :math:`K`.
    :param bound: the half-width :math:`B` of the interval the splines cover.
    :param reverse: transform the first part, conditioned on the second.
    :param spline_from: ``"z"`` (default; the spline maps noise to data) or
        ``"x"`` (it maps data to noise; for density estimation), see
        :class:`ConditionedSplineCoupling`.

    Unlike the affine and additive couplings, it always starts at the
    identity (see the module docstring; measured:
    benchmarks/README.md#coupling-start).
    """

    def __init__(
        self,
        input_dim: int,
        split_dim: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        count_bins: int = 8,
        bound: float = 3.0,
        *,
        reverse: bool = False,
        spline_from: str = "z",
        cache_size: int = 1,
    ):
        super().__init__(
            input_dim, None, split_dim, reverse, count_bins, bound, spline_from=spline_from, cache_size=cache_size
        )
        self.net = _coupling_net(self.kept_dim, hidden_dims, self.param_shapes(), input_dim)
        self.output_scale = self.net.last_width**-0.5


# ---------------------------------------------------------------------------
# Conditional couplings: the network is an MLP of the kept part and a context
# ---------------------------------------------------------------------------


class ConditionalCoupling(ConditionalFlow):
    r"""A coupling whose network sees a context too, :math:`\theta = \mathrm{MLP}([x_a, c])`.

    ``condition(c)`` returns the subclass's ``Conditioned<X>Coupling``
    (:attr:`conditioned_class`) with the network bound to ``c``; ``c``'s batch
    shape broadcasts against that of the points. Subclasses only name the
    conditioned class and its options.
    """

    conditioned_class: type[ConditionedCoupling] = ConditionedCoupling

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        split_dim: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        reverse: bool = False,
        identity_init: bool = True,
        **options: Any,
    ):
        super().__init__(input_dim, context_dim)
        self._options = dict(split_dim=split_dim, reverse=reverse, **options)
        layout = self.conditioned_class(input_dim, None, **self._options)  # validates the options
        self.split_dim = layout.split_dim
        self.reverse = layout.reverse
        self.net = _coupling_net(
            layout.kept_dim + context_dim, hidden_dims, layout.param_shapes(), input_dim, context_dim, identity_init
        )

    def _net_with_context(self, kept: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = torch.broadcast_shapes(kept.shape[:-1], context.shape[:-1])
        kept = kept.expand(batch + kept.shape[-1:])
        context = context.expand(batch + context.shape[-1:])
        return self.net(torch.cat((kept, context), dim=-1))

    def _condition(self, context: torch.Tensor) -> ConditionedCoupling:
        net = functools.partial(self._net_with_context, context=context)
        return self.conditioned_class(self.input_dim, net, **self._options)

    def extra_repr(self) -> str:
        hidden = ("split_dim", "output_scale")
        options = "".join(f", {key}={value}" for key, value in self._options.items() if key not in hidden)
        dims = f"input_dim={self.input_dim}, context_dim={self.context_dim}, split_dim={self.split_dim}"
        return dims + options


class ConditionalAdditiveCoupling(ConditionalCoupling):
    r"""NICE coupling with a context: :math:`y_b = x_b + \mathrm{MLP}([x_a, c])`;
    ``condition(c)`` returns a :class:`ConditionedAdditiveCoupling`."""

    conditioned_class = ConditionedAdditiveCoupling

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        split_dim: int | None = None,
        *,
        reverse: bool = False,
        identity_init: bool = True,
    ):
        super().__init__(input_dim, context_dim, split_dim, hidden_dims, reverse, identity_init)


class ConditionalAffineCoupling(ConditionalCoupling):
    r"""RealNVP coupling with a context: :math:`(\tilde s, t) = \mathrm{MLP}([x_a, c])`;
    ``condition(c)`` returns a :class:`ConditionedAffineCoupling`."""

    conditioned_class = ConditionedAffineCoupling

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        split_dim: int | None = None,
        *,
        reverse: bool = False,
        log_scale_bound: float = 3.0,
        identity_init: bool = True,
    ):
        super().__init__(
            input_dim, context_dim, split_dim, hidden_dims, reverse, identity_init, log_scale_bound=log_scale_bound
        )


class ConditionalSplineCoupling(ConditionalCoupling):
    r"""Neural-spline coupling with a context: knots from :math:`\mathrm{MLP}([x_a, c])`;
    ``condition(c)`` returns a :class:`ConditionedSplineCoupling`."""

    conditioned_class = ConditionedSplineCoupling

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        split_dim: int | None = None,
        hidden_dims: Sequence[int] | None = None,
        count_bins: int = 8,
        bound: float = 3.0,
        *,
        reverse: bool = False,
        spline_from: str = "z",
    ):
        super().__init__(
            input_dim,
            context_dim,
            split_dim,
            hidden_dims,
            reverse,
            count_bins=count_bins,
            bound=bound,
            spline_from=spline_from,
        )
        self._options["output_scale"] = self.net.last_width**-0.5


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _check_dim(dim: int) -> None:
    if dim != -1:
        raise ValueError(
            f"dim={dim!r}: the couplings here split the last dimension of a vector (dim=-1, Pyro's default); "
            "move the dimension to split last (e.g. with x.movedim) before the flow"
        )


def additive_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    split_dim: int | None = None,
    *,
    reverse: bool = False,
    identity_init: bool = True,
) -> AdditiveCoupling:
    """A learnable NICE (additive, volume-preserving) coupling layer (arguments as :func:`affine_coupling`'s)."""
    return AdditiveCoupling(input_dim, hidden_dims, split_dim, reverse=reverse, identity_init=identity_init)


def affine_coupling(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    split_dim: int | None = None,
    dim: int = -1,
    *,
    reverse: bool = False,
    log_scale_bound: float = 3.0,
    identity_init: bool = True,
) -> AffineCoupling:
    """A learnable RealNVP (affine) coupling layer with a log-scale bounded by
    ``log_scale_bound``; the positional arguments are Pyro's ``affine_coupling``'s."""
    _check_dim(dim)
    return AffineCoupling(
        input_dim, hidden_dims, split_dim, reverse=reverse, log_scale_bound=log_scale_bound, identity_init=identity_init
    )


def spline_coupling(
    input_dim: int,
    split_dim: int | None = None,
    hidden_dims: Sequence[int] | None = None,
    count_bins: int = 8,
    bound: float = 3.0,
    *,
    reverse: bool = False,
    spline_from: str = "z",
) -> SplineCoupling:
    """A learnable rational-quadratic spline coupling layer, ``count_bins`` bins on ``[-bound, bound]``
    (the positional arguments are Pyro's ``spline_coupling``'s); ``spline_from="x"`` puts the spline on
    the data side (for density estimation)."""
    return SplineCoupling(
        input_dim, split_dim, hidden_dims, count_bins, bound, reverse=reverse, spline_from=spline_from
    )


def conditional_additive_coupling(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    split_dim: int | None = None,
    *,
    reverse: bool = False,
    identity_init: bool = True,
) -> ConditionalAdditiveCoupling:
    """A NICE coupling layer whose shift an MLP computes from the kept part and a context."""
    return ConditionalAdditiveCoupling(
        input_dim, context_dim, hidden_dims, split_dim, reverse=reverse, identity_init=identity_init
    )


def conditional_affine_coupling(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    split_dim: int | None = None,
    dim: int = -1,
    *,
    reverse: bool = False,
    log_scale_bound: float = 3.0,
    identity_init: bool = True,
) -> ConditionalAffineCoupling:
    """A RealNVP coupling layer whose scale and shift an MLP computes from the kept part and a context
    (the positional arguments are Pyro's ``conditional_affine_coupling``'s)."""
    _check_dim(dim)
    return ConditionalAffineCoupling(
        input_dim,
        context_dim,
        hidden_dims,
        split_dim,
        reverse=reverse,
        log_scale_bound=log_scale_bound,
        identity_init=identity_init,
    )


def conditional_spline_coupling(
    input_dim: int,
    context_dim: int,
    split_dim: int | None = None,
    hidden_dims: Sequence[int] | None = None,
    count_bins: int = 8,
    bound: float = 3.0,
    *,
    reverse: bool = False,
    spline_from: str = "z",
) -> ConditionalSplineCoupling:
    """A spline coupling layer whose knots an MLP computes from the kept part and a context
    (arguments in :func:`spline_coupling`'s order)."""
    return ConditionalSplineCoupling(
        input_dim, context_dim, split_dim, hidden_dims, count_bins, bound, reverse=reverse, spline_from=spline_from
    )
