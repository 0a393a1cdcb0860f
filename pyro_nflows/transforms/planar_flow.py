r"""Planar flows (Rezende & Mohamed [1]), with an inverse for *any* point.

.. math:: y = x + \hat u \tanh(w^\top x + b),
          \qquad \log|\det J| = \log\bigl|1 + \tanh'(w^\top x + b)\, w^\top \hat u\bigr|.

**Invertibility.** The map is a bijection of :math:`\mathbb{R}^D` if and only
if :math:`w^\top \hat u \ge -1`; we keep it strictly above with the
reparametrisation of [1, appendix A.1]: from free parameters :math:`u, w`,

.. math:: \hat u = u + \bigl(m(w^\top u) - w^\top u\bigr) \frac{w}{\|w\|^2},
          \qquad m(a) = -1 + \operatorname{softplus}(a),

so that :math:`w^\top \hat u = m(w^\top u) > -1` for every :math:`u, w`. We
carry the margin :math:`\mu = 1 + w^\top \hat u = \operatorname{softplus}(w^\top u) > 0`
itself (floored at the smallest normal number, so it stays positive even
where softplus underflows), and write the determinant as

.. math:: 1 + \operatorname{sech}^2(s)\, w^\top \hat u = \tanh^2(s) + \mu \operatorname{sech}^2(s),
          \qquad s = w^\top x + b,

a sum of non-negative terms: no cancellation when :math:`w^\top \hat u \approx -1`.
(With :math:`w = 0` the map is the translation :math:`y = x + u \tanh b`.)

**Inverse.** Every output is :math:`y = x + \hat u\, t` for a scalar :math:`t`,
so only :math:`\alpha = w^\top x` is unknown. Taking :math:`w^\top` of both
sides gives the scalar equation

.. math:: f(\alpha) = \alpha + (w^\top \hat u) \tanh(\alpha + b) - w^\top y = 0,

whose slope :math:`f'(\alpha) = \tanh^2(\alpha + b) + \mu\,\operatorname{sech}^2(\alpha + b)`
is positive: :math:`f` is increasing and runs from :math:`-\infty` to
:math:`+\infty`, so there is exactly one root for every :math:`y`. The map is
therefore *onto* :math:`\mathbb{R}^D`: there are no finite points outside its
range. As :math:`|\tanh| < 1`, the root lies in
:math:`[w^\top y - |w^\top \hat u|,\ w^\top y + |w^\top \hat u|]`;
moreover :math:`f'' = (w^\top \hat u) \tanh''(\alpha + b)` changes sign only
at :math:`\alpha = -b`, so one evaluation there tells which side of it holds
the root, and on that side :math:`f` is convex or concave. On such a bracket
Newton's iterates, once past the root, approach it monotonically: it cannot
cycle between the ends of the bracket, which it otherwise does for
:math:`|w^\top \hat u|` of a few units.
:func:`~pyro_nflows.transforms.roots.monotone_root` (bracketed Newton) then
finds the root to :math:`10^{-12}` relative in float64 (:math:`10^{-6}` in
float32), and :math:`x = y - \hat u \tanh(\alpha + b)`.

Cost of the inverse: the solver is vectorised over the batch, one iteration
costing about as much as one forward pass of the layer (a few element-wise
operations per point; the two dot products :math:`w^\top y` and the final
update are done once). Newton converges quadratically, so a few iterations
suffice; a batch stops when its slowest point has converged. Close to the
singular limit :math:`w^\top \hat u \to -1` the equation flattens into a
cubic around :math:`\alpha = -b`, where Newton converges only linearly (and
falls back to bisection when it would leave the bracket), so it takes many
more. There the inverse is also ill-conditioned: the returned :math:`x` maps
back onto :math:`y` to rounding, but is itself only as accurate as
:math:`\epsilon / f'(\alpha)` allows.
:attr:`ConditionedPlanar.last_inverse_iterations` records the count of the
most recent inverse, which ``benchmarks/potentials.py`` reports (measured:
benchmarks/README.md#planar-inverse-iterations). If the solver has not
converged after 100 iterations it raises
:class:`~pyro_nflows.transforms.roots.InverseNotConverged`; a non-finite input
(NaN or inf) raises ``ValueError``. Neither returns a wrong answer silently.

**Gradients through the inverse** (for ``log_prob`` of data): the root is found
without autograd; one more Newton step is then taken with autograd on,
:math:`\alpha = \alpha^* - f(\alpha^*)/f'(\alpha^*)`. At the root
:math:`f(\alpha^*) = 0`, so its derivative is exactly the implicit-function
derivative :math:`\partial\alpha/\partial\theta = -(\partial f/\partial\theta)/f'(\alpha)`
with respect to the parameters and to :math:`y`.

Pyro's ``Planar`` uses the same parameters (``bias``, ``u``, ``w``, the same
:math:`\hat u`), so the two agree on the forward map and the log-determinant;
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
from pyro_nflows.transforms.roots import monotone_root
from pyro_nflows.validation import check_finite, check_input_dim

__all__ = [
    "ConditionalPlanar",
    "ConditionedPlanar",
    "Planar",
    "conditional_planar",
    "planar",
    "planar_parameters",
]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[..., :] . b[..., :]`` with broadcasting, keeping the last dimension (size 1)."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


def planar_parameters(u: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The constrained vector :math:`\hat u` and the margin :math:`\mu = 1 + w^\top \hat u > 0`.

    :param u: free parameter, shape ``(..., D)``.
    :param w: free parameter, shape ``(..., D)``.
    :returns: ``(u_hat, margin)``, of shapes ``(..., D)`` and ``(..., 1)``.

    :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \|w\|^2` with
    :math:`m(a) = -1 + \operatorname{softplus}(a)`, so that
    :math:`w^\top \hat u = \mu - 1` with :math:`\mu = \operatorname{softplus}(w^\top u)`,
    floored at the smallest normal number of the dtype: :math:`\mu > 0`,
    i.e. :math:`w^\top \hat u > -1`, for any ``u`` and ``w``. Where
    :math:`w = 0` (or :math:`\|w\|^2` underflows) :math:`\hat u = u` and :math:`\mu = 1`.
    """
    a = _dot(w, u)
    w_squared = _dot(w, w)
    nonzero = w_squared > 0
    tiny = torch.finfo(u.dtype).tiny
    softplus = F.softplus(a).clamp_min(tiny)
    # m(a) - a = softplus(a) - 1 - a; the `where`s keep gradients finite at w = 0.
    factor = torch.where(nonzero, (softplus - 1 - a) / torch.where(nonzero, w_squared, 1.0), 0.0)
    u_hat = u + factor * w
    margin = torch.where(nonzero, softplus, 1.0)
    return u_hat, margin


class ConditionedPlanar(FlowTransform):
    r"""A planar flow with given parameters,

    .. math:: y = x + \hat u \tanh(w^\top x + b), \qquad
              \log|\det J| = \log\bigl(\tanh^2(s) + (1 + w^\top \hat u)\operatorname{sech}^2(s)\bigr),
              \quad s = w^\top x + b,

    with :math:`w^\top \hat u > -1` enforced (see :func:`planar_parameters`).
    The inverse solves one increasing scalar equation per point by bracketed
    Newton (quadratically convergent; at most 100 iterations, else
    :class:`~pyro_nflows.transforms.roots.InverseNotConverged`) and works for
    any finite point: the map is onto :math:`\mathbb{R}^D`. See
    :mod:`pyro_nflows.transforms.planar_flow` for the derivation.

    :param input_dim: the event size :math:`D`.
    :param u: free parameter :math:`u`, shape ``(..., D)``, or a callable returning it.
    :param w: :math:`w`, shape ``(..., D)``, or a callable.
    :param bias: :math:`b`, shape ``(..., 1)``, or a callable.

    Batch dimensions of the parameters broadcast against those of ``x``.

    .. attribute:: last_inverse_iterations

        Newton iterations taken by the most recent numerical inverse (``None``
        before the first): a diagnostic for benchmarks, nothing depends on it.
    """

    def __init__(self, input_dim: int, u=None, w=None, bias=None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.u = u
        self.w = w
        self.bias = bias
        self.last_inverse_iterations = None

    def constrained_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""``(u_hat, w, bias, margin)``, with ``margin`` :math:`= 1 + w^\top \hat u > 0`."""
        w = resolve(self.w)
        u_hat, margin = planar_parameters(resolve(self.u), w)
        return u_hat, w, resolve(self.bias), margin

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        u_hat, w, bias, _ = self.constrained_parameters()
        return x + u_hat * torch.tanh(_dot(w, x) + bias)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        who = f"{type(self).__name__} inverse"
        check_finite(y, who)
        u_hat, w, bias, margin = self.constrained_parameters()
        for name, value in (("u_hat", u_hat), ("w", w), ("bias", bias)):
            check_finite(value, who, f"parameter {name}")
        scale = margin - 1  # w^T u_hat
        target = _dot(w, y)

        def equation(alpha, scale, bias, margin, target):
            t = torch.tanh(alpha + bias)
            squared = t * t
            return alpha + scale * t - target, squared + margin * (1 - squared)

        # The root is found without autograd, on detached copies.
        constants = tuple(v.detach() for v in (scale, bias, margin, target))
        iterations = 0

        def counted(alpha):
            nonlocal iterations
            iterations += 1
            return equation(alpha, *constants)

        scale0, bias0, _, target0 = constants
        lower, upper = target0 - scale0.abs(), target0 + scale0.abs()
        # f has a single inflection point, alpha = -b; keep the side of the
        # bracket that holds the root, so that f is convex or concave on it
        # and Newton's iterates cannot cycle (see the module docstring).
        inflection = torch.minimum(torch.maximum(-bias0, lower), upper)
        root_below = counted(inflection)[0] >= 0
        lower, upper = torch.where(root_below, lower, inflection), torch.where(root_below, inflection, upper)
        root = monotone_root(counted, lower, upper, who=who)
        self.last_inverse_iterations = iterations
        # One Newton step with autograd on: same value, implicit-function gradients.
        value, slope = equation(root, scale, bias, margin, target)
        alpha = root - value / slope
        return y - u_hat * torch.tanh(alpha + bias)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, w, bias, margin = self.constrained_parameters()
        t = torch.tanh(_dot(w, x) + bias)
        squared = t * t
        return torch.log(squared + margin * (1 - squared)).squeeze(-1)


class Planar(ConditionedPlanar, TransformModule):
    r"""A learnable planar flow (Rezende & Mohamed 2015 [1]),

    .. math:: y = x + \hat u \tanh(w^\top x + b),

    with :math:`w^\top \hat u > -1` for any values of the parameters ``u``,
    ``w`` (each :math:`D` numbers, initialised uniformly in
    :math:`\pm 1/\sqrt D`) and ``bias`` (one number, initialised to 0). Unlike
    Pyro's, its inverse works for every point (one scalar bracketed-Newton
    solve per point), so it can score
    data as well as its own samples; gradients flow through the inverse.

    Example::

        >>> import pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow = dist.TransformedDistribution(base, [Planar(2) for _ in range(4)])
        >>> flow.log_prob(torch.tensor([[3.0, -1.0]])).shape  # data it did not sample
        torch.Size([1])

    Reference: [1] in :mod:`pyro_nflows.transforms.planar_flow` (arXiv:1505.05770).
    """

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(input_dim, cache_size=cache_size)
        bound = 1.0 / math.sqrt(input_dim)
        self.u = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.w = nn.Parameter(torch.empty(input_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(1))


class ConditionalPlanar(ConditionalFlow):
    r"""A planar flow whose :math:`u, w, b` an MLP computes from a context
    (an amortized posterior, as in the planar-flow VAE of [1]);
    ``condition(c)`` returns a :class:`ConditionedPlanar` with parameters of
    batch shape ``c.shape[:-1]``, which broadcast against ``x``'s batch.
    """

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None):
        super().__init__(input_dim, context_dim, [(input_dim,), (input_dim,), (1,)], hidden_dims)

    def _condition(self, u: ParameterFn, w: ParameterFn, bias: ParameterFn) -> ConditionedPlanar:
        return ConditionedPlanar(self.input_dim, u, w, bias)


def planar(input_dim: int) -> Planar:
    """A learnable planar flow on vectors of size ``input_dim``, invertible everywhere."""
    return Planar(input_dim)


def conditional_planar(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalPlanar:
    """A planar flow whose parameters an MLP computes from a context of width ``context_dim``."""
    return ConditionalPlanar(input_dim, context_dim, hidden_dims)
