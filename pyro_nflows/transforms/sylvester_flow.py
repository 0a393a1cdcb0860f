r"""Sylvester flows (van den Berg et al. [1]): a planar flow with :math:`M`
hidden units instead of one,

.. math::

    y = x + Q R \tanh(\tilde R Q^\top x + b),

with :math:`Q \in \mathbb{R}^{D \times M}` of orthonormal columns,
:math:`R, \tilde R` upper triangular :math:`M \times M` and
:math:`b \in \mathbb{R}^M`. By Sylvester's determinant identity and
:math:`Q^\top Q = I`,

.. math::

    \det \frac{\partial y}{\partial x}
    = \det\big(I_M + \operatorname{diag}(h') \tilde R R\big)
    = \prod_{i=1}^M \big(1 + R_{ii} \tilde R_{ii}\, h'(a_i)\big),
    \qquad a = \tilde R Q^\top x + b,\; h' = \tanh',

since :math:`\operatorname{diag}(h') \tilde R R` is upper triangular. We set
:math:`R_{ii} = \tanh(\rho_i)` and :math:`\tilde R_{ii} = \tanh(\tilde\rho_i)`,
so :math:`R_{ii} \tilde R_{ii} \in (-1, 1)`; as :math:`0 < h' \le 1` every
factor is positive and the map is a bijection of :math:`\mathbb{R}^D`.

Three ways to get :math:`Q` (``kind``):

- ``"orthogonal"``: :math:`M` = ``count_ortho_vectors`` :math:`\le D` columns,
  from a free :math:`D \times M` matrix made orthonormal (to rounding level)
  by the iteration :math:`Q \leftarrow Q(I + \tfrac12(I - Q^\top Q))` [1, 2]
  (:func:`orthogonalise`).
- ``"householder"``: :math:`Q = H_K \cdots H_1`, ``count_transforms``
  reflections [3], :math:`M = D`, applied by
  :func:`~pyro_nflows.transforms.matrices.reflect` without forming :math:`Q`.
- ``"triangular"``: :math:`Q` the identity, or the reversal permutation with
  ``reverse=True``, :math:`M = D`; a stack alternates the two (the registry
  does so for ``"sylvester:N(kind=triangular)"``), so that the triangular
  Jacobians of successive layers point different ways.

**Why not Pyro's.** :class:`pyro.distributions.transforms.Sylvester` computes
(with row vectors) :math:`y = x + \tanh(x \tilde R Q^\top + b)\, Q R`, i.e.
:math:`y = x + R^\top Q^\top \tanh(p)` with :math:`p = Q \tilde R^\top x + b`
for column vectors, and returns :math:`\sum_i \log(1 + R_{ii}\tilde R_{ii}
h'(p_i))`: the log-determinant that the map above has at a point of
pre-activation :math:`p`, not that of its own map, which is
:math:`\log\det(I + \operatorname{diag}(h'(p))\, Q \tilde R^\top R^\top Q^\top)`.
The two agree when :math:`Q = I` and nearly agree at Pyro's initialisation
(:math:`R, \tilde R \approx 0`), not once the parameters have moved
(measured: benchmarks/README.md#pyro-sylvester-log-det). It also has no
inverse. The
flows here compute the map above, its exact log-determinant, and invert it.

**Inverse.** Write :math:`w = Q^\top y`. Since :math:`Q^\top Q = I`, the part
of :math:`x` orthogonal to the columns of :math:`Q` is left unchanged and
:math:`z = Q^\top x` solves the :math:`M`-dimensional system

.. math:: F(z) = z + R \tanh(\tilde R z + b) - w = 0,

whose Jacobian :math:`I + R \operatorname{diag}(h') \tilde R` is upper
triangular. So it is solved by back-substitution: for :math:`i = M, \dots, 1`,
given :math:`z_{>i}`,

.. math::

    z_i + R_{ii} \tanh(\tilde R_{ii} z_i + c_i) = w_i - \sum_{j > i} R_{ij} \tanh(a_j),
    \qquad c_i = b_i + \sum_{j > i} \tilde R_{ij} z_j,

one increasing scalar equation (slope :math:`\ge 1 - |R_{ii}\tilde R_{ii}| > 0`)
whose root lies within :math:`|R_{ii}| < 1` of the right-hand side (tanh is
bounded): :func:`~pyro_nflows.transforms.roots.monotone_root` solves it, for the
whole batch at once, by bracketed Newton. Then :math:`x = y - Q R \tanh(\tilde
R z + b)`. The root finding runs without autograd; one Newton step on the full
system with autograd on (a triangular solve) follows, which polishes the root
to rounding level and gives exact implicit-function-theorem gradients,
:math:`\partial z = -J^{-1} \partial F`.

Cost of the inverse: :math:`M` *sequential* scalar solves, each a vectorised
bracketed Newton iteration over the batch (to :math:`10^{-12}` relative in
float64, :math:`10^{-6}` in float32; quadratic convergence, so a few
function evaluations), then the Newton step, a back-substitution without
forming the :math:`M \times M` Jacobian. That is :math:`O(M^2)` arithmetic
per point but :math:`O(M)` small sequential passes over the batch, against a
few matrix products for the forward (measured:
benchmarks/README.md#sylvester-inverse-cost). Float64 round trips are at
rounding level (:math:`\sim 10^{-15}`); near-singular layers
(:math:`R_{ii}\tilde R_{ii} \to -1`) lose what their condition number says,
as any inverse must.

References:

[1] Rianne van den Berg, Leonard Hasenclever, Jakub M. Tomczak, Max Welling.
    Sylvester Normalizing Flows for Variational Inference. UAI 2018.
    arXiv:1803.05649
[2] Åke Björck, Clazett Bowie. An iterative algorithm for computing the best
    estimate of an orthogonal matrix. SIAM J. Numer. Anal. 8(2), 1971.
[3] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    Householder Flow. arXiv:1611.09630
[4] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with
    Normalizing Flows. arXiv:1505.05770
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform, ParameterFn, resolve
from pyro_nflows.transforms.matrices import count_off_diagonal, fill_triangle, matvec, reflect
from pyro_nflows.transforms.roots import monotone_root
from pyro_nflows.validation import check_bool, check_count, check_finite, check_input_dim

__all__ = [
    "KINDS",
    "ConditionalSylvester",
    "ConditionedSylvester",
    "OrthogonalisationNotConverged",
    "Sylvester",
    "conditional_sylvester",
    "orthogonalise",
    "sylvester",
]

KINDS = ("orthogonal", "householder", "triangular")


class OrthogonalisationNotConverged(ArithmeticError):
    """The iterative orthogonalisation of a Sylvester flow's :math:`Q` did not reach rounding level."""


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _tanh_derivative(a: torch.Tensor) -> torch.Tensor:
    r""":math:`\tanh'(a) = 1 - \tanh^2 a = 4 e^{-2|a|} / (1 + e^{-2|a|})^2`, without
    the cancellation of ``1 - tanh(a)**2`` (or the overflow of ``cosh``) at large :math:`|a|`."""
    e = torch.exp(-2 * a.abs())
    return 4 * e / (1 + e) ** 2


def _orthogonality_tolerance(rows: int, dtype: torch.dtype) -> float:
    # The iteration stalls at a defect of a few eps (measured:
    # benchmarks/README.md#sylvester-orthogonality); the margin keeps the test
    # at rounding level for any size.
    return 8 * math.sqrt(rows) * torch.finfo(dtype).eps


def orthogonalise(matrix: torch.Tensor, max_iterations: int = 100) -> torch.Tensor:
    r"""The orthonormal-column matrix nearest to ``matrix`` (its polar factor),
    by the iteration of Björck & Bowie [2] used in [1],

    .. math:: Q_{k+1} = Q_k \big(I + \tfrac12 (I - Q_k^\top Q_k)\big),

    started from :math:`Q_0 = A / s` with :math:`s^2 = \|A^\top A\|_\infty \ge
    \|A\|_2^2`, so that every singular value of :math:`Q_0` lies in
    :math:`(0, 1]`, where the iteration converges (each step maps a singular
    value :math:`\sigma` to :math:`\sigma(3 - \sigma^2)/2`: quadratically near
    1, by a factor 1.5 while small, so about :math:`\log_{1.5}\kappa(A) + 5`
    steps). It stops once :math:`\max|Q^\top Q - I|` is at rounding level for the
    dtype (the log-determinant of a Sylvester flow assumes exact
    orthonormality). Differentiable (autograd goes through the iterations).

    :param matrix: shape ``(..., D, M)`` with ``M <= D``; each matrix of the
        batch should have full column rank.
    :raises OrthogonalisationNotConverged: if the defect is still above rounding
        level after ``max_iterations`` (columns (nearly) linearly dependent).
    :raises ValueError: if ``matrix`` has non-finite entries.
    """
    rows, cols = matrix.shape[-2:]
    if cols > rows:
        raise ValueError(f"orthogonalise needs a matrix with at most as many columns as rows, got {rows} x {cols}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("the matrix to orthogonalise (Q of a Sylvester flow) has non-finite entries")
    eye = torch.eye(cols, dtype=matrix.dtype, device=matrix.device)
    gram = matrix.mT @ matrix
    # Max row sum of |A^T A| bounds ||A||_2^2 (and equals 1 for orthonormal
    # columns); the limit does not depend on the scale, so it carries no gradient.
    scale = gram.detach().abs().sum(-1).amax(-1).sqrt()
    q = matrix / scale[..., None, None]
    tolerance = _orthogonality_tolerance(rows, matrix.dtype)
    defect_size = math.inf
    for _ in range(max_iterations + 1):
        defect = eye - q.mT @ q
        defect_size = defect.detach().abs().max().item()
        if defect_size <= tolerance:
            return q
        q = q + 0.5 * (q @ defect)
    raise OrthogonalisationNotConverged(
        f"the orthogonalisation of Q did not converge in {max_iterations} iterations "
        f"(max |Q^T Q - I| = {defect_size:.3g}, tolerance {tolerance:.3g}); the columns of "
        "Q's free matrix are (nearly) linearly dependent"
    )


def _resolve_kind(kind: str | None, count_transforms: int | None) -> str:
    """``kind``, or without one ``"householder"`` when a number of reflections
    is given (Pyro's ``sylvester(D, K)``) and ``"orthogonal"`` otherwise."""
    if kind is None:
        return "orthogonal" if count_transforms is None else "householder"
    return kind


def _check_options(
    input_dim: int, kind: str, count_ortho_vectors: int | None, count_transforms: int | None, reverse: bool
) -> tuple[int, int | None]:
    """Validate the hyper-parameters; return ``(M, K)``: hidden units and reflections (or None)."""
    input_dim = check_input_dim(input_dim)
    if kind not in KINDS:
        raise ValueError(f"unknown Sylvester kind {kind!r}; known kinds: {', '.join(map(repr, KINDS))}")
    check_bool("reverse", reverse)
    if reverse and kind != "triangular":
        raise ValueError(
            f"reverse=True applies only to kind='triangular' (Q the reversal permutation), not kind={kind!r}"
        )
    if count_ortho_vectors is not None and kind != "orthogonal":
        raise ValueError(f"count_ortho_vectors applies only to kind='orthogonal', not kind={kind!r}")
    if count_transforms is not None and kind != "householder":
        raise ValueError(f"count_transforms applies only to kind='householder', not kind={kind!r}")
    if kind == "orthogonal":
        if count_ortho_vectors is None:
            return (input_dim + 1) // 2, None
        if isinstance(count_ortho_vectors, bool) or not isinstance(count_ortho_vectors, int) or not (
            1 <= count_ortho_vectors <= input_dim
        ):
            raise ValueError(
                f"count_ortho_vectors must be an integer in 1..input_dim = 1..{input_dim}, got {count_ortho_vectors!r}"
            )
        return count_ortho_vectors, None
    if kind == "householder":
        count = input_dim if count_transforms is None else check_count("count_transforms", count_transforms)
        return input_dim, count
    return input_dim, None


# ---------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------


class ConditionedSylvester(FlowTransform):
    r"""A Sylvester flow [1] with given parameters,

    .. math::

        y = x + Q R \tanh(\tilde R Q^\top x + b), \qquad
        \log|\det J| = \sum_{i=1}^M \log\big(1 + R_{ii}\tilde R_{ii} \tanh'(a_i)\big),
        \quad a = \tilde R Q^\top x + b,

    with :math:`R_{ii} = \tanh(\rho_i)`, :math:`\tilde R_{ii} = \tanh(\tilde\rho_i)`.
    See :mod:`pyro_nflows.transforms.sylvester_flow` for the maths and the inverse
    (numerical: back-substitution of :math:`M` increasing scalar equations, then
    one Newton step; float64 round trips at rounding level).

    Every parameter is a tensor or a callable returning one; batch dimensions
    of the parameters broadcast against those of ``x``.

    :param input_dim: the event size :math:`D`.
    :param kind: ``"orthogonal"``, ``"householder"`` or ``"triangular"``.
    :param q: the free parameters of :math:`Q`: a ``(..., D, M)`` matrix that
        :func:`orthogonalise` makes orthonormal (``"orthogonal"``), or
        ``(..., K, D)`` reflection vectors (``"householder"``); ignored for
        ``"triangular"``.
    :param r_entries: strictly upper entries of :math:`R`, shape
        ``(..., M(M-1)/2)``, in the order of ``torch.triu_indices(M, M, 1)``.
    :param r_diagonal: :math:`\rho`, shape ``(..., M)``.
    :param r_tilde_entries: strictly upper entries of :math:`\tilde R`.
    :param r_tilde_diagonal: :math:`\tilde\rho`, shape ``(..., M)``.
    :param bias: :math:`b`, shape ``(..., M)``.
    :param reverse: ``"triangular"`` only: :math:`Q` reverses the coordinates.
    """

    def __init__(
        self,
        input_dim: int,
        kind: str = "orthogonal",
        q=None,
        r_entries=None,
        r_diagonal=None,
        r_tilde_entries=None,
        r_tilde_diagonal=None,
        bias=None,
        reverse: bool = False,
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        _check_options(input_dim, kind, None, None, reverse)
        self.kind = kind
        self.reverse = reverse
        self.q = q
        self.r_entries = r_entries
        self.r_diagonal = r_diagonal
        self.r_tilde_entries = r_tilde_entries
        self.r_tilde_diagonal = r_tilde_diagonal
        self.bias = bias

    # -- parameters -----------------------------------------------------------

    def orthonormal_matrix(self) -> torch.Tensor:
        """:math:`Q` as a ``(..., D, M)`` matrix, for inspection: the transform
        itself applies the reflections or the permutation without forming it."""
        if self.kind == "orthogonal":
            return orthogonalise(resolve(self.q))
        dtype = resolve(self.bias).dtype
        eye = torch.eye(self.input_dim, dtype=dtype, device=resolve(self.bias).device)
        if self.kind == "householder":
            vectors = resolve(self.q)
            if vectors.dim() > 2:  # a batch of products: one identity per batch element
                vectors = vectors.unsqueeze(-3)
            return reflect(eye, vectors).mT
        return eye.flip(-1) if self.reverse else eye

    def upper_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`R` and :math:`\tilde R`, each ``(..., M, M)`` upper triangular."""
        r_diagonal = resolve(self.r_diagonal)
        r_tilde_diagonal = resolve(self.r_tilde_diagonal)
        size = r_diagonal.shape[-1]
        r = fill_triangle(resolve(self.r_entries), size, 1, torch.tanh(r_diagonal))
        r_tilde = fill_triangle(resolve(self.r_tilde_entries), size, 1, torch.tanh(r_tilde_diagonal))
        return r, r_tilde

    def _q_maps(self):
        r"""``(project, lift)``: :math:`x \mapsto Q^\top x` and :math:`v \mapsto Q v`, row-wise."""
        if self.kind == "orthogonal":
            q = orthogonalise(resolve(self.q))
            return (lambda x: matvec(q.mT, x)), (lambda v: matvec(q, v))
        if self.kind == "householder":
            vectors = resolve(self.q)
            # reflect(x, V) applies H_K ... H_1 = Q; inverse=True applies Q^T.
            return (lambda x: reflect(x, vectors, inverse=True)), (lambda v: reflect(v, vectors))
        if self.reverse:
            return (lambda x: x.flip(-1)), (lambda v: v.flip(-1))
        return (lambda x: x), (lambda v: v)

    # -- forward ----------------------------------------------------------------

    def _call_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One pass for both: Q (an orthogonalisation, for kind="orthogonal")
        # and the pre-activation are shared, and a sampled point's log q then
        # costs nothing more (the log-determinant is handed to the next
        # log_abs_det_jacobian; FlowTransform derives _call and
        # log_abs_det_jacobian from this method).
        project, lift = self._q_maps()
        r, r_tilde = self.upper_factors()
        pre = matvec(r_tilde, project(x)) + resolve(self.bias)
        y = x + lift(matvec(r, torch.tanh(pre)))
        diagonal = torch.tanh(resolve(self.r_diagonal)) * torch.tanh(resolve(self.r_tilde_diagonal))
        # Each factor is 1 + (something in (-1, 1)) * (something in (0, 1]) > 0.
        return y, torch.log1p(diagonal * _tanh_derivative(pre)).sum(-1)

    # -- inverse ----------------------------------------------------------------

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_finite(y, f"{type(self).__name__} inverse")
        project, lift = self._q_maps()
        r, r_tilde = self.upper_factors()
        bias = resolve(self.bias)
        w = project(y)
        z0 = _back_substitute(w.detach(), r.detach(), r_tilde.detach(), bias.detach(), type(self).__name__)
        # One Newton step on F(z) = z + R tanh(R~ z + b) - w with autograd on:
        # at the root it changes z by rounding only, and its derivative is the
        # implicit-function-theorem one, dz = -J^{-1} dF (z0 carries no graph).
        pre = matvec(r_tilde, z0) + bias
        residual = z0 + matvec(r, torch.tanh(pre)) - w
        z = z0 - _newton_step(residual, r, r_tilde, _tanh_derivative(pre))
        return y - lift(matvec(r, torch.tanh(matvec(r_tilde, z) + bias)))

    def extra_repr(self) -> str:
        extra = f", reverse={self.reverse}" if self.kind == "triangular" else ""
        return f"input_dim={self.input_dim}, kind={self.kind!r}{extra}"


def _newton_step(residual: torch.Tensor, r: torch.Tensor, r_tilde: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    r"""Solve :math:`(I + R \operatorname{diag}(s) \tilde R)\, \delta = F` (upper
    triangular) by back-substitution without forming the matrix: :math:`O(M^2)`
    per point instead of the :math:`O(M^3)` of building it, differentiable.

    With :math:`u = \tilde R \delta` and :math:`p_i = \sum_{j>i} \tilde R_{ij}\delta_j`,
    row :math:`i` reads :math:`\delta_i (1 + R_{ii} s_i \tilde R_{ii}) = F_i -
    R_{ii} s_i p_i - \sum_{k>i} R_{ik} s_k u_k`.
    """
    size = residual.shape[-1]
    deltas: list[torch.Tensor] = []  # delta_{i+1..M}, in order
    projected: list[torch.Tensor] = []  # u_{i+1..M}
    for i in reversed(range(size)):
        r_slope = r[..., i, i] * slope[..., i]
        if deltas:
            later_delta = torch.stack(deltas, -1)
            later_u = torch.stack(projected, -1)
            partial = (r_tilde[..., i, i + 1 :] * later_delta).sum(-1)
            coupling = (r[..., i, i + 1 :] * slope[..., i + 1 :] * later_u).sum(-1)
            delta = (residual[..., i] - r_slope * partial - coupling) / (1 + r_slope * r_tilde[..., i, i])
            u = r_tilde[..., i, i] * delta + partial
        else:
            delta = residual[..., i] / (1 + r_slope * r_tilde[..., i, i])
            u = r_tilde[..., i, i] * delta
        deltas.insert(0, delta)
        projected.insert(0, u)
    return torch.stack(deltas, -1)


def _back_substitute(
    w: torch.Tensor, r: torch.Tensor, r_tilde: torch.Tensor, bias: torch.Tensor, who: str
) -> torch.Tensor:
    r"""Solve :math:`z + R \tanh(\tilde R z + b) = w` by back-substitution, one
    increasing scalar equation per coordinate, from the last to the first
    (no autograd)."""
    size = w.shape[-1]
    batch = torch.broadcast_shapes(w.shape[:-1], r.shape[:-2], r_tilde.shape[:-2], bias.shape[:-1])
    z = w.new_zeros(batch + (size,))
    activation = w.new_zeros(batch + (size,))  # tanh(a_j) for the coordinates solved so far
    r_diagonal = r.diagonal(dim1=-2, dim2=-1)
    r_tilde_diagonal = r_tilde.diagonal(dim1=-2, dim2=-1)
    with torch.no_grad():
        for i in reversed(range(size)):
            target = w[..., i] - (r[..., i, i + 1 :] * activation[..., i + 1 :]).sum(-1)
            shift = bias[..., i] + (r_tilde[..., i, i + 1 :] * z[..., i + 1 :]).sum(-1)
            r_ii, s_ii = r_diagonal[..., i], r_tilde_diagonal[..., i]
            slope_term = r_ii * s_ii

            def function(t, target=target, shift=shift, r_ii=r_ii, s_ii=s_ii, slope_term=slope_term):
                a = s_ii * t + shift
                return t + r_ii * torch.tanh(a) - target, 1 + slope_term * _tanh_derivative(a)

            # The root is target - R_ii tanh(.), within |R_ii| < 1 of target.
            spread = r_ii.abs()
            root = monotone_root(
                function, target - spread, target + spread, who=f"the inverse of {who} (coordinate {i + 1} of {size})"
            )
            z[..., i] = root
            activation[..., i] = torch.tanh(s_ii * root + shift)
    return z


# ---------------------------------------------------------------------------
# Learnable and conditional versions
# ---------------------------------------------------------------------------


class Sylvester(ConditionedSylvester, TransformModule):
    r"""A learnable Sylvester flow [1],

    .. math:: y = x + Q R \tanh(\tilde R Q^\top x + b),

    with :math:`Q` orthonormal columns (``kind="orthogonal"``, ``M =
    count_ortho_vectors``, default :math:`\lceil D/2 \rceil`), a product of
    ``count_transforms`` reflections (``kind="householder"``, default
    :math:`D`), or the identity / reversal permutation (``kind="triangular"``,
    ``reverse``). Without a ``kind``, giving ``count_transforms`` selects
    ``"householder"`` (Pyro's ``Sylvester(D, K)`` is that flow, with the
    log-determinant made exact, see the module docstring) and otherwise it
    is ``"orthogonal"``; :math:`R, \tilde R` upper triangular with diagonals in
    :math:`(-1, 1)`. Exact log-determinant; numerical inverse (see the module
    docstring for its cost). Starts near the identity map: a random
    orthonormal :math:`Q` (or random reflections), small random :math:`R, \tilde R, b`.

    Example::

        >>> import pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(4), torch.ones(4)).to_event(1)
        >>> layers = [Sylvester(4, kind="triangular", reverse=i % 2 == 1) for i in range(4)]
        >>> flow = dist.TransformedDistribution(base, layers)
        >>> x = flow.sample((2,))
        >>> flow.log_prob(x).shape
        torch.Size([2])
        >>> t = Sylvester(4, kind="householder", cache_size=0)
        >>> y = 3 * torch.randn(5, 4)  # any points, not only the flow's own samples
        >>> torch.allclose(t(t.inv(y)), y, atol=1e-5)
        True
    """

    def __init__(
        self,
        input_dim: int,
        count_transforms: int | None = None,
        *,
        kind: str | None = None,
        count_ortho_vectors: int | None = None,
        reverse: bool = False,
        cache_size: int = 1,
    ):
        kind = _resolve_kind(kind, count_transforms)
        size, count = _check_options(input_dim, kind, count_ortho_vectors, count_transforms, reverse)
        super().__init__(input_dim, kind, reverse=reverse, cache_size=cache_size)
        if kind == "orthogonal":
            # contiguous: Pyro's param store would otherwise register a copy (never trained)
            self.q = nn.Parameter(torch.linalg.qr(torch.randn(input_dim, size)).Q.contiguous())
        elif kind == "householder":
            bound = 1.0 / math.sqrt(input_dim)
            self.q = nn.Parameter(torch.empty(count, input_dim).uniform_(-bound, bound))
        off = count_off_diagonal(size)
        self.r_entries = nn.Parameter(torch.empty(off).uniform_(-0.1, 0.1))
        self.r_diagonal = nn.Parameter(torch.empty(size).uniform_(-0.1, 0.1))
        self.r_tilde_entries = nn.Parameter(torch.empty(off).uniform_(-0.1, 0.1))
        self.r_tilde_diagonal = nn.Parameter(torch.empty(size).uniform_(-0.1, 0.1))
        self.bias = nn.Parameter(torch.empty(size).uniform_(-0.1, 0.1))
        self.num_hidden = size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", M={self.num_hidden}"


class ConditionalSylvester(ConditionalFlow):
    r"""A Sylvester flow whose every parameter an MLP computes from a context,
    as the Sylvester-flow VAE [1] does from the encoder's last hidden layer:
    :math:`(Q_\text{free}, R, \tilde R, b) = \mathrm{MLP}(c)`. ``condition(c)``
    returns a :class:`ConditionedSylvester`; a batch of contexts gives a batch
    of flows that broadcasts against the batch of ``x``.

    For ``kind="orthogonal"`` the free matrix is :math:`E + \mathrm{MLP}(c)`,
    :math:`E` the first :math:`M` columns of the identity, so that it starts
    well conditioned and :func:`orthogonalise` converges in a few steps.

    Example::

        >>> flow = ConditionalSylvester(4, context_dim=3, kind="triangular")
        >>> context = torch.randn(5, 3)  # five contexts, for a batch of x of shape (2, 5, 4)
        >>> flow.condition(context)(torch.randn(2, 5, 4)).shape
        torch.Size([2, 5, 4])
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        count_transforms: int | None = None,
        *,
        kind: str | None = None,
        count_ortho_vectors: int | None = None,
        reverse: bool = False,
    ):
        kind = _resolve_kind(kind, count_transforms)
        size, count = _check_options(input_dim, kind, count_ortho_vectors, count_transforms, reverse)
        shapes = []
        if kind == "orthogonal":
            shapes.append((input_dim, size))
        elif kind == "householder":
            shapes.append((count, input_dim))
        off = count_off_diagonal(size)
        shapes += [(off,), (size,), (off,), (size,), (size,)]
        super().__init__(input_dim, context_dim, shapes, hidden_dims)
        self.kind = kind
        self.reverse = reverse
        self.num_hidden = size

    def _condition(self, *params: ParameterFn) -> ConditionedSylvester:
        q = None
        if self.kind != "triangular":
            q, *params = params
            if self.kind == "orthogonal":
                q = functools.partial(_plus_identity, q)
        r_entries, r_diagonal, r_tilde_entries, r_tilde_diagonal, bias = params
        return ConditionedSylvester(
            self.input_dim,
            self.kind,
            q,
            r_entries,
            r_diagonal,
            r_tilde_entries,
            r_tilde_diagonal,
            bias,
            reverse=self.reverse,
        )

    def extra_repr(self) -> str:
        extra = f", reverse={self.reverse}" if self.kind == "triangular" else ""
        return super().extra_repr() + f", kind={self.kind!r}, M={self.num_hidden}{extra}"


def _plus_identity(free: ParameterFn) -> torch.Tensor:
    """``free() + E``, ``E`` the first columns of the identity (a conditional
    orthogonal Sylvester flow's free matrix)."""
    value = free()
    return value + torch.eye(*value.shape[-2:], dtype=value.dtype, device=value.device)


def sylvester(
    input_dim: int,
    count_transforms: int | None = None,
    *,
    kind: str | None = None,
    count_ortho_vectors: int | None = None,
    reverse: bool = False,
) -> Sylvester:
    """A learnable Sylvester flow ``y = x + Q R tanh(R~ Q^T x + b)``; ``kind`` is
    ``"orthogonal"`` (``count_ortho_vectors`` columns, default ceil(D/2)),
    ``"householder"`` (``count_transforms`` reflections, default D) or
    ``"triangular"`` (``reverse`` picks the reversal permutation). Pyro's
    ``sylvester(D, K)``, ``K`` reflections, is ``sylvester(D, K)`` here too;
    without ``K`` or a ``kind``, the orthogonal kind (Pyro's default is
    ``K = D // 2 + 1`` reflections)."""
    return Sylvester(
        input_dim, count_transforms, kind=kind, count_ortho_vectors=count_ortho_vectors, reverse=reverse
    )


def conditional_sylvester(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    count_transforms: int | None = None,
    *,
    kind: str | None = None,
    count_ortho_vectors: int | None = None,
    reverse: bool = False,
) -> ConditionalSylvester:
    """A Sylvester flow whose parameters an MLP computes from a context (``kind``
    and the counts as in :func:`sylvester`)."""
    return ConditionalSylvester(
        input_dim,
        context_dim,
        hidden_dims,
        count_transforms,
        kind=kind,
        count_ortho_vectors=count_ortho_vectors,
        reverse=reverse,
    )
