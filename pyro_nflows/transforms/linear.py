r"""Linear flows: :math:`y = W x (+ b)` with a structured, invertible :math:`W`.

========================  ==============================================  =================
class                     :math:`W`                                       :math:`\log|\det W|`
========================  ==============================================  =================
TriangularLinear          :math:`L`, unit lower triangular (LinIAF)       0
ConvexTriangularLinear    :math:`\sum_k y_k L_k`, :math:`y` on the        0
                          simplex (ccLinIAF)
Householder               :math:`H_K \cdots H_1`, reflections             0
LULinear                  :math:`P L U`                                   :math:`\sum_i \log u_{ii}`
QRLinear                  :math:`Q R`, :math:`Q` a product of             :math:`\sum_i \log r_{ii}`
                          reflections
========================  ==============================================  =================

Every inverse is exact: a triangular solve (:math:`O(D^2)` per point) or the
transpose of an orthogonal matrix.

Products of reflections (``Householder``, the :math:`Q` of ``QRLinear``)
are applied by :func:`~pyro_nflows.transforms.matrices.reflect`: two matrix
products and a :math:`K \times K` triangular solve, whatever the number
:math:`K` of reflections.

References:

[1] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    Householder Flow. arXiv:1611.09630
[2] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    convex combination linear Inverse Autoregressive Flow. arXiv:1706.02326
[3] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
[4] Emiel Hoogeboom, Rianne van den Berg, Max Welling. Emerging Convolutions
    for Generative Normalizing Flows. arXiv:1901.11137
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform, ParameterFn, resolve
from pyro_nflows.transforms.matrices import (
    LUParametrized,
    QRParametrized,
    count_off_diagonal,
    fill_triangle,
    matvec,
    reflect,
    triangular_solve,
)
from pyro_nflows.validation import check_count, check_input_dim

__all__ = [
    "ConditionalConvexTriangularLinear",
    "ConditionalHouseholder",
    "ConditionalTriangularLinear",
    "ConditionedConvexTriangularLinear",
    "ConditionedHouseholder",
    "ConditionedTriangularLinear",
    "ConvexTriangularLinear",
    "Householder",
    "LULinear",
    "QRLinear",
    "TriangularLinear",
    "conditional_convex_triangular_linear",
    "conditional_householder",
    "conditional_triangular_linear",
    "convex_triangular_linear",
    "householder",
    "lu_linear",
    "qr_linear",
    "triangular_linear",
]


def _zero_log_det(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(x.shape[:-1])


# ---------------------------------------------------------------------------
# Products of Householder reflections
# ---------------------------------------------------------------------------


class ConditionedHouseholder(FlowTransform):
    r"""A product of :math:`K` Householder reflections,

    .. math:: y = H_K \cdots H_1 x, \qquad H_k = I - 2 \frac{v_k v_k^\top}{\|v_k\|^2},

    an orthogonal map (volume preserving, :math:`\log|\det| = 0`), applied by
    :func:`reflect` in two matrix products whatever :math:`K` is. The inverse
    is the transpose, at the same cost.

    :param input_dim: the event size :math:`D`.
    :param vectors: the reflection vectors, a tensor of shape ``(..., K, D)``
        or a callable returning one.

    Reference: [1] in :mod:`pyro_nflows.transforms.linear`.
    """

    volume_preserving = True

    def __init__(self, input_dim: int, vectors=None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.vectors = vectors

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return reflect(x, resolve(self.vectors))

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return reflect(y, resolve(self.vectors), inverse=True)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _zero_log_det(x)


class Householder(ConditionedHouseholder, TransformModule):
    r"""Learnable product of ``count_transforms`` Householder reflections
    (Tomczak & Welling 2016).

    .. math:: y = H_K \cdots H_1 x, \qquad H_k = I - 2 \frac{v_k v_k^\top}{\|v_k\|^2}

    With :math:`K = D` reflections it can reach any orthogonal matrix, so
    ``Householder`` after a diagonal Gaussian gives a full-covariance
    Gaussian. Forward and inverse cost two ``(B, D) x (D, K)`` matrix products
    (Pyro's ``Householder`` makes :math:`K` sequential passes instead).

    Example::

        >>> import pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(4), torch.ones(4)).to_event(1)
        >>> flow = dist.TransformedDistribution(base, [Householder(4, count_transforms=3)])
        >>> flow.sample((2,)).shape
        torch.Size([2, 4])
    """

    def __init__(self, input_dim: int, count_transforms: int = 1, cache_size: int = 1):
        super().__init__(input_dim, cache_size=cache_size)
        count_transforms = check_count("count_transforms", count_transforms)
        bound = 1.0 / math.sqrt(input_dim)
        self.vectors = nn.Parameter(torch.empty(count_transforms, input_dim).uniform_(-bound, bound))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count_transforms={self.vectors.shape[0]}"


class ConditionalHouseholder(ConditionalFlow):
    r"""Householder reflections whose vectors come from a context:
    :math:`v_{1..K} = \mathrm{MLP}(c)`, as in the Householder-flow VAE, where
    :math:`c` is the encoder's last hidden layer. ``condition(c)`` returns a
    :class:`ConditionedHouseholder`.
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        count_transforms: int = 1,
    ):
        count_transforms = check_count("count_transforms", count_transforms)
        super().__init__(input_dim, context_dim, [(count_transforms, input_dim)], hidden_dims)
        self.count_transforms = count_transforms

    def _condition(self, vectors: ParameterFn) -> ConditionedHouseholder:
        return ConditionedHouseholder(self.input_dim, vectors)


def householder(input_dim: int, count_transforms: int | None = None) -> Householder:
    """``count_transforms`` learnable Householder reflections of ``input_dim``
    vectors; by default ``input_dim // 2 + 1``, as Pyro's ``householder``."""
    if count_transforms is None:
        count_transforms = check_input_dim(input_dim) // 2 + 1
    return Householder(input_dim, count_transforms=count_transforms)


def conditional_householder(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    count_transforms: int = 1,
) -> ConditionalHouseholder:
    """Householder reflections whose vectors an MLP computes from a context
    (the arguments of Pyro's ``conditional_householder``)."""
    return ConditionalHouseholder(input_dim, context_dim, hidden_dims, count_transforms)


# ---------------------------------------------------------------------------
# Unit lower triangular maps: LinIAF and ccLinIAF
# ---------------------------------------------------------------------------


class ConditionedTriangularLinear(FlowTransform):
    r"""LinIAF: :math:`y = L x` with :math:`L` unit lower triangular.

    Volume preserving (:math:`\det L = 1`); the inverse is a forward
    substitution, :math:`O(D^2)` per point. Each :math:`y_i` depends on
    :math:`x_{1..i}` only, so the map is autoregressive.

    :param input_dim: the event size :math:`D`.
    :param entries: the :math:`D(D-1)/2` strictly lower entries of :math:`L`
        in the order of ``torch.tril_indices(D, D, -1)``, shape ``(..., D(D-1)/2)``,
        or a callable returning them.
    """

    volume_preserving = True
    autoregressive = True
    sign = +1  # unit lower triangular: y_i = x_i + terms in the x_j, j < i

    def __init__(self, input_dim: int, entries=None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.entries = entries

    def strictly_lower_entries(self) -> torch.Tensor:
        return resolve(self.entries)

    def matrix(self) -> torch.Tensor:
        """The matrix :math:`L`, shape ``(..., D, D)``."""
        entries = self.strictly_lower_entries()
        return fill_triangle(entries, self.input_dim, -1, entries.new_ones(()))

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return matvec(self.matrix(), x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return triangular_solve(self.matrix(), y, upper=False, unitriangular=True)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _zero_log_det(x)


class TriangularLinear(ConditionedTriangularLinear, TransformModule):
    r"""Learnable LinIAF, :math:`y = L x`, :math:`L` unit lower triangular,
    initialised to the identity (Tomczak & Welling 2017).

    Example::

        >>> t = TriangularLinear(3)
        >>> t.matrix()
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]], grad_fn=<AddBackward0>)
    """

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(input_dim, cache_size=cache_size)
        self.entries = nn.Parameter(torch.zeros(count_off_diagonal(input_dim)))


class ConditionalTriangularLinear(ConditionalFlow):
    """LinIAF whose lower triangle an MLP computes from a context; ``condition(c)``
    returns a :class:`ConditionedTriangularLinear`."""

    def __init__(self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None):
        super().__init__(input_dim, context_dim, [(count_off_diagonal(input_dim),)], hidden_dims)

    def _condition(self, entries: ParameterFn) -> ConditionedTriangularLinear:
        return ConditionedTriangularLinear(self.input_dim, entries)


class ConditionedConvexTriangularLinear(ConditionedTriangularLinear):
    r"""ccLinIAF: :math:`y = \big(\sum_{k=1}^K w_k L_k\big) x`, each :math:`L_k`
    unit lower triangular, :math:`w = \operatorname{softmax}(a)` on the simplex.

    A convex combination of unit lower triangular matrices is one itself, so
    this is a :class:`ConditionedTriangularLinear` whose strictly lower part is
    :math:`\sum_k w_k \operatorname{tril}(L_k, -1)`: volume preserving, inverse
    by forward substitution.

    :param input_dim: the event size :math:`D`.
    :param components: strictly lower entries of each :math:`L_k`, shape
        ``(..., K, D(D-1)/2)``, or a callable.
    :param logits: the unnormalised weights :math:`a`, shape ``(..., K)``, or a callable.
    """

    def __init__(self, input_dim: int, components=None, logits=None, cache_size: int = 1):
        super().__init__(input_dim, cache_size=cache_size)
        self.components = components
        self.logits = logits

    def weights(self) -> torch.Tensor:
        """The convex weights :math:`w`, shape ``(..., K)``."""
        return torch.softmax(resolve(self.logits), dim=-1)

    def strictly_lower_entries(self) -> torch.Tensor:
        return (self.weights().unsqueeze(-1) * resolve(self.components)).sum(-2)


def check_count_matrices(count_matrices: int) -> int:
    """``count_matrices`` of a ccLinIAF, checked: an integer >= 2 (also used by ``AutoConvexTriangular``)."""
    if count_matrices == 1:
        raise ValueError(
            "count_matrices must be >= 2 for a convex combination (one matrix has no "
            "weights to learn); use triangular_linear for a single unit lower triangular matrix"
        )
    return check_count("count_matrices", count_matrices, minimum=2)


class ConvexTriangularLinear(ConditionedConvexTriangularLinear, TransformModule):
    r"""Learnable ccLinIAF with ``count_matrices`` matrices :math:`L_k`
    (Tomczak & Welling 2017). The :math:`L_k` start near the identity, at
    different small random values, with equal weights.
    """

    def __init__(self, input_dim: int, count_matrices: int = 3, cache_size: int = 1):
        super().__init__(input_dim, cache_size=cache_size)
        count_matrices = check_count_matrices(count_matrices)
        self.components = nn.Parameter(
            0.01 * torch.randn(count_matrices, count_off_diagonal(input_dim))
        )
        self.logits = nn.Parameter(torch.zeros(count_matrices))


class ConditionalConvexTriangularLinear(ConditionalFlow):
    """ccLinIAF whose matrices :math:`L_k` and weights an MLP computes from a
    context, as the encoder does in the ccLinIAF VAE; ``condition(c)`` returns a
    :class:`ConditionedConvexTriangularLinear`."""

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        count_matrices: int = 3,
        hidden_dims: Sequence[int] | None = None,
    ):
        count_matrices = check_count_matrices(count_matrices)
        shapes = [(count_matrices, count_off_diagonal(input_dim)), (count_matrices,)]
        super().__init__(input_dim, context_dim, shapes, hidden_dims)
        self.count_matrices = count_matrices

    def _condition(self, components: ParameterFn, logits: ParameterFn) -> ConditionedConvexTriangularLinear:
        return ConditionedConvexTriangularLinear(self.input_dim, components, logits)


def triangular_linear(input_dim: int) -> TriangularLinear:
    """LinIAF: a learnable unit lower triangular matrix, starting at the identity."""
    return TriangularLinear(input_dim)


def conditional_triangular_linear(
    input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalTriangularLinear:
    """LinIAF whose matrix an MLP computes from a context."""
    return ConditionalTriangularLinear(input_dim, context_dim, hidden_dims)


def convex_triangular_linear(input_dim: int, count_matrices: int = 3) -> ConvexTriangularLinear:
    """ccLinIAF: a learnable convex combination of ``count_matrices`` unit lower triangular matrices."""
    return ConvexTriangularLinear(input_dim, count_matrices)


def conditional_convex_triangular_linear(
    input_dim: int,
    context_dim: int,
    count_matrices: int = 3,
    hidden_dims: Sequence[int] | None = None,
) -> ConditionalConvexTriangularLinear:
    """ccLinIAF whose matrices and convex weights an MLP computes from a context."""
    return ConditionalConvexTriangularLinear(input_dim, context_dim, count_matrices, hidden_dims)


# ---------------------------------------------------------------------------
# Full-rank affine maps: LU and QR
# ---------------------------------------------------------------------------


class LULinear(LUParametrized, FlowTransform, TransformModule):
    r"""A learnable invertible affine map in LU form (Glow [3]),

    .. math:: y = P L U x + b, \qquad \log|\det| = \sum_i \log u_{ii},

    with :math:`P` a fixed random permutation, :math:`L` unit lower triangular,
    :math:`U` upper triangular with diagonal :math:`u_{ii} = e^{s_i} > 0`
    (the parametrisation of :class:`~pyro_nflows.transforms.matrices.LUParametrized`,
    shared with the 1x1 convolution). Starts at :math:`W = P`. Inverse: two
    triangular solves, :math:`O(D^2)` per point.
    """

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self._init_lu(input_dim)
        self.bias = nn.Parameter(torch.zeros(input_dim))

    def matrix(self) -> torch.Tensor:
        """The matrix :math:`W = P L U`."""
        return self.lu_matrix()

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return matvec(self.matrix(), x) + self.bias

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        lower, upper = self.lu_factors()
        z = (y - self.bias)[..., self.inverse_permutation]
        z = triangular_solve(lower, z, upper=False, unitriangular=True)
        return triangular_solve(upper, z, upper=True)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lu_log_abs_det().to(x.dtype).expand(x.shape[:-1])


class QRLinear(QRParametrized, FlowTransform, TransformModule):
    r"""A learnable invertible affine map in QR form (Hoogeboom et al. [4]),

    .. math:: y = Q R x + b, \qquad \log|\det| = \sum_i \log r_{ii},

    with :math:`Q = H_K \cdots H_1` a product of ``count_transforms``
    Householder reflections (applied by :func:`reflect`, the machinery of
    :class:`Householder`) and :math:`R` upper triangular with diagonal
    :math:`r_{ii} = e^{s_i} > 0` (the parametrisation of
    :class:`~pyro_nflows.transforms.matrices.QRParametrized`, shared with the
    1x1 convolution). With :math:`K = D` (the default) :math:`Q`
    can be any rotation. Starts at a random orthogonal :math:`Q`, :math:`R = I`.
    Inverse: :math:`Q^\top` then a triangular solve, :math:`O(D^2)` per point.
    """

    def __init__(self, input_dim: int, count_transforms: int | None = None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        count = input_dim if count_transforms is None else check_count("count_transforms", count_transforms)
        self._init_qr(input_dim, count)
        self.bias = nn.Parameter(torch.zeros(input_dim))

    def upper(self) -> torch.Tensor:
        """The matrix :math:`R`."""
        return self.qr_upper()

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return reflect(matvec(self.upper(), x), self.vectors) + self.bias

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        z = reflect(y - self.bias, self.vectors, inverse=True)
        return triangular_solve(self.upper(), z, upper=True)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.qr_log_abs_det().to(x.dtype).expand(x.shape[:-1])

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count_transforms={self.vectors.shape[0]}"


def lu_linear(input_dim: int) -> LULinear:
    """A learnable invertible affine map ``P L U x + b``, starting at a random permutation."""
    return LULinear(input_dim)


def qr_linear(input_dim: int, count_transforms: int | None = None) -> QRLinear:
    """A learnable invertible affine map ``Q R x + b``; ``Q`` a product of
    ``count_transforms`` (default ``input_dim``) reflections."""
    return QRLinear(input_dim, count_transforms)
