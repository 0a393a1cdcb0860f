r"""Invertible convolutions for images: events of shape :math:`(C, H, W)`, ``event_dim = 3``.

==========================  ===========================================  ======================================
class                       map :math:`x \mapsto y`                      :math:`\log|\det J|`
==========================  ===========================================  ======================================
Conv1x1                     :math:`y_{hw} = W x_{hw}`, :math:`W = PLU`   :math:`HW \sum_i s_i`
                            or :math:`QR` (Glow [1], [2])
EmergingConv                :math:`K_2 \star (K_1 \star x)`, two         :math:`\pm HW \sum_c s_c`
                            masked convolutions (Hoogeboom et al. [2])
PeriodicConv                :math:`K \circledast x`, circular [2]        :math:`\sum_{u,v} \log|\det \hat K_{uv}|`
==========================  ===========================================  ======================================

Every layer takes tensors of shape ``batch + (C, H, W)`` in float32 or
float64 and returns log-determinants of shape ``batch``; a wrong number of
channels is a ``ValueError`` naming the shape expected
(:class:`~pyro_nflows.transforms.image.ImageTransform`). The other layers of
a multi-scale image flow, and Glow's stack, are in
:mod:`~pyro_nflows.transforms.glow_flow`.

**Directions.** As everywhere in the package, a transform maps the base
(noise) to the data, so a ``TransformedDistribution`` scores data through
the layers' inverses. :class:`Conv1x1` and :class:`PeriodicConv` are cheap
both ways; :class:`EmergingConv`'s convolution is one pass and its inverse
a substitution, so it is named by its cheap direction as the autoregressive
flows are: ``direction="maf"`` (the default) scores data with the
convolution, ``"iaf"`` samples with it.

**Costs**, for :math:`B` images of :math:`C` channels and :math:`H \times W`
pixels (multiply-adds, up to constants):

- :class:`Conv1x1`: :math:`B HW C^2` each way, plus :math:`O(C^3)` once per
  call to form :math:`W` or :math:`W^{-1}` from its factors.
- :class:`EmergingConv`, kernel :math:`d = 2k - 1`: the convolution is two
  :math:`k \times k` convolutions, :math:`2 B HW k^2 C^2`. The inverse has
  the same arithmetic, computed in :math:`2(H + W - 1)` sequential steps
  (for :math:`d \ge 3`) of whole-batch operations (see :func:`_solve_causal`), where a solve
  pixel by pixel takes :math:`2HW`; :math:`H + W - 1` is the longest chain
  of pixels that depend on each other, so no exact substitution takes fewer.
- :class:`PeriodicConv`: forward :math:`B HW d^2 C^2` (a circular
  convolution); inverse two FFTs, :math:`O(B C HW \log HW)`, and one
  :math:`C \times C` product per frequency, :math:`B HW C^2`; the
  log-determinant and the inverse each factor :math:`HW/2` complex
  :math:`C \times C` matrices, :math:`O(HW C^3)`, once per call whatever :math:`B`.

Measurements (speed against Pyro's and nflows' 1x1 convolutions, the
emerging and periodic inverses against their forward) go to
``benchmarks/README.md``.

References:

[1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
[2] Emiel Hoogeboom, Rianne van den Berg, Max Welling. Emerging Convolutions
    for Generative Normalizing Flows. arXiv:1901.11137
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.nn import functional as F

from pyro_nflows.transforms.image import ImageTransform, flatten_batch
from pyro_nflows.transforms.matrices import LUParametrized, QRParametrized
from pyro_nflows.validation import check_count, check_kernel_size

__all__ = ["Conv1x1", "EmergingConv", "PeriodicConv", "conv1x1", "emerging_conv", "periodic_conv"]

def _constant_log_det(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A log-determinant that does not depend on the point, for every image of ``x``."""
    return value.to(x.dtype).expand(x.shape[:-3])


# ---------------------------------------------------------------------------
# The invertible 1x1 convolution
# ---------------------------------------------------------------------------


class Conv1x1(LUParametrized, QRParametrized, ImageTransform, TransformModule):
    r"""Glow's invertible 1x1 convolution [1]: the same :math:`C \times C`
    matrix applied to the channels of every pixel,

    .. math:: y_{:,h,w} = W x_{:,h,w}, \qquad \log|\det J| = H W \log|\det W|,

    with :math:`W` in LU form, :math:`W = P L U` (``decomposition="lu"``,
    Glow's; a fixed random permutation :math:`P`, :math:`L` unit lower and
    :math:`U` upper triangular, :math:`u_{ii} = e^{s_i}`), or in QR form,
    :math:`W = Q R` (``"qr"``, Hoogeboom et al. [2]; :math:`Q` a product of
    ``count_transforms`` reflections, default :math:`C`). Either way
    :math:`\log|\det W| = \sum_i s_i`. The parametrisations are those of
    :class:`~pyro_nflows.transforms.linear.LULinear` and
    :class:`~pyro_nflows.transforms.linear.QRLinear`
    (:class:`~pyro_nflows.transforms.matrices.LUParametrized`,
    :class:`~pyro_nflows.transforms.matrices.QRParametrized`). It starts at a
    random permutation of the channels (LU) or a random rotation (QR).

    Cost: :math:`B HW C^2` each way (the inverse applies :math:`W^{-1}`, formed
    from the factors by triangular solves), plus :math:`O(C^3)` per call. It
    plays the role of Pyro's ``GeneralizedChannelPermute`` (also :math:`PLU`,
    ``event_dim = 3``), without a bias and with ``channels`` required.

    Example::

        >>> layer = conv1x1(3, decomposition="qr")
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = layer(x)
        >>> y.shape, layer.log_abs_det_jacobian(x, y).shape
        (torch.Size([2, 3, 8, 8]), torch.Size([2]))

    References: [1], [2] in :mod:`pyro_nflows.transforms.conv`.
    """

    def __init__(
        self, channels: int, decomposition: str = "lu", count_transforms: int | None = None, cache_size: int = 1
    ):
        super().__init__(channels, cache_size=cache_size)
        if decomposition not in ("lu", "qr"):
            raise ValueError(f"decomposition must be 'lu' (W = P L U) or 'qr' (W = Q R), got {decomposition!r}")
        if decomposition == "lu" and count_transforms is not None:
            raise ValueError("count_transforms counts the reflections of decomposition='qr'; leave it out for 'lu'")
        self.decomposition = decomposition
        if decomposition == "lu":
            self._init_lu(self.channels)
        else:
            count = self.channels if count_transforms is None else check_count("count_transforms", count_transforms)
            self._init_qr(self.channels, count)

    def matrix(self) -> torch.Tensor:
        """The matrix :math:`W`."""
        return self.lu_matrix() if self.decomposition == "lu" else self.qr_matrix()

    def inverse_matrix(self) -> torch.Tensor:
        r"""The matrix :math:`W^{-1}`."""
        return self.lu_inverse_matrix() if self.decomposition == "lu" else self.qr_inverse_matrix()

    @staticmethod
    def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # As a 1 x 1 convolution: torch's convolution kernels beat a batched matrix product here.
        flat, _ = flatten_batch(x)
        return F.conv2d(flat, matrix[..., None, None]).reshape(x.shape)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(self.matrix(), x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._mix(self.inverse_matrix(), y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_det = self.lu_log_abs_det() if self.decomposition == "lu" else self.qr_log_abs_det()
        return _constant_log_det(x.shape[-2] * x.shape[-1] * log_det, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, decomposition={self.decomposition!r}"


# ---------------------------------------------------------------------------
# Emerging convolutions: two masked convolutions, each triangular
# ---------------------------------------------------------------------------


def _causal_conv(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    r""":math:`z_{hw} = \sum_{a, b < k} T_{ab}\, x_{h-a, w-b}` (zero outside the image) for
    ``x`` of shape ``(N, C, H, W)`` and taps :math:`T` of shape ``(C, C, k, k)``."""
    pad = taps.shape[-1] - 1
    return F.conv2d(F.pad(x, (pad, 0, pad, 0)), taps.flip(-2, -1))


def _skew(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` to ``(N, C, H, H + W - 1)``, row ``h`` moved ``h`` places right
    (zeros elsewhere): the anti-diagonals ``h + w = d`` become the columns ``d``."""
    height, width = x.shape[-2:]
    flat = F.pad(x, (0, height)).flatten(-2)[..., : height * (height + width - 1)]
    return flat.reshape(x.shape[:-1] + (height + width - 1,))


def _unskew(x: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of :func:`_skew`."""
    height = x.shape[-2]
    flat = F.pad(x.flatten(-2), (0, height))
    return flat.reshape(x.shape[:-2] + (height, height + width))[..., :width]


def _solve_causal(z: torch.Tensor, taps: torch.Tensor, center_inverse: torch.Tensor) -> torch.Tensor:
    r"""Solve :math:`z = \sum_{a, b < k} T_{ab}\, x_{h-a, w-b}` (:func:`_causal_conv`) for
    :math:`x`, given :math:`T_{00}^{-1}` (``center_inverse``).

    Pixel :math:`(h, w)` depends on the pixels :math:`(h - a, w - b)`,
    :math:`a + b \ge 1`, all on earlier anti-diagonals :math:`h + w`, so the
    pixels of one anti-diagonal are independent of each other and final once
    the earlier ones are. The image is skewed (:func:`_skew`) so that each
    anti-diagonal is a column, and the columns are solved in order, each by
    one matrix product over the whole batch,
    :math:`x_d = T_{00}^{-1} z_d - \sum_{(a, b) \ne 0} T_{00}^{-1} T_{ab}\, x_{d - a - b}`
    (rows shifted by :math:`a`), on the column's pixels only: each pixel is
    computed once, :math:`H + W - 1` steps, the arithmetic of one
    convolution (one step for :math:`k = 1`, where no pixel depends on another).
    """
    count, channels, height, width = z.shape
    size = taps.shape[-1]
    solved = torch.einsum("ij,njhw->nihw", center_inverse, z)
    if size == 1:  # a 1 x 1 kernel: no pixel depends on another, one step
        return solved
    pad = size - 1
    offsets = [(a, b) for a in range(size) for b in range(size) if a + b > 0]
    # T_00^{-1} T_ab side by side, (C, C * len(offsets)): one product per step for all neighbours.
    neighbour_taps = torch.cat([center_inverse @ taps[:, :, a, b] for a, b in offsets], dim=1)
    solved = _skew(solved)
    zero = z.new_zeros(count, channels, height + pad)
    columns = [zero] * (2 * pad)  # column d is columns[d + 2 * pad], padded with `pad` zero rows on top
    for d in range(height + width - 1):
        low, high = max(0, d - width + 1), min(d, height - 1)
        rows = [columns[d + 2 * pad - a - b][..., pad + low - a : pad + high + 1 - a] for a, b in offsets]
        value = solved[..., low : high + 1, d] - neighbour_taps @ torch.cat(rows, dim=1)
        columns.append(F.pad(value, (pad + low, height - 1 - high)))
    return _unskew(torch.stack(columns[2 * pad :], dim=-1)[..., pad:, :], width)


class EmergingConv(ImageTransform, TransformModule):
    r"""An emerging convolution (Hoogeboom et al. [2]): a :math:`d \times d`
    convolution, :math:`d = 2k - 1` (``kernel_size``), made of two masked
    :math:`k \times k` convolutions,

    .. math::

        z_{hw} = \sum_{a,b=0}^{k-1} L_{ab}\, v_{h-a,\,w-b}, \qquad
        u_{hw} = \sum_{a,b=0}^{k-1} U_{ab}\, z_{h+a,\,w+b}

    (zero outside the image): :math:`L` reads the pixels above and to the
    left, :math:`U` those below and to the right, and at the pixel itself
    :math:`L_{00}` is unit lower triangular and :math:`U_{00}` upper
    triangular with diagonal :math:`e^{s_c}`. In the order (row, column,
    channel) the first is a lower and the second an upper triangular
    matrix, so the convolution :math:`u = \mathcal{C}(v)` has
    :math:`\log|\det \mathcal{C}| = H W \sum_c s_c`, and its inverse is two
    substitutions, each by anti-diagonals (:func:`_solve_causal`).

    ``direction="maf"`` (the default, for density estimation): the
    transform's inverse, data to noise, is the convolution,
    :math:`x = \mathcal{C}(y)`, so scoring data costs two
    :math:`k \times k` convolutions and sampling the substitutions.
    ``direction="iaf"``: the forward is the convolution, :math:`y = \mathcal{C}(x)`.

    Cost: the convolution :math:`2 B HW k^2 C^2`; the substitutions the
    same arithmetic in :math:`2(H + W - 1)` sequential steps of whole-batch
    matrix products (the longest chain of dependent pixels; a pixel-by-pixel
    solve takes :math:`2HW`). It starts at the identity.

    Example::

        >>> layer = emerging_conv(2)
        >>> x = torch.randn(5, 2, 6, 6)
        >>> torch.allclose(layer.inv(layer(x).clone()), x, atol=1e-5)
        True

    References: [2] in :mod:`pyro_nflows.transforms.conv`.
    """

    def __init__(self, channels: int, kernel_size: int = 3, direction: str = "maf", cache_size: int = 1):
        super().__init__(channels, cache_size=cache_size)
        self.kernel_size = check_kernel_size(kernel_size)
        if direction not in ("maf", "iaf"):
            raise ValueError(
                "direction must be 'maf' (the inverse, data to noise, is the convolution: density estimation) "
                f"or 'iaf' (the forward is the convolution: sampling), got {direction!r}"
            )
        self.direction = direction
        size = (kernel_size + 1) // 2
        self.lower_weight = nn.Parameter(torch.zeros(channels, channels, size, size))
        self.upper_weight = nn.Parameter(torch.zeros(channels, channels, size, size))
        self.log_diagonal = nn.Parameter(torch.zeros(channels))
        center = torch.zeros(size, size)
        center[0, 0] = 1.0
        lower_mask = (1.0 - center).expand(channels, channels, size, size).clone()
        upper_mask = lower_mask.clone()
        lower_mask[:, :, 0, 0] = torch.ones(channels, channels).tril(-1)
        upper_mask[:, :, 0, 0] = torch.ones(channels, channels).triu(1)
        self.register_buffer("lower_mask", lower_mask, persistent=False)
        self.register_buffer("upper_mask", upper_mask, persistent=False)
        self.register_buffer("center", center, persistent=False)

    def taps(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The masked taps :math:`(L_{ab}, U_{ab})`, each of shape ``(C, C, k, k)``, indexed by the offset."""
        eye = torch.eye(self.channels, dtype=self.log_diagonal.dtype, device=self.log_diagonal.device)
        lower = self.lower_weight * self.lower_mask + eye[..., None, None] * self.center
        upper = self.upper_weight * self.upper_mask + torch.diag(self.log_diagonal.exp())[..., None, None] * self.center
        return lower, upper

    def convolve(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathcal{C}(v)`: the two masked convolutions."""
        lower, upper = self.taps()
        flat, _ = flatten_batch(v)
        z = _causal_conv(flat, lower)
        u = _causal_conv(z.flip(-2, -1), upper).flip(-2, -1)  # U reads below and right: flip, read above and left
        return u.reshape(v.shape)

    def solve(self, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathcal{C}^{-1}(u)`: the two substitutions, :math:`U` then :math:`L`."""
        lower, upper = self.taps()
        eye = torch.eye(self.channels, dtype=lower.dtype, device=lower.device)
        upper_inverse = torch.linalg.solve_triangular(upper[:, :, 0, 0], eye, upper=True)
        lower_inverse = torch.linalg.solve_triangular(lower[:, :, 0, 0], eye, upper=False, unitriangular=True)
        flat, _ = flatten_batch(u)
        z = _solve_causal(flat.flip(-2, -1), upper, upper_inverse).flip(-2, -1)
        return _solve_causal(z, lower, lower_inverse).reshape(u.shape)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x) if self.direction == "iaf" else self.solve(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.solve(y) if self.direction == "iaf" else self.convolve(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_det = x.shape[-2] * x.shape[-1] * self.log_diagonal.sum()
        return _constant_log_det(log_det if self.direction == "iaf" else -log_det, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, direction={self.direction!r}"


# ---------------------------------------------------------------------------
# Periodic convolutions, diagonal in the Fourier domain
# ---------------------------------------------------------------------------


class PeriodicConv(ImageTransform, TransformModule):
    r"""A periodic (circular) :math:`d \times d` convolution (Hoogeboom et al. [2]),

    .. math:: y_{c,h,w} = \sum_{c', i, j} K_{c c' i j}\, x_{c',\, h + i - r,\, w + j - r},
              \qquad r = \lfloor d / 2 \rfloor,

    the pixel indices taken modulo :math:`H` and :math:`W`. The 2-D Fourier
    transform diagonalises it: at each frequency :math:`(u, v)`,
    :math:`\hat y_{uv} = \hat K_{uv} \hat x_{uv}` with :math:`\hat K_{uv}`
    a :math:`C \times C` complex matrix (the conjugate of the FFT of the
    kernel laid on the torus), so

    .. math:: \log|\det J| = \sum_{u, v} \log|\det \hat K_{uv}|, \qquad
              \hat x_{uv} = \hat K_{uv}^{-1} \hat y_{uv}.

    The real FFT holds half the frequencies; the other half are their
    conjugates, with the same :math:`|\det|`, and count twice.

    Cost: forward :math:`B HW d^2 C^2` (a circular convolution; the same
    product in the Fourier domain where the kernel is wider than the image);
    inverse an FFT, a :math:`C \times C` product per frequency and an inverse
    FFT, :math:`O(B C HW \log HW + B HW C^2)`; the log-determinant and the
    inverse also factor the :math:`HW/2` matrices :math:`\hat K_{uv}`,
    :math:`O(HW C^3)` per call, whatever the batch (measured:
    benchmarks/README.md#image-speed). It is invertible where
    no :math:`\hat K_{uv}` is singular; it starts with a random rotation at
    the centre tap and zeros elsewhere (:math:`|\det| = 1`).

    Example::

        >>> layer = periodic_conv(2)
        >>> x = torch.randn(4, 2, 5, 6)
        >>> torch.allclose(layer.inv(layer(x).clone()), x, atol=1e-5)
        True

    References: [2] in :mod:`pyro_nflows.transforms.conv`.
    """

    def __init__(self, channels: int, kernel_size: int = 3, cache_size: int = 1):
        super().__init__(channels, cache_size=cache_size)
        self.kernel_size = check_kernel_size(kernel_size)
        weight = torch.zeros(channels, channels, kernel_size, kernel_size)
        weight[:, :, kernel_size // 2, kernel_size // 2] = torch.linalg.qr(torch.randn(channels, channels)).Q
        self.weight = nn.Parameter(weight)

    def spectrum(self, height: int, width: int) -> torch.Tensor:
        r"""The matrices :math:`\hat K_{uv}`, shape ``(H, W // 2 + 1, C, C)``, complex.

        Summed tap by tap, :math:`\hat K_{uv} = \sum_{i,j} K_{:,:,i,j}\,
        e^{2\pi \mathrm{i}\,(u (i - r) / H + v (j - r) / W)}`: the same as the
        conjugate FFT of the kernel laid on the torus (taps wider than the image
        wrap and add up by themselves), at :math:`O(HW d C^2)` instead of an FFT of
        an :math:`H \times W \times C \times C` array."""
        size, radius = self.kernel_size, self.kernel_size // 2
        offsets = torch.arange(size, device=self.weight.device, dtype=self.weight.dtype) - radius
        rows = _phases(torch.arange(height, device=self.weight.device), offsets, height)  # (H, d)
        cols = _phases(torch.arange(width // 2 + 1, device=self.weight.device), offsets, width)  # (W // 2 + 1, d)
        weight = self.weight.to(rows.dtype)
        by_column = torch.einsum("vb,ijab->vija", cols, weight)  # (W // 2 + 1, C, C, d)
        return torch.einsum("ua,vija->uvij", rows, by_column)

    @staticmethod
    def _to_frequencies(x: torch.Tensor) -> torch.Tensor:
        """``(n, C, H, W)`` images as ``(H, W // 2 + 1, C, n)`` columns, one matrix per frequency."""
        return torch.fft.rfft2(x).permute(2, 3, 1, 0)

    @staticmethod
    def _to_images(columns: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return torch.fft.irfft2(columns.permute(3, 2, 0, 1), s=shape[-2:]).reshape(shape)

    def _multiply(self, matrices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        flat, _ = flatten_batch(x)
        return self._to_images(matrices @ self._to_frequencies(flat), x.shape)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        radius = self.kernel_size // 2
        if radius > min(x.shape[-2:]):
            return self._multiply(self.spectrum(*x.shape[-2:]), x)
        flat, _ = flatten_batch(x)
        return F.conv2d(F.pad(flat, (radius,) * 4, mode="circular"), self.weight).reshape(x.shape)

    def _inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One spectrum serves the solve for the batch's columns (cheaper than forming the
        # inverses) and the log-determinants. Without gradients one LU per frequency serves
        # both too; with them, solve and slogdet, whose backward passes are faster than
        # lu_factor's (benchmarks/README.md#image-speed).
        flat, _ = flatten_batch(y)
        spectrum, columns = self.spectrum(*y.shape[-2:]), self._to_frequencies(flat)
        if torch.is_grad_enabled() and (spectrum.requires_grad or columns.requires_grad):
            solution, log_dets = torch.linalg.solve(spectrum, columns), torch.linalg.slogdet(spectrum).logabsdet
        else:
            factors, pivots = torch.linalg.lu_factor(spectrum)
            solution = torch.linalg.lu_solve(factors, pivots, columns)
            log_dets = factors.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)  # (H, W // 2 + 1)
        return self._to_images(solution, y.shape), self._total_log_det(log_dets, y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        handed_over = self._take_log_det(x, y)  # the inverse that made x computed it
        if handed_over is not None:
            return handed_over
        return self._total_log_det(torch.linalg.slogdet(self.spectrum(*x.shape[-2:])).logabsdet, x)

    @staticmethod
    def _total_log_det(log_dets: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The sum of the per-frequency ``log_dets`` ``(H, W // 2 + 1)`` over the full
        spectrum, as the log-determinant of each of ``x``'s images."""
        # The columns 0 (and W / 2 for an even W) are their own conjugates; the others stand for two.
        counts = torch.full((log_dets.shape[-1],), 2.0, dtype=log_dets.dtype, device=log_dets.device)
        counts[0] = 1.0
        if x.shape[-1] % 2 == 0:
            counts[-1] = 1.0
        return _constant_log_det((log_dets * counts).sum(), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _phases(frequencies: torch.Tensor, offsets: torch.Tensor, period: int) -> torch.Tensor:
    r""":math:`e^{2\pi \mathrm{i} f o / P}` for every frequency :math:`f` (rows) and offset :math:`o` (columns)."""
    angles = (2 * math.pi / period) * frequencies.to(offsets.dtype)[:, None] * offsets[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def conv1x1(channels: int, decomposition: str = "lu", *, count_transforms: int | None = None) -> Conv1x1:
    """Glow's invertible 1x1 convolution, ``W = P L U`` (``"lu"``) or ``Q R`` (``"qr"``, ``count_transforms``
    reflections, default ``channels``)."""
    return Conv1x1(channels, decomposition, count_transforms)


def emerging_conv(channels: int, kernel_size: int = 3, *, direction: str = "maf") -> EmergingConv:
    """An emerging ``kernel_size x kernel_size`` convolution (two masked convolutions); ``direction="maf"``
    scores data with the convolution, ``"iaf"`` samples with it."""
    return EmergingConv(channels, kernel_size, direction)


def periodic_conv(channels: int, kernel_size: int = 3) -> PeriodicConv:
    """A periodic ``kernel_size x kernel_size`` convolution, inverted in the Fourier domain."""
    return PeriodicConv(channels, kernel_size)
