r"""Monotonic rational-quadratic splines (Neural Spline Flows [1]).

One pure function, :func:`rational_quadratic_spline`, maps every element of a
tensor through its own monotonic spline. It is shared by the element-wise
spline flow and by the coupling and autoregressive spline flows: those differ
only in where the spline parameters come from (free parameters, a coupling
network, a MADE), never in the spline itself.

**The spline.** On :math:`[-B, B]` (``bound``) the spline has :math:`K` bins
with knots :math:`(x^{(k)}, y^{(k)})`, :math:`k = 0, \dots, K`, running from
:math:`(-B, -B)` to :math:`(B, B)`, and positive derivatives
:math:`\delta^{(k)}` at the knots. Bin :math:`k` has width
:math:`w_k = x^{(k+1)} - x^{(k)}`, height :math:`h_k = y^{(k+1)} - y^{(k)}`
and slope :math:`s_k = h_k / w_k`. Outside :math:`[-B, B]` the map is the
identity, and :math:`\delta^{(0)} = \delta^{(K)} = 1`, so that the spline
joins the identity with a continuous first derivative.

**Parameterisation.** From unnormalised widths :math:`\tilde w`, heights
:math:`\tilde h` (each :math:`K` numbers) and interior derivatives
:math:`\tilde d` (:math:`K - 1` numbers):

.. math::

    w = 2B\,\big(w_{\min} + (1 - K w_{\min})\,\mathrm{softmax}(\tilde w)\big),
    \qquad
    h = 2B\,\big(h_{\min} + (1 - K h_{\min})\,\mathrm{softmax}(\tilde h)\big),

    \delta^{(k)} = \delta_{\min} + \mathrm{softplus}(\tilde d_k + c),
    \qquad c = \log\big(e^{1 - \delta_{\min}} - 1\big),

so :math:`\tilde d_k = 0` gives :math:`\delta^{(k)} = 1`. All-zero parameters
give equal bins, unit slopes and unit derivatives: the identity.

**Forward** (bin :math:`k`, :math:`\xi = (x - x^{(k)}) / w_k \in [0, 1]`,
dropping the bin index: :math:`\delta_0 = \delta^{(k)}`,
:math:`\delta_1 = \delta^{(k+1)}`):

.. math::

    y = y^{(k)} + h\,\frac{s\,\xi^2 + \delta_0\,\xi(1 - \xi)}
                         {s + (\delta_0 + \delta_1 - 2s)\,\xi(1 - \xi)},

    \frac{dy}{dx} = \frac{s^2 \big(\delta_1 \xi^2 + 2 s\, \xi(1 - \xi)
                                   + \delta_0 (1 - \xi)^2\big)}
                         {\big(s + (\delta_0 + \delta_1 - 2s)\,\xi(1 - \xi)\big)^2}.

**Inverse.** Given :math:`y` in bin :math:`k` (found among the
:math:`y`-knots), :math:`\xi` solves :math:`a\xi^2 + b\xi + c = 0` with

.. math::

    a = h\,(s - \delta_0) + (y - y^{(k)})(\delta_0 + \delta_1 - 2s),

    b = h\,\delta_0 - (y - y^{(k)})(\delta_0 + \delta_1 - 2s),

    c = -s\,(y - y^{(k)}),

and the root in :math:`[0, 1]` is
:math:`\xi = 2c / \big(-b - \sqrt{b^2 - 4ac}\big)
= \big(-b + \sqrt{b^2 - 4ac}\big) / 2a`; then :math:`x = x^{(k)} + \xi w`.
The first form is cancellation-free when :math:`b \ge 0`, the second when
:math:`b < 0` (then :math:`a > hs > 0`), and :math:`b` does go negative
(at the top of a bin whenever :math:`\delta_1 > 2s`), so we use whichever
is stable: the first form alone loses accuracy in float32 next to steep
knots (measured: benchmarks/README.md#spline-inverse-form). The
log-determinant of the inverse is minus the forward one at that :math:`x`.
The inverse is exact (closed form, no iteration) and costs about as much as
the forward: one bin search, a handful of element-wise operations and one
square root.

**Bin search.** An element's bin is the number of interior knots at or below
it. Counting (a comparison against the :math:`K - 1` interior knots and a sum)
works for any broadcast batch shape, unlike :func:`torch.searchsorted`, which
needs the sorted sequence and the values to share their leading dimensions.
It costs :math:`O(K)` per element, which is small next to the rest for the
:math:`K` of a few to a few dozen used in practice.

**Why not Pyro's.** Pyro has this spline as
``pyro.distributions.transforms.spline._monotonic_rational_spline``, but that
is private API, and we need one function that serves element-wise, coupling
and autoregressive flows alike with parameters that are either shared or
carry batch dimensions of their own (broadcast against the input).

References:

[1] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural
    Spline Flows. arXiv:1906.04032
[2] J. A. Gregory, R. Delbourgo. Piecewise rational quadratic interpolation to
    monotonic data. IMA Journal of Numerical Analysis 2(2), 1982.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rational_quadratic_spline"]


def _knots(unnormalised: torch.Tensor, bound: float, min_bin: float) -> torch.Tensor:
    """Knot positions ``(..., K + 1)`` from ``K`` unnormalised bin sizes.

    The first knot is exactly ``-bound`` and the last exactly ``bound``: the
    cumulative sum of the normalised sizes is 1 only up to rounding, and the
    ends must match the identity outside the interval exactly.
    """
    num_bins = unnormalised.shape[-1]
    sizes = min_bin + (1.0 - min_bin * num_bins) * torch.softmax(unnormalised, dim=-1)
    inner = 2.0 * bound * torch.cumsum(sizes[..., :-1], dim=-1) - bound
    # F.pad adds the two exact end points in one call.
    return F.pad(F.pad(inner, (1, 0), value=-bound), (0, 1), value=bound)


def _knot_derivatives(unnormalised: torch.Tensor, min_derivative: float) -> torch.Tensor:
    """Derivatives ``(..., K + 1)`` at all knots; the two end ones are 1."""
    # softplus(shift) = 1 - min_derivative, so an unnormalised 0 gives 1.
    shift = math.log(math.expm1(1.0 - min_derivative))
    interior = min_derivative + F.softplus(unnormalised + shift)
    return F.pad(interior, (1, 1), value=1.0)


def _gather_bin(params: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``params[..., index]`` and ``params[..., index + 1]`` in one gather.

    ``params`` has shape ``(..., K + 1)`` broadcastable to ``index.shape + (K + 1,)``.
    """
    both = torch.stack((index, index + 1), dim=-1)
    params = params.expand(index.shape + params.shape[-1:])
    lower, upper = torch.gather(params, -1, both).unbind(-1)
    return lower, upper


def _log_derivative(
    xi: torch.Tensor,
    slope: torch.Tensor,
    d_lower: torch.Tensor,
    d_upper: torch.Tensor,
) -> torch.Tensor:
    """``log dy/dx`` at relative position ``xi`` in a bin (see the module docstring)."""
    one_minus_xi = 1.0 - xi
    xi_term = xi * one_minus_xi
    denominator = slope + (d_lower + d_upper - 2.0 * slope) * xi_term
    numerator = d_upper * xi.square() + 2.0 * slope * xi_term + d_lower * one_minus_xi.square()
    # Two logs rather than three (log is the costliest operation here), but not
    # one: denominator**2 alone overflows float32 for huge derivatives.
    return torch.log(numerator) + 2.0 * torch.log(slope / denominator)


def rational_quadratic_spline(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    bound: float = 3.0,
    inverse: bool = False,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a monotonic rational-quadratic spline element-wise.

    :param x: the input (the spline's output when ``inverse=True``), any shape.
    :param widths: unnormalised bin widths, shape ``(..., K)``, where ``...``
        broadcasts against ``x.shape`` (e.g. ``(D, K)`` shared across a
        batch of ``(..., D)`` inputs, or ``(N, D, K)`` per input).
    :param heights: unnormalised bin heights, shape ``(..., K)``.
    :param derivatives: unnormalised derivatives at the ``K - 1`` interior knots,
        shape ``(..., K - 1)``.
    :param bound: the spline acts on ``[-bound, bound]``; the identity elsewhere.
    :param inverse: apply the inverse spline instead.
    :param min_bin_width: lower limit of a bin's width, as a fraction of
        ``2 * bound``; with ``min_bin_height`` and ``min_derivative`` it keeps the
        spline (and its inverse) well conditioned.
    :param min_bin_height: lower limit of a bin's height, likewise.
    :param min_derivative: lower limit of the derivative at a knot.
    :returns: ``(output, log_abs_det)``: the transformed tensor and
        ``log|d output / d input|``, element-wise, both of the broadcast shape
        of ``x`` and the parameters' batch shape (``x.shape`` whenever the
        parameters broadcast to it).
    """
    num_bins = widths.shape[-1]
    if heights.shape[-1] != num_bins or derivatives.shape[-1] != num_bins - 1:
        raise ValueError(
            f"expected widths and heights with K entries and derivatives with K - 1 in the last "
            f"dimension, got {widths.shape[-1]}, {heights.shape[-1]} and {derivatives.shape[-1]}"
        )
    if min_bin_width * num_bins >= 1.0 or min_bin_height * num_bins >= 1.0:
        raise ValueError(
            f"min_bin_width and min_bin_height must be below 1 / K = {1.0 / num_bins}, "
            f"got {min_bin_width} and {min_bin_height}"
        )
    if not 0.0 < min_derivative < 1.0:
        raise ValueError(f"min_derivative must be in (0, 1), got {min_derivative}")

    batch_shape = torch.broadcast_shapes(
        x.shape, widths.shape[:-1], heights.shape[:-1], derivatives.shape[:-1]
    )
    x = x.expand(batch_shape)

    x_knots = _knots(widths, bound, min_bin_width)  # (..., K + 1)
    y_knots = _knots(heights, bound, min_bin_height)  # (..., K + 1)
    knot_derivatives = _knot_derivatives(derivatives, min_derivative)  # (..., K + 1)

    # The spline's own variable: x going forward, y going backward.
    in_knots = y_knots if inverse else x_knots
    inside = (x >= -bound) & (x <= bound)
    # t is what the spline branch sees. Elements outside take the identity
    # branch below; giving the spline branch a harmless in-range value for them
    # keeps its arithmetic (and so the gradients through torch.where) finite.
    # The returned output is not clipped.
    t = torch.where(inside, x, torch.zeros_like(x))

    # Bin index = number of interior knots at or below the point, in [0, K - 1];
    # the point ``bound`` itself falls in the last bin, at its right end.
    bin_index = (t.unsqueeze(-1) >= in_knots[..., 1:-1]).sum(dim=-1)

    x_lo, x_hi = _gather_bin(x_knots, bin_index)
    y_lo, y_hi = _gather_bin(y_knots, bin_index)
    d_lo, d_hi = _gather_bin(knot_derivatives, bin_index)
    width = x_hi - x_lo
    height = y_hi - y_lo
    slope = height / width
    curvature = d_lo + d_hi - 2.0 * slope

    if not inverse:
        # x_lo <= t <= x_hi by the bin search, so xi is in [0, 1] without clamping.
        xi = (t - x_lo) / width
        xi_term = xi * (1.0 - xi)
        numerator = height * (slope * xi.square() + d_lo * xi_term)
        denominator = slope + curvature * xi_term
        spline_out = y_lo + numerator / denominator
        spline_logdet = _log_derivative(xi, slope, d_lo, d_hi)
    else:
        offset = t - y_lo
        a = height * (slope - d_lo) + offset * curvature
        b = height * d_lo - offset * curvature
        c = -slope * offset
        # b^2 - 4ac > 0 in exact arithmetic; the clamp only undoes rounding.
        discriminant = (b.square() - 4.0 * a * c).clamp(min=0.0)
        # The root in [0, 1] is 2c / (-b - sqrt(D)) = (-b + sqrt(D)) / 2a. Each
        # form cancels for one sign of b, so take q = -(b + sign(b) sqrt(D)) / 2
        # and use c / q when b >= 0, q / a when b < 0 (then a > h s > 0).
        # q is never 0, and a is replaced where unused, so both branches stay finite.
        non_negative_b = b >= 0
        root = torch.sqrt(discriminant)
        q = -0.5 * (b + torch.where(non_negative_b, root, -root))
        a_where_used = torch.where(non_negative_b, torch.ones_like(a), a)
        xi = torch.where(non_negative_b, c / q, q / a_where_used)
        # The exact root lies in [0, 1]; rounding can push it an ulp outside at
        # bin edges. Clamp the value only: a plain clamp would also zero the
        # gradient there (e.g. at y = bound), so the correction is detached.
        xi = xi + (xi.clamp(0.0, 1.0) - xi).detach()
        spline_out = x_lo + xi * width
        spline_logdet = -_log_derivative(xi, slope, d_lo, d_hi)

    output = torch.where(inside, spline_out, x)
    log_abs_det = torch.where(inside, spline_logdet, torch.zeros_like(spline_logdet))
    return output, log_abs_det
