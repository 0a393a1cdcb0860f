r"""The element-wise maps that autoregressive and coupling flows share.

An autoregressive flow (:mod:`~pyro_nflows.transforms.autoregressive`) maps
each coordinate by :math:`x_i = g(z_i; \theta_i)` with :math:`\theta_i` from
a MADE; a coupling flow (:mod:`~pyro_nflows.transforms.coupling`) maps each
transformed coordinate the same way with :math:`\theta` from the kept part.
The maps :math:`g` are written once, here:

- :class:`AffineMap`: :math:`g(z) = z e^{s} + m` (or the shift on the other
  side), the log-scale :math:`s` softly bounded by :func:`soft_clamp`;
- :class:`GatedAffineMap`: IAF's gated update :math:`\sigma z + (1 - \sigma) m`;
- :class:`SplineMap`: a monotonic rational-quadratic spline
  (:func:`~pyro_nflows.transforms.splines.rational_quadratic_spline`).

Each map takes its parameters as the last axis of ``theta`` (``param_dim``
numbers per coordinate) and returns, in both directions, the output and the
element-wise :math:`\log g'(z)`, the log-derivative of the forward map.

References:

[1] Diederik P. Kingma, Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya
    Sutskever, Max Welling. Improving Variational Inference with Inverse
    Autoregressive Flow. arXiv:1606.04934
[2] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural
    Spline Flows. arXiv:1906.04032
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pyro_nflows.transforms.splines import rational_quadratic_spline
from pyro_nflows.validation import check_count, check_positive, check_spline_from

__all__ = ["SOFT_CLAMPS", "AffineMap", "GatedAffineMap", "SplineMap", "data_affine_map", "soft_clamp"]

SOFT_CLAMPS = ("softsign", "tanh")


def soft_clamp(value: torch.Tensor, bound: float, shape: str = "softsign") -> torch.Tensor:
    """``value`` smoothly kept inside ``(-bound, bound)``, close to ``value`` near 0.

    - ``"softsign"``: ``value / (1 + |value| / bound)``, whose gradient dies
      like ``1 / value**2`` near the bound, so a layer that needs a large
      log-scale (a thin ring, a sharp edge) keeps being pushed towards it;
    - ``"tanh"``: ``bound * tanh(value / bound)``, whose gradient dies
      exponentially, and which reaches a given fraction of the bound with a
      smaller ``value``.

    A hard clamp has zero gradient outside its range. The flows fitted to
    data (MAF, RealNVP) use softsign, IAF fitted by sampling uses tanh (see
    :class:`AffineMap`; measured: benchmarks/README.md#affine-map-form).
    """
    if shape == "softsign":
        return value / (1 + value.abs() / bound)
    if shape == "tanh":
        return bound * torch.tanh(value / bound)
    raise ValueError(f"the soft clamp's shape must be one of {SOFT_CLAMPS}, got {shape!r}")


# ---------------------------------------------------------------------------
# Element-wise maps z_i -> x_i = g(z_i; theta_i). Each knows how many
# parameters it takes; forward and inverse both return (output, log|dg/dz|)
# elementwise, the log-derivative of the forward map at that point.
# ---------------------------------------------------------------------------


class AffineMap:
    r"""An affine map per coordinate with a bounded log-scale
    :math:`s = \mathrm{clamp}_c(\tilde s)` (:math:`c = ` ``log_scale_bound``;
    ``clamp`` is ``"softsign"``, :math:`\tilde s / (1 + |\tilde s| / c)`, or
    ``"tanh"``, :math:`c \tanh(\tilde s / c)`; see :func:`soft_clamp`),
    which keeps a single layer from blowing up while staying smooth.
    ``shift_on`` says which side the shift :math:`m` is added to, after
    scaling:

    - ``"x"`` (IAF): :math:`x = g(z) = z\, e^{s} + m`, :math:`z = (x - m)\, e^{-s}`;
    - ``"z"`` (MAF): :math:`z = g^{-1}(x) = x\, e^{-s} + m`, :math:`x = (z - m)\, e^{s}`.

    Both describe the same family, :math:`\log g'(z) = s` in both; they
    differ in how the network's outputs move the map. Put the shift on the
    side the flow is trained in: a MAF is fitted by scoring data,
    :math:`z = x e^{-s} + m`, where :math:`\partial z / \partial m = 1`.
    Scored as :math:`(x - m) e^{-s}`, the shift's gradient is multiplied by
    :math:`e^{-s}`, which is largest exactly where the density is sharp, so
    the shift's effective step size is tied to the scale.

    So MAF and RealNVP use ``shift_on="z", clamp="softsign"``
    (:func:`data_affine_map`), and IAF keeps its trained direction's form,
    ``shift_on="x", clamp="tanh"`` (the defaults), each the choice that
    trained better in its own direction (measured:
    benchmarks/README.md#affine-map-form).
    """

    param_dim = 2

    def __init__(self, log_scale_bound: float = 3.0, shift_on: str = "x", clamp: str = "tanh"):
        self.log_scale_bound = check_positive("log_scale_bound", log_scale_bound)
        if shift_on not in ("x", "z"):
            raise ValueError(f"shift_on must be 'x' (IAF's form) or 'z' (MAF's form), got {shift_on!r}")
        if clamp not in SOFT_CLAMPS:
            raise ValueError(f"clamp must be one of {SOFT_CLAMPS}, got {clamp!r}")
        self.shift_on = shift_on
        self.clamp = clamp

    def log_scale(self, unbounded: torch.Tensor) -> torch.Tensor:
        r"""The bounded log-scale :math:`s` of the network's output :math:`\tilde s`."""
        return soft_clamp(unbounded, self.log_scale_bound, self.clamp)

    def _shift_log_scale(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return theta[..., 0], self.log_scale(theta[..., 1])

    def apply(self, value: torch.Tensor, shift: torch.Tensor, log_scale: torch.Tensor, inverse: bool) -> torch.Tensor:
        """:math:`g` (``inverse=False``, ``value`` is :math:`z`) or :math:`g^{-1}`
        (``value`` is :math:`x`) for a given shift and bounded log-scale."""
        if inverse:
            if self.shift_on == "x":
                return (value - shift) * torch.exp(-log_scale)
            return torch.addcmul(shift, value, torch.exp(-log_scale))
        if self.shift_on == "x":
            return torch.addcmul(shift, value, log_scale.exp())
        return (value - shift) * log_scale.exp()

    def forward(self, z: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, log_scale = self._shift_log_scale(theta)
        return self.apply(z, shift, log_scale, inverse=False), log_scale

    def inverse(self, x: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, log_scale = self._shift_log_scale(theta)
        return self.apply(x, shift, log_scale, inverse=True), log_scale

    # The in-place steps of MADE.invert's no-grad path: the same maps as
    # forward/inverse, for one coordinate of a batch, with theta's P rows of
    # shape (B,) as scratch space. A few in-place operations instead of about
    # ten allocating ones, which is what a step of the sequential direction
    # costs at small sizes (per-operation overhead, not arithmetic).

    def _scale_into(self, raw: torch.Tensor, sign: float) -> torch.Tensor:
        """``exp(sign * log_scale)`` computed in place in ``raw``: with
        :math:`c` the bound, :math:`s = c \tilde s / (c + |\tilde s|)` or
        :math:`c \tanh(\tilde s / c)`."""
        bound = self.log_scale_bound
        if self.clamp == "tanh":
            return raw.div_(bound).tanh_().mul_(sign * bound).exp_()
        denominator = raw.abs().add_(bound)
        return raw.mul_(sign * bound).div_(denominator).exp_()

    def forward_into(self, z: torch.Tensor, theta: torch.Tensor, out: torch.Tensor) -> None:
        shift, raw = theta
        if self.shift_on == "x":
            torch.addcmul(shift, z, self._scale_into(raw, 1.0), out=out)
        else:
            torch.sub(z, shift, out=out).mul_(self._scale_into(raw, 1.0))

    def inverse_into(self, x: torch.Tensor, theta: torch.Tensor, out: torch.Tensor) -> None:
        shift, raw = theta
        if self.shift_on == "x":
            torch.sub(x, shift, out=out).mul_(self._scale_into(raw, -1.0))
        else:
            torch.addcmul(shift, x, self._scale_into(raw, -1.0), out=out)


def data_affine_map(log_scale_bound: float = 3.0) -> AffineMap:
    """The affine map of the flows fitted by scoring data (MAF, RealNVP's
    couplings): the shift on the noise side and the softsign bound."""
    return AffineMap(log_scale_bound, shift_on="z", clamp="softsign")


class GatedAffineMap(AffineMap):
    r"""Kingma et al.'s numerically stable IAF update [1]:
    :math:`g(z) = \sigma z + (1 - \sigma) m`, :math:`\sigma = \mathrm{sigmoid}(\tilde s)`,
    an affine map with scale :math:`\sigma` and shift :math:`(1 - \sigma) m`."""

    def _shift_log_scale(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(theta[..., 1])
        return (1 - gate) * theta[..., 0], F.logsigmoid(theta[..., 1])

    def forward_into(self, z: torch.Tensor, theta: torch.Tensor, out: torch.Tensor) -> None:
        mean, raw = theta  # m + sigma (z - m)
        torch.sub(z, mean, out=out).mul_(raw.sigmoid_()).add_(mean)

    def inverse_into(self, x: torch.Tensor, theta: torch.Tensor, out: torch.Tensor) -> None:
        mean, raw = theta  # m + (x - m) / sigma
        torch.sub(x, mean, out=out).div_(raw.sigmoid_()).add_(mean)


class SplineMap:
    r"""A rational-quadratic spline :math:`r` per coordinate with ``count_bins``
    bins on ``[-bound, bound]``, the identity outside [2]. ``spline_from``
    names the side the spline reads:

    - ``"z"`` (IAF's form): :math:`x = g(z) = r(z)`, :math:`z = r^{-1}(x)`;
    - ``"x"`` (MAF's form): :math:`z = g^{-1}(x) = r(x)`, :math:`x = r^{-1}(z)`.

    The inverse of a rational-quadratic spline is not one, so the two forms
    are different families. Use the one whose spline is evaluated in the
    direction the flow is trained in, as zuko and nflows do for density
    estimation (measured: benchmarks/README.md#spline-side). The inverse
    :math:`r^{-1}` is a closed-form root of a quadratic per point (no
    iteration), so both forms are exact in both directions.
    """

    def __init__(self, count_bins: int = 8, bound: float = 3.0, spline_from: str = "z"):
        self.count_bins = check_count("count_bins", count_bins, minimum=2)
        self.bound = check_positive("bound", bound)
        self.spline_from = check_spline_from(spline_from)
        self.param_dim = 3 * count_bins - 1

    def _spline(self, value: torch.Tensor, theta: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`r` (or :math:`r^{-1}`) at ``value`` and the log-derivative of what was evaluated."""
        k = self.count_bins
        widths, heights, derivatives = theta[..., :k], theta[..., k : 2 * k], theta[..., 2 * k :]
        return rational_quadratic_spline(value, widths, heights, derivatives, bound=self.bound, inverse=inverse)

    def forward(self, z: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._spline(z, theta, inverse=self.spline_from == "x")

    def inverse(self, x: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = self._spline(x, theta, inverse=self.spline_from == "z")
        return z, -log_det  # log g'(z) = -log (g^{-1})'(x)
