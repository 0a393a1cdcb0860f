r"""Structured matrices that several flow families share: triangular fills
and solves, and products of Householder reflections.

A matrix is either shared by the whole batch, shape ``(D, D)``, or has batch
dimensions of its own, shape ``(..., D, D)``, that broadcast against those of
the points ``x`` of shape ``(..., D)``; every helper takes both.

**Products of reflections.** A reflection is
:math:`H_k = I - 2 u_k u_k^\top` with :math:`\|u_k\| = 1`. Applying :math:`K`
of them one after the other (as Pyro's ``Householder`` does) costs :math:`K`
sequential passes over the batch. :func:`reflect` uses the compact "UT" form
of the product [1, 2] instead: with :math:`U = [u_1, \dots, u_K]` and
:math:`S = \operatorname{triu}(U^\top U, 1) + \tfrac12 I`,

.. math:: H_1 H_2 \cdots H_K = I - U S^{-1} U^\top,

so a batch of row vectors is reflected by two matrix products and one
:math:`K \times K` triangular solve, whatever :math:`K` is. The Householder
and QR flows (:mod:`~pyro_nflows.transforms.linear`) and the Sylvester flows
(:mod:`~pyro_nflows.transforms.sylvester_flow`) apply their reflections with it.

**LU and QR parametrisations.** :class:`LUParametrized` and
:class:`QRParametrized` give a module a square invertible matrix with a cheap
:math:`\log|\det|`, :math:`W = P L U` (Glow [3]) or :math:`W = Q R` with
:math:`Q` a product of reflections (Hoogeboom et al. [4]): its parameters,
the matrix, its inverse and its log-determinant, written once for the
affine maps :class:`~pyro_nflows.transforms.linear.LULinear` /
:class:`~pyro_nflows.transforms.linear.QRLinear` and the invertible 1x1
convolution :class:`~pyro_nflows.transforms.conv.Conv1x1`.

References:

[1] Thierry Joffrain, Tze Meng Low, Enrique S. Quintana-Orti, Robert van de
    Geijn, Field G. Van Zee. Accumulating Householder transformations,
    revisited. ACM TOMS 32(2), 2006.
[2] Robert Schreiber, Charles Van Loan. A storage-efficient WY representation
    for products of Householder transformations. SIAM J. Sci. Stat. Comput.
    10(1), 1989.
[3] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
[4] Emiel Hoogeboom, Rianne van den Berg, Max Welling. Emerging Convolutions
    for Generative Normalizing Flows. arXiv:1901.11137
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

__all__ = [
    "LUParametrized",
    "QRParametrized",
    "count_off_diagonal",
    "fill_triangle",
    "matvec",
    "reflect",
    "triangular_solve",
]


def matvec(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` for each vector ``x[..., :]``; one GEMM when the matrix is shared."""
    if matrix.dim() == 2:
        return x @ matrix.mT
    return (matrix @ x.unsqueeze(-1)).squeeze(-1)


def triangular_solve(
    matrix: torch.Tensor, y: torch.Tensor, upper: bool, unitriangular: bool = False
) -> torch.Tensor:
    """Solve ``matrix @ x = y`` for each vector ``y[..., :]``; ``matrix`` triangular."""
    if matrix.dim() == 2:
        flat = y.reshape(-1, y.shape[-1])
        x = torch.linalg.solve_triangular(
            matrix.mT, flat, upper=not upper, left=False, unitriangular=unitriangular
        )
        return x.reshape(y.shape)
    x = torch.linalg.solve_triangular(
        matrix, y.unsqueeze(-1), upper=upper, unitriangular=unitriangular
    )
    return x.squeeze(-1)


@functools.lru_cache(maxsize=64)
def _triangle_indices(size: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of a strict triangle, built once per size and device."""
    make = torch.tril_indices if offset < 0 else torch.triu_indices
    rows, cols = make(size, size, offset, device=device)
    return rows, cols


def fill_triangle(entries: torch.Tensor, size: int, offset: int, diagonal: torch.Tensor) -> torch.Tensor:
    """A ``size x size`` triangular matrix from packed off-diagonal entries.

    ``offset=-1`` fills the strictly lower triangle, ``offset=1`` the strictly
    upper one, in the order of ``torch.tril_indices``/``torch.triu_indices``;
    ``diagonal`` (broadcastable to ``entries.shape[:-1] + (size,)``) goes on the
    diagonal. Batch dimensions of ``entries`` are kept.
    """
    batch = entries.shape[:-1]
    rows, cols = _triangle_indices(size, offset, entries.device)
    matrix = entries.new_zeros(batch + (size, size))
    matrix[..., rows, cols] = entries
    return matrix + torch.diag_embed(diagonal.expand(batch + (size,)))


def count_off_diagonal(size: int) -> int:
    """The number of entries strictly below (or above) the diagonal of a ``size x size`` matrix."""
    return size * (size - 1) // 2


def reflect(x: torch.Tensor, vectors: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    r"""Apply :math:`H_K \cdots H_1` (or, with ``inverse=True``, its inverse
    :math:`H_1 \cdots H_K`) to each vector ``x[..., :]``.

    :param x: points of shape ``(..., D)``.
    :param vectors: reflection vectors :math:`v_1, \dots, v_K` (any non-zero
        length), shape ``(K, D)`` shared by the batch, or ``(..., K, D)`` with
        batch dimensions that broadcast against those of ``x``.

    Uses :math:`H_1 \cdots H_K = I - U S^{-1} U^\top` (see the module
    docstring): two ``(D, K)`` matrix products and a :math:`K \times K`
    triangular solve per point. When the vectors are shared and
    :math:`K \ge D/2`, forming the :math:`D \times D` product once and
    applying it with one matrix product is cheaper, and that is what it does.
    """
    units = vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    gram = units @ units.mT
    count, dim = units.shape[-2:]
    eye = torch.eye(count, dtype=units.dtype, device=units.device)
    s = torch.triu(gram, diagonal=1) + 0.5 * eye
    # Row vectors: forward is x (H_1 ... H_K) = x - (x U) S^{-1} U^T, and the
    # inverse (the transpose) is x - (x U) S^{-T} U^T.
    factor = s.mT if inverse else s
    if units.dim() == 2:
        flat = x.reshape(-1, dim)
        if 2 * count >= dim:
            # M = I - U S^{-1} U^T as a dense matrix (S^{-1} U^T by a triangular solve).
            solved = torch.linalg.solve_triangular(factor, units, upper=not inverse)
            matrix = torch.eye(dim, dtype=units.dtype, device=units.device) - units.mT @ solved
            return (flat @ matrix).reshape(x.shape)
        coefficients = torch.linalg.solve_triangular(
            factor, flat @ units.mT, upper=not inverse, left=False
        )
        return (flat - coefficients @ units).reshape(x.shape)
    coefficients = torch.linalg.solve_triangular(
        factor, x.unsqueeze(-2) @ units.mT, upper=not inverse, left=False
    )
    return x - (coefficients @ units).squeeze(-2)


# ---------------------------------------------------------------------------
# Square invertible matrices with a cheap log-determinant: P L U and Q R
# ---------------------------------------------------------------------------


class LUParametrized:
    r"""A mixin for a module that owns a square matrix in LU form (Glow [3]),

    .. math:: W = P L U, \qquad \log|\det W| = \textstyle\sum_i s_i,

    with :math:`P` a fixed random permutation (buffers ``permutation`` and
    ``inverse_permutation``), :math:`L` unit lower triangular
    (``lower_entries``) and :math:`U` upper triangular (``upper_entries``)
    with diagonal :math:`u_{ii} = e^{s_i} > 0` (``log_diagonal``). It starts
    at :math:`W = P`. Call :meth:`_init_lu` in ``__init__``.
    """

    def _init_lu(self, size: int) -> None:
        """Register the parameters (zeros: :math:`W = P`) and a random permutation."""
        off = count_off_diagonal(size)
        self.lower_entries = nn.Parameter(torch.zeros(off))
        self.upper_entries = nn.Parameter(torch.zeros(off))
        self.log_diagonal = nn.Parameter(torch.zeros(size))
        permutation = torch.randperm(size)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def lu_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The triangular factors :math:`(L, U)`."""
        size = self.log_diagonal.shape[-1]
        lower = fill_triangle(self.lower_entries, size, -1, self.lower_entries.new_ones(()))
        upper = fill_triangle(self.upper_entries, size, 1, self.log_diagonal.exp())
        return lower, upper

    def lu_matrix(self) -> torch.Tensor:
        """The matrix :math:`W = P L U`."""
        lower, upper = self.lu_factors()
        return (lower @ upper)[self.permutation]

    def lu_inverse_matrix(self) -> torch.Tensor:
        r""":math:`W^{-1} = U^{-1} L^{-1} P^\top`, by two triangular solves (:math:`O(D^3)`, once)."""
        lower, upper = self.lu_factors()
        eye = torch.eye(lower.shape[-1], dtype=lower.dtype, device=lower.device)
        inverse = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        inverse = torch.linalg.solve_triangular(upper, inverse, upper=True)
        return inverse[:, self.permutation]

    def lu_log_abs_det(self) -> torch.Tensor:
        r""":math:`\log|\det W| = \sum_i s_i`."""
        return self.log_diagonal.sum()


class QRParametrized:
    r"""A mixin for a module that owns a square matrix in QR form (Hoogeboom et al. [4]),

    .. math:: W = Q R, \qquad \log|\det W| = \textstyle\sum_i s_i,

    with :math:`Q = H_K \cdots H_1` a product of :math:`K` Householder
    reflections (``vectors``, applied by :func:`reflect`) and :math:`R`
    upper triangular (``upper_entries``) with diagonal :math:`r_{ii} = e^{s_i} > 0`
    (``log_diagonal``). With :math:`K = D` reflections :math:`Q` can be any
    rotation. It starts at a random orthogonal :math:`Q` and :math:`R = I`.
    Call :meth:`_init_qr` in ``__init__``.
    """

    def _init_qr(self, size: int, count: int) -> None:
        """Register ``count`` random reflection vectors and :math:`R = I`."""
        bound = 1.0 / math.sqrt(size)
        self.vectors = nn.Parameter(torch.empty(count, size).uniform_(-bound, bound))
        self.upper_entries = nn.Parameter(torch.zeros(count_off_diagonal(size)))
        self.log_diagonal = nn.Parameter(torch.zeros(size))

    def qr_upper(self) -> torch.Tensor:
        """The matrix :math:`R`."""
        return fill_triangle(self.upper_entries, self.log_diagonal.shape[-1], 1, self.log_diagonal.exp())

    def qr_matrix(self) -> torch.Tensor:
        """The matrix :math:`W = Q R` (:func:`reflect` applied to the columns of :math:`R`)."""
        return reflect(self.qr_upper().mT, self.vectors).mT

    def qr_inverse_matrix(self) -> torch.Tensor:
        r""":math:`W^{-1} = R^{-1} Q^\top`: a triangular solve and :func:`reflect` (:math:`O(D^3)`, once)."""
        upper = self.qr_upper()
        eye = torch.eye(upper.shape[-1], dtype=upper.dtype, device=upper.device)
        return reflect(torch.linalg.solve_triangular(upper, eye, upper=True), self.vectors)

    def qr_log_abs_det(self) -> torch.Tensor:
        r""":math:`\log|\det W| = \sum_i s_i`."""
        return self.log_diagonal.sum()
