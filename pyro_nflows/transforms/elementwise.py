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

References:

[1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
[2] Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural
    Spline Flows. arXiv:1906.04032
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from pyro_nflows.transforms.base import FlowTransform
from pyro_nflows.transforms.splines import rational_quadratic_spline
from pyro_nflows.validation import check_count, check_input_dim, check_positive

__all__ = [
    "ActNorm",
    "ElementwiseAffine",
    "ElementwiseSpline",
    "actnorm",
    "elementwise_affine",
    "elementwise_spline",
]


class ElementwiseAffine(FlowTransform, TransformModule):
    r"""A learnable per-coordinate scale and shift,

    .. math:: y = e^{s} \odot x + t, \qquad \log|\det J| = \sum_i s_i,

    starting at the identity. Inverse: :math:`x = e^{-s} \odot (y - t)`.

    Example::

        >>> t = ElementwiseAffine(3)
        >>> t(torch.ones(3))
        tensor([1., 1., 1.], grad_fn=<AddBackward0>)
    """

    sign = +1

    def __init__(self, input_dim: int, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.log_scale = nn.Parameter(torch.zeros(input_dim))
        self.shift = nn.Parameter(torch.zeros(input_dim))

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_scale.exp() + self.shift

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.shift) * torch.exp(-self.log_scale)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.log_scale.sum().to(x.dtype).expand(x.shape[:-1])


class ActNorm(ElementwiseAffine):
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
        self.register_buffer("initialized", torch.tensor(False))
        # A Python copy of the flag, so that a call does not read the buffer
        # (on a GPU, reading it would wait for the device at every call).
        self._known_initialized = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = bool(self.initialized)

    def _ensure_initialized(self, batch: torch.Tensor, direction: str) -> None:
        if not self._known_initialized:
            if not self.initialized:
                self.initialize(batch, direction)
            self._known_initialized = True

    @torch.no_grad()
    def initialize(self, data: torch.Tensor, direction: str = "forward") -> None:
        """Set scale and shift so that ``data`` mapped in ``direction``
        (``"forward"`` or ``"inverse"``) has zero mean and unit variance."""
        self._check(data, "initialisation batch")
        points = data.reshape(-1, self.input_dim)
        if points.shape[0] < 2:
            raise ValueError(
                "ActNorm is initialised from the first batch that passes through it and "
                f"needs at least 2 points, got a tensor of shape {tuple(data.shape)}; "
                "pass a batch first, or call initialize(data) with a batch"
            )
        mean, std = points.mean(0), points.std(0)
        constant = torch.nonzero(std == 0).flatten().tolist()
        if constant:
            raise ValueError(
                f"ActNorm cannot initialise from a batch in which coordinates {constant} "
                "are constant (their scale would be infinite)"
            )
        if direction == "forward":  # y = e^s x + t standardised: e^s = 1/std, t = -mean/std
            self.log_scale.copy_(-std.log())
            self.shift.copy_(-mean / std)
        elif direction == "inverse":  # x = e^{-s} (y - t) standardised: e^s = std, t = mean
            self.log_scale.copy_(std.log())
            self.shift.copy_(mean)
        else:
            raise ValueError(f"direction must be 'forward' or 'inverse', got {direction!r}")
        self.initialized.fill_(True)
        self._known_initialized = True

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_initialized(x, "forward")
        return super()._call(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._ensure_initialized(y, "inverse")
        return super()._inverse(y)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, initialized={bool(self.initialized)}"


class ElementwiseSpline(FlowTransform, TransformModule):
    r"""A learnable monotonic rational-quadratic spline per coordinate
    (Durkan et al. [2]): :math:`K` bins on :math:`[-B, B]`, the identity
    outside, with slope 1 where the two meet. Starts at the identity.

    :math:`\log|\det J| = \sum_i \log f_i'(x_i)`; the inverse solves one
    quadratic per coordinate, the same cost as the forward pass.

    :param input_dim: the event size :math:`D`.
    :param count_bins: the number of bins :math:`K`.
    :param bound: the half-width :math:`B` of the interval the spline covers.
    """

    sign = +1

    def __init__(self, input_dim: int, count_bins: int = 8, bound: float = 3.0, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_input_dim(input_dim)
        self.count_bins = check_count("count_bins", count_bins, minimum=2)
        self.bound = check_positive("bound", bound)
        self.widths = nn.Parameter(torch.zeros(input_dim, count_bins))
        self.heights = nn.Parameter(torch.zeros(input_dim, count_bins))
        self.derivatives = nn.Parameter(torch.zeros(input_dim, count_bins - 1))

    def _spline(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return rational_quadratic_spline(
            x, self.widths, self.heights, self.derivatives, bound=self.bound, inverse=inverse
        )

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._spline(x, inverse=False)[0]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._spline(y, inverse=True)[0]

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._spline(x, inverse=False)[1].sum(-1)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, count_bins={self.count_bins}, bound={self.bound}"


def elementwise_affine(input_dim: int) -> ElementwiseAffine:
    """A learnable per-coordinate scale and shift, starting at the identity."""
    return ElementwiseAffine(input_dim)


def actnorm(input_dim: int) -> ActNorm:
    """Glow's activation normalisation: an affine layer initialised from the first batch."""
    return ActNorm(input_dim)


def elementwise_spline(input_dim: int, count_bins: int = 8, bound: float = 3.0) -> ElementwiseSpline:
    """A learnable rational-quadratic spline per coordinate on ``[-bound, bound]``."""
    return ElementwiseSpline(input_dim, count_bins=count_bins, bound=bound)
