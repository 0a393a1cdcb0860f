r"""Radial flows (Rezende & Mohamed [1]), with a closed-form inverse for *any* point.

A radial flow contracts or expands space around a centre :math:`x_0`:

.. math:: y = x + \beta\, h(\alpha, r)\,(x - x_0), \qquad h(\alpha, r) = \frac{1}{\alpha + r},
          \qquad r = \|x - x_0\|,

.. math:: \log|\det J| = (D - 1)\log(1 + \beta h) + \log(1 + \beta h + \beta h' r),
          \qquad h' = \partial h / \partial r = -h^2.

**Invertibility.** With :math:`\alpha = \operatorname{softplus}(\alpha') > 0`
and :math:`\beta = -\alpha + \operatorname{softplus}(\beta')`, so that
:math:`\gamma = \alpha + \beta = \operatorname{softplus}(\beta') > 0`
([1], appendix A.2), the map is a bijection of :math:`\mathbb{R}^D`. Indeed
:math:`y - x_0 = (x - x_0)\,\frac{\gamma + r}{\alpha + r}`: every point moves
along its own ray from :math:`x_0` (the factor is positive), and its distance
to :math:`x_0` becomes

.. math:: \rho = r\,\frac{\gamma + r}{\alpha + r},

which increases from 0 to :math:`\infty` with :math:`r`. So the map is *onto*
:math:`\mathbb{R}^D`: there are no finite points outside its range. In terms of
:math:`\alpha, \gamma > 0` both factors of the determinant are sums of
positive terms, computed without cancellation even as :math:`\beta \to -\alpha`:

.. math:: 1 + \beta h = \frac{\gamma + r}{\alpha + r}, \qquad
          1 + \beta h + \beta h' r = 1 + \alpha\beta h^2 = \frac{r(r + 2\alpha) + \alpha\gamma}{(\alpha + r)^2}.

**Inverse, closed form.** Given :math:`y`, :math:`\rho = \|y - x_0\|` is
known and :math:`r` solves :math:`r^2 + (\gamma - \rho)\, r - \alpha\rho = 0`.
The product of its roots is :math:`-\alpha\rho \le 0`, so exactly one is
non-negative; with :math:`p = \gamma - \rho` and
:math:`q = \sqrt{p^2 + 4\alpha\rho}` (computed as ``hypot``, so that far-away
points do not overflow) it is :math:`r = (q - p)/2` for :math:`p \le 0` and
the equal :math:`r = 2\alpha\rho/(p + q)` for :math:`p > 0`, each free of
cancellation. Then :math:`x = x_0 + (y - x_0)\,\frac{\alpha + r}{\gamma + r}`.
Cost: one pass of :math:`O(D)` arithmetic per point, no iterations (measured:
benchmarks/README.md#radial-inverse-cost). A non-finite
input (NaN or inf) raises ``ValueError``. Norms are computed scaled by the
largest entry, so points up to the largest finite float are handled.

Pyro's ``Radial`` uses the same parameters (``x0``, ``alpha_prime``,
``beta_prime``), so the two agree on the forward map and the log-determinant;
Pyro's cannot invert a point it did not produce itself.

References:

[1] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with
    Normalizing Flows. ICML 2015. arXiv:1505.05770
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform, ParameterFn, resolve
from pyro_nflows.validation import check_finite, check_input_dim

__all__ = [
    "ConditionalRadial",
    "ConditionedRadial",
    "Radial",
    "conditional_radial",
    "radial",
]


def _norm(z: torch.Tensor) -> torch.Tensor:
    """``||z[..., :]||`` keeping the last dimension, scaled by the largest entry so it cannot overflow."""
    scale = z.abs().amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    return scale * torch.linalg.vector_norm(z / scale, dim=-1, keepdim=True)


class ConditionedRadial(FlowTransform):
    r"""A radial flow with given parameters,

    .. math:: y = x + \beta h (x - x_0), \quad h = \frac{1}{\alpha + \|x - x_0\|},
              \quad \alpha = \operatorname{softplus}(\alpha'),
              \quad \beta = -\alpha + \operatorname{softplus}(\beta'),

    a bijection of :math:`\mathbb{R}^D` (:math:`\beta > -\alpha`) with a
    closed-form inverse valid for any finite point. See
    :mod:`pyro_nflows.transforms.radial_flow` for the formulas.

    :param input_dim: the event size :math:`D`.
    :param x0: the centre :math:`x_0`, shape ``(..., D)``, or a callable returning it.
    :param alpha_prime: :math:`\alpha'`, shape ``(..., 1)``, or a callable.
    :param beta_prime: :math:`\beta'`, shape ``(..., 1)``, or a callable.

    Batch dimensions of the parameters broadcast against those of ``x``.
    """

    def __init__(self, input_dim: int, x0=None, alpha_prime=None, beta_prime=None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.x0 = x0
        self.alpha_prime = alpha_prime
        self.beta_prime = beta_prime

    def constrained_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""``(x0, alpha, gamma)`` with :math:`\alpha > 0` and :math:`\gamma = \alpha + \beta > 0`."""
        alpha_prime = resolve(self.alpha_prime)
        tiny = torch.finfo(alpha_prime.dtype).tiny
        alpha = F.softplus(alpha_prime).clamp_min(tiny)
        gamma = F.softplus(resolve(self.beta_prime)).clamp_min(tiny)
        return resolve(self.x0), alpha, gamma

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        x0, alpha, gamma = self.constrained_parameters()
        diff = x - x0
        return x + (gamma - alpha) / (alpha + _norm(diff)) * diff

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        who = f"{type(self).__name__} inverse"
        check_finite(y, who)
        x0, alpha, gamma = self.constrained_parameters()
        check_finite(x0, who, "parameter x0")
        diff = y - x0
        rho = _norm(diff)
        p = gamma - rho
        tiny = torch.finfo(rho.dtype).tiny
        # clamp: keeps the gradient of the square root finite at y = x0.
        q = torch.hypot(p, 2 * torch.sqrt((alpha * rho).clamp_min(tiny)))
        positive = p > 0
        r = torch.where(positive, 2 * alpha * rho / torch.where(positive, p + q, 1.0), 0.5 * q - 0.5 * p)
        return x0 + diff * ((alpha + r) / (gamma + r))

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x0, alpha, gamma = self.constrained_parameters()
        r = _norm(x - x0)
        # log((gamma + r) / (alpha + r)) and log((r (r + 2 alpha) + alpha gamma) / (alpha + r)^2),
        # as log1p of small ratios: no overflow of r^2, and accurate far from x0.
        shift = alpha + r
        tangential = torch.log1p((gamma - alpha) / shift)
        radial_factor = torch.log1p(alpha * (gamma - alpha) / shift / shift)
        log_det = (self.input_dim - 1) * tangential + radial_factor
        return log_det.squeeze(-1)


class Radial(ConditionedRadial, TransformModule):
    r"""A learnable radial flow (Rezende & Mohamed 2015 [1]),

    .. math:: y = x + \beta h(\alpha, r)(x - x_0), \qquad h = \frac{1}{\alpha + r},
              \qquad r = \|x - x_0\|,

    with :math:`\alpha > 0` and :math:`\beta > -\alpha` for any values of the
    parameters ``x0`` (:math:`D` numbers), ``alpha_prime`` and ``beta_prime``
    (one each), all initialised uniformly in :math:`\pm 1/\sqrt D`. Unlike
    Pyro's, its inverse works for every point (closed form, one pass), so it
    can score data as well as its own samples.

    Example::

        >>> import pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow = dist.TransformedDistribution(base, [Radial(2) for _ in range(4)])
        >>> flow.log_prob(torch.tensor([[3.0, -1.0]])).shape  # data it did not sample
        torch.Size([1])

    Reference: [1] in :mod:`pyro_nflows.transforms.radial_flow` (arXiv:1505.05770).
    """

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(input_dim, cache_size=cache_size)
        bound = 1.0 / math.sqrt(input_dim)
        self.x0 = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.alpha_prime = nn.Parameter(torch.empty(1).uniform_(-bound, bound))
        self.beta_prime = nn.Parameter(torch.empty(1).uniform_(-bound, bound))


class ConditionalRadial(ConditionalFlow):
    r"""A radial flow whose :math:`x_0, \alpha', \beta'` an MLP computes from a
    context (an amortized posterior); ``condition(c)`` returns a
    :class:`ConditionedRadial` with parameters of batch shape ``c.shape[:-1]``,
    which broadcast against ``x``'s batch.
    """

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None):
        super().__init__(input_dim, context_dim, [(input_dim,), (1,), (1,)], hidden_dims)

    def _condition(self, x0: ParameterFn, alpha_prime: ParameterFn, beta_prime: ParameterFn) -> ConditionedRadial:
        return ConditionedRadial(self.input_dim, x0, alpha_prime, beta_prime)


def radial(input_dim: int) -> Radial:
    """A learnable radial flow on vectors of size ``input_dim``, invertible everywhere in closed form."""
    return Radial(input_dim)


def conditional_radial(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalRadial:
    """A radial flow whose parameters an MLP computes from a context of width ``context_dim``."""
    return ConditionalRadial(input_dim, context_dim, hidden_dims)
