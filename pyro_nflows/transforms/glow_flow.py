r"""Glow's multi-scale image flow (Kingma & Dhariwal [1]): the layers besides
the invertible convolutions (:mod:`~pyro_nflows.transforms.conv`), and the stack.

==========================  ===========================================  ======================================
class                       map :math:`x \mapsto y`                      :math:`\log|\det J|`
==========================  ===========================================  ======================================
ActNorm2d                   :math:`x_c e^{s_c} + t_c` per channel [1]    :math:`HW \sum_c s_c`
Squeeze / Unsqueeze         space-to-depth by 2 / its inverse [2]        0
ConvAffineCoupling          RealNVP's affine coupling with a conv net,   :math:`\sum s` over the transformed part
                            channel or checkerboard mask [2], [1]
ChannelSlice                a transform on the first channels, the       the transform's
                            others passed through (multi-scale)
==========================  ===========================================  ======================================

Events of shape :math:`(C, H, W)`, ``event_dim = 3``, as in
:mod:`~pyro_nflows.transforms.image`. :func:`glow` assembles these layers and
an invertible convolution into the multi-scale flow of [1].

Costs, for :math:`B` images of :math:`C` channels and :math:`H \times W`
pixels: :class:`ActNorm2d` and :class:`Squeeze` :math:`B C HW` each way;
:class:`ConvAffineCoupling` one pass of its network each way.

References:

[1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
[2] Laurent Dinh, Jascha Sohl-Dickstein, Samy Bengio. Density estimation using
    Real NVP. arXiv:1605.08803
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions.transforms import Transform
from torch.nn import functional as F

from pyro_nflows.nn.dense import ContextNet
from pyro_nflows.transforms.base import ConditionalFlow, ParameterFn, resolve
from pyro_nflows.transforms.conv import Conv1x1, EmergingConv, PeriodicConv
from pyro_nflows.transforms.image import ImageTransform
from pyro_nflows.transforms.initialization import ActNormInitialization
from pyro_nflows.transforms.maps import data_affine_map
from pyro_nflows.validation import check_bool, check_count, check_kernel_size

__all__ = [
    "GLOW_CONVS",
    "ActNorm2d",
    "ChannelSlice",
    "ConditionalActNorm2d",
    "ConditionalConvAffineCoupling",
    "ConditionedActNorm2d",
    "ConditionedConvAffineCoupling",
    "ConvAffineCoupling",
    "ConvCouplingNet",
    "Squeeze",
    "Unsqueeze",
    "actnorm2d",
    "conditional_actnorm2d",
    "conditional_conv_affine_coupling",
    "conv_affine_coupling",
    "glow",
    "squeeze",
    "unsqueeze",
]

# The invertible convolutions glow() can put in its steps.
GLOW_CONVS = ("conv1x1_lu", "conv1x1_qr", "emerging", "periodic")


# ---------------------------------------------------------------------------
# Activation normalisation per channel
# ---------------------------------------------------------------------------


class ConditionedActNorm2d(ImageTransform):
    r"""A scale and shift per channel with given parameters,

    .. math:: y_{c,h,w} = x_{c,h,w}\, e^{s_c} + t_c, \qquad \log|\det J| = H W \sum_c s_c;

    inverse :math:`x = (y - t) e^{-s}`, the same cost, :math:`B C HW`.

    :param channels: :math:`C`.
    :param log_scale: :math:`s`, shape ``(..., C)``, or a callable returning it.
    :param shift: :math:`t`, shape ``(..., C)``, or a callable.
    """

    def __init__(self, channels: int, log_scale=None, shift=None, cache_size: int = 1):
        super().__init__(channels, cache_size=cache_size)
        self.log_scale = log_scale
        self.shift = shift

    def _parameters_per_pixel(self) -> tuple[torch.Tensor, torch.Tensor]:
        return resolve(self.log_scale)[..., None, None], resolve(self.shift)[..., None, None]

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        log_scale, shift = self._parameters_per_pixel()
        return torch.addcmul(shift, x, log_scale.exp())

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        log_scale, shift = self._parameters_per_pixel()
        return (y - shift) * torch.exp(-log_scale)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_det = x.shape[-2] * x.shape[-1] * resolve(self.log_scale).to(x.dtype).sum(-1)
        return log_det.expand(torch.broadcast_shapes(x.shape[:-3], log_det.shape))


class ActNorm2d(ActNormInitialization, ConditionedActNorm2d, TransformModule):
    r"""Glow's activation normalisation [1]: a learnable scale and shift per
    channel, :math:`y = x e^{s_c} + t_c`, set by the first batch that passes
    through it, in either direction, so that this batch comes out with zero
    mean and unit variance per channel (over images and pixels); afterwards
    ordinary parameters. The initialisation is
    :class:`~pyro_nflows.transforms.elementwise.ActNorm`'s
    (:class:`~pyro_nflows.transforms.initialization.ActNormInitialization`): its
    flag is a buffer that travels with ``state_dict``, and
    :meth:`initialize` sets it from chosen data.

    Cost: :math:`B C HW` each way. :math:`\log|\det J| = H W \sum_c s_c`.

    Example::

        >>> layer = actnorm2d(3)
        >>> y = layer.inv(5 + 2 * torch.randn(16, 3, 4, 4))  # scoring data initialises it
        >>> bool(y.mean().abs() < 1e-5), bool((y.std() - 1).abs() < 1e-2)
        (True, True)

    References: [1] in :mod:`pyro_nflows.transforms.conv`.
    """

    _initialization_unit = "channels"

    def __init__(self, channels: int, cache_size: int = 1):
        super().__init__(channels, cache_size=cache_size)
        self.log_scale = nn.Parameter(torch.zeros(self.channels))
        self.shift = nn.Parameter(torch.zeros(self.channels))
        self._init_initialization()

    def _initialization_points(self, data: torch.Tensor) -> torch.Tensor:
        return data.movedim(-3, -1).reshape(-1, self.channels)  # every pixel of every image, per channel

    def extra_repr(self) -> str:
        return f"channels={self.channels}, initialized={bool(self.initialized)}"


def _zero_last_layer(net: ContextNet) -> ContextNet:
    """``net`` with its output layer at zero (the flow it drives starts at the identity)."""
    last = net.net if isinstance(net.net, nn.Linear) else net.net.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return net


class ConditionalActNorm2d(ConditionalFlow):
    r"""A scale and shift per channel that an MLP computes from a context
    vector (a class label's embedding, say), :math:`(s, t) = \mathrm{MLP}(c)`;
    ``condition(c)`` returns a :class:`ConditionedActNorm2d`. The MLP's last
    layer starts at zero, so the layer starts at the identity (there is no
    data-dependent initialisation: the scale depends on the context).

    :param channels: :math:`C`.
    :param context_dim: the context's width.
    :param hidden_dims: the MLP's hidden widths (default:
        :func:`~pyro_nflows.nn.default_hidden_dims`).
    """

    def __init__(self, channels: int, context_dim: int, hidden_dims: Sequence[int] | None = None):
        channels = check_count("channels", channels)
        super().__init__(channels, context_dim, [(channels,), (channels,)], hidden_dims)
        self.channels = channels
        _zero_last_layer(self.net)

    def _condition(self, log_scale: ParameterFn, shift: ParameterFn) -> ConditionedActNorm2d:
        return ConditionedActNorm2d(self.channels, log_scale, shift)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, context_dim={self.context_dim}"


# ---------------------------------------------------------------------------
# Squeezing: space to depth and back
# ---------------------------------------------------------------------------


def _space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """``(..., C, H, W)`` to ``(..., 4C, H/2, W/2)``: channel ``4c + 2i + j`` holds the
    pixels ``(2h + i, 2w + j)`` of channel ``c``."""
    *batch, channels, height, width = x.shape
    blocks = x.reshape(*batch, channels, height // 2, 2, width // 2, 2)
    n = len(batch)
    blocks = blocks.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)
    return blocks.reshape(*batch, 4 * channels, height // 2, width // 2)


def _depth_to_space(y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_space_to_depth`."""
    *batch, depth, height, width = y.shape
    blocks = y.reshape(*batch, depth // 4, 2, 2, height, width)
    n = len(batch)
    blocks = blocks.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)
    return blocks.reshape(*batch, depth // 4, 2 * height, 2 * width)


def _event(shape: Sequence[int], who: str) -> tuple[int, int, int]:
    if len(shape) < 3:
        raise ValueError(f"{who} takes image events (..., C, H, W), got the shape {tuple(shape)}")
    return tuple(shape[-3:])


def _squeezed_shape(shape: Sequence[int], who: str) -> torch.Size:
    channels, height, width = _event(shape, who)
    if height % 2 or width % 2:
        raise ValueError(f"{who} needs an even height and width, got an image of shape {tuple(shape[-3:])}")
    return torch.Size((*shape[:-3], 4 * channels, height // 2, width // 2))


def _unsqueezed_shape(shape: Sequence[int], who: str) -> torch.Size:
    channels, height, width = _event(shape, who)
    if channels % 4:
        raise ValueError(f"{who} needs a multiple of 4 channels, got an image of shape {tuple(shape[-3:])}")
    return torch.Size((*shape[:-3], channels // 4, 2 * height, 2 * width))


class Squeeze(ImageTransform, TransformModule):
    r"""RealNVP's squeeze [3]: space to depth by a factor 2,
    :math:`(C, H, W) \to (4C, H/2, W/2)`, each :math:`2 \times 2` block of
    pixels of a channel becoming 4 channels of one pixel,
    :math:`y_{4c + 2i + j,\, h,\, w} = x_{c,\, 2h + i,\, 2w + j}`. A
    permutation: volume preserving, the inverse (:class:`Unsqueeze`) at the
    same cost, one copy, :math:`B C HW`.

    :param channels: the input's channel count, or ``None`` for any. ``H``
        and ``W`` must be even (``ValueError`` otherwise).

    Example::

        >>> squeeze()(torch.randn(2, 3, 4, 6)).shape
        torch.Size([2, 12, 2, 3])

    References: [3] in :mod:`pyro_nflows.transforms.conv`.
    """

    volume_preserving = True
    even_input = True
    _deep_side = "output"  # the side with 4C channels

    def __init__(self, channels: int | None = None, cache_size: int = 1):
        out_channels = None if channels is None else 4 * check_count("channels", channels)
        super().__init__(channels, out_channels, cache_size=cache_size)

    def _check(self, x: torch.Tensor, what: str) -> None:
        super()._check(x, what)
        side = "output" if what == "output" else "input"
        if side == self._deep_side and x.shape[-3] % 4:
            raise ValueError(
                f"{type(self).__name__} expects {what}s of shape (..., 4C, H, W) (a multiple of 4 channels), "
                f"got a tensor of shape {tuple(x.shape)}"
            )

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return _space_to_depth(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return _depth_to_space(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._zero_log_det(x)

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        return _squeezed_shape(shape, type(self).__name__)

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        return _unsqueezed_shape(shape, type(self).__name__)


class Unsqueeze(Squeeze):
    r"""The inverse of :class:`Squeeze`, depth to space:
    :math:`(4C, H, W) \to (C, 2H, 2W)`. Volume preserving, one copy.

    :param channels: the input's channel count (a multiple of 4), or ``None`` for any multiple of 4.

    Example::

        >>> unsqueeze()(torch.randn(2, 12, 2, 3)).shape
        torch.Size([2, 3, 4, 6])
    """

    even_input = False
    even_output = True
    _deep_side = "input"

    def __init__(self, channels: int | None = None, cache_size: int = 1):
        if channels is not None and check_count("channels", channels) % 4:
            raise ValueError(f"Unsqueeze takes a multiple of 4 channels (4 become 1), got channels={channels}")
        ImageTransform.__init__(self, channels, None if channels is None else channels // 4, cache_size=cache_size)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return _depth_to_space(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return _space_to_depth(y)

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        return _unsqueezed_shape(shape, type(self).__name__)

    def inverse_shape(self, shape: Sequence[int]) -> torch.Size:
        return _squeezed_shape(shape, type(self).__name__)


# ---------------------------------------------------------------------------
# Affine coupling with a convolutional network
# ---------------------------------------------------------------------------

MASKS = ("channel", "checkerboard")


def _coupling_channels(channels: int, mask: str) -> tuple[int, int]:
    """The network's input and output channels for a coupling of ``channels`` channels."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if mask == "checkerboard":
        return channels, 2 * channels
    if channels < 2:
        raise ValueError(
            f"a channel mask needs at least 2 channels (one part kept, one transformed), got channels={channels}; "
            "use mask='checkerboard', or squeeze first"
        )
    kept = channels // 2
    return kept, 2 * (channels - kept)


class ConvCouplingNet(nn.Module):
    r"""The network of a convolutional coupling (Glow's [1]): a
    :math:`k \times k` convolution, ReLU, a 1x1 convolution, ReLU, a
    :math:`k \times k` convolution whose weights and bias start at zero (so
    the coupling starts at the identity), zero padding, sizes kept. Given a
    context vector, a linear map of it is added to the first layer's output
    at every pixel.

    ``forward(x, context=None)`` takes ``x`` of shape ``batch + (C_in, H, W)``
    and a context of shape ``batch' + (context_dim,)`` whose batch shape
    broadcasts against ``batch``, and returns ``batch'' + (C_out, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        context_dim: int | None = None,
        kernel_size: int = 3,
    ):
        super().__init__()
        hidden_channels = check_count("hidden_channels", hidden_channels)
        padding = check_kernel_size(kernel_size) // 2
        self.first = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=padding)
        self.middle = nn.Conv2d(hidden_channels, hidden_channels, 1)
        self.last = nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=padding)
        with torch.no_grad():
            self.last.weight.zero_()
            self.last.bias.zero_()
        self.context = None
        if context_dim is not None:
            self.context = nn.Linear(check_count("context_dim", context_dim), hidden_channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[:-3]
        if context is not None:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
        flat = x.expand(batch + x.shape[-3:]).reshape((-1,) + x.shape[-3:])
        hidden = self.first(flat)
        if context is not None:
            term = self.context(context).expand(batch + (hidden.shape[1],))
            hidden = hidden + term.reshape(-1, hidden.shape[1], 1, 1)
        out = self.last(F.relu(self.middle(F.relu(hidden))))
        return out.reshape(batch + out.shape[1:])


def _checkerboard(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """1 on the pixels ``(h, w)`` with ``(h + w) % 2 == parity``, 0 elsewhere, shape ``(H, W)``."""
    rows = torch.arange(height, device=like.device)[:, None]
    cols = torch.arange(width, device=like.device)[None, :]
    return ((rows + cols) % 2 == parity).to(like.dtype)


class ConditionedConvAffineCoupling(ImageTransform):
    r"""RealNVP's affine coupling on images [3] with a given network.

    The image is split by a mask into a kept part :math:`x_a` and a
    transformed part :math:`x_b`; the network reads the kept part and
    returns :math:`(\tilde s, t)` for the transformed one, which goes
    through :func:`~pyro_nflows.transforms.maps.data_affine_map`
    (the affine map of :class:`~pyro_nflows.transforms.coupling.AffineCoupling`),

    .. math:: y_a = x_a, \qquad y_b = (x_b - t) \odot e^{s}, \qquad
              s = \frac{\tilde s}{1 + |\tilde s| / B}, \qquad \log|\det J| = \textstyle\sum s,

    inverse :math:`x_b = y_b \odot e^{-s} + t`, each one pass of the network.

    - ``mask="channel"``: :math:`x_a` is the first :math:`\lfloor C/2 \rfloor`
      channels (the others with ``reverse=True``); the network maps them to
      :math:`2 \times` the other channels.
    - ``mask="checkerboard"``: :math:`x_a` is the pixels with :math:`h + w`
      even (odd with ``reverse=True``), all channels; the network reads the
      image with :math:`x_b` set to zero and returns :math:`2C` channels, used
      on :math:`x_b` only.

    :param channels: :math:`C`.
    :param net: a callable from the network's input, ``batch + (C_in, H, W)``,
        to ``batch' + (C_out, H, W)``: :math:`\tilde s` then :math:`t`, stacked
        on the channel axis (see :class:`ConvCouplingNet`).
    :param log_scale_bound: :math:`B`.
    """

    def __init__(
        self,
        channels: int,
        net: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mask: str = "channel",
        reverse: bool = False,
        log_scale_bound: float = 3.0,
        cache_size: int = 1,
    ):
        super().__init__(channels, cache_size=cache_size)
        self.net_channels = _coupling_channels(self.channels, mask)
        self.mask = mask
        self.reverse = check_bool("reverse", reverse)
        self.map = data_affine_map(log_scale_bound)
        self.net = net

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.channels // 2
        head, tail = x[..., :first, :, :], x[..., first:, :, :]
        return (tail, head) if self.reverse else (head, tail)

    def _join(self, kept: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        batch = torch.broadcast_shapes(kept.shape[:-3], transformed.shape[:-3])
        kept = kept.expand(batch + kept.shape[-3:])
        parts = (transformed, kept) if self.reverse else (kept, transformed)
        return torch.cat(parts, dim=-3)

    def _couple(self, value: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One direction and :math:`\\log|\\det J|` (of the forward map) from the same pass."""
        if self.mask == "channel":
            kept, part = self._split(value)
            unbounded, shift = self.net(kept).chunk(2, dim=-3)
            log_scale = self.map.log_scale(unbounded)
            out = self._join(kept, self.map.apply(part, shift, log_scale, inverse))
        else:
            kept = _checkerboard(*value.shape[-2:], int(self.reverse), value)
            unbounded, shift = self.net(value * kept).chunk(2, dim=-3)
            log_scale = self.map.log_scale(unbounded) * (1 - kept)
            out = self.map.apply(value, shift * (1 - kept), log_scale, inverse)  # s = t = 0 on the kept pixels
        return out, log_scale.sum((-3, -2, -1))

    def _call_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._couple(x, inverse=False)

    def _inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._couple(y, inverse=True)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, mask={self.mask!r}, reverse={self.reverse}, "
            f"log_scale_bound={self.map.log_scale_bound}"
        )


class ConvAffineCoupling(ConditionedConvAffineCoupling, TransformModule):
    r"""A learnable affine coupling on images (RealNVP [3], Glow [1]): the
    maths of :class:`ConditionedConvAffineCoupling` with a
    :class:`ConvCouplingNet` of ``hidden_channels`` channels, whose last layer
    starts at zero, so that the layer starts at the identity. Cost: one pass
    of the network each way, :math:`O(B HW (k^2 C + h) h)` for :math:`h` hidden channels.

    Example::

        >>> layer = conv_affine_coupling(4, hidden_channels=8, mask="checkerboard")
        >>> x = torch.randn(3, 4, 6, 6)
        >>> bool((layer(x) == x).all())  # it starts at the identity
        True

    References: [1], [3] in :mod:`pyro_nflows.transforms.conv`.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int = 64,
        *,
        mask: str = "channel",
        reverse: bool = False,
        log_scale_bound: float = 3.0,
        kernel_size: int = 3,
        cache_size: int = 1,
    ):
        super().__init__(channels, None, mask, reverse, log_scale_bound, cache_size=cache_size)
        self.net = ConvCouplingNet(*self.net_channels, hidden_channels, kernel_size=kernel_size)


class ConditionalConvAffineCoupling(ConditionalFlow):
    r"""An affine coupling on images whose :class:`ConvCouplingNet` also reads
    a context vector (for class-conditional image models): a linear map of
    the context is added at every pixel of the network's first layer.
    ``condition(c)`` returns a :class:`ConditionedConvAffineCoupling` with the
    network bound to ``c``, whose batch shape broadcasts against the images'.
    Starts at the identity. Options as :class:`ConvAffineCoupling`.
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        hidden_channels: int = 64,
        *,
        mask: str = "channel",
        reverse: bool = False,
        log_scale_bound: float = 3.0,
        kernel_size: int = 3,
    ):
        channels = check_count("channels", channels)
        super().__init__(channels, context_dim)
        self.channels = channels
        self.options = {"mask": mask, "reverse": check_bool("reverse", reverse), "log_scale_bound": log_scale_bound}
        in_channels, out_channels = _coupling_channels(channels, mask)
        self.net = ConvCouplingNet(in_channels, out_channels, hidden_channels, self.context_dim, kernel_size)
        data_affine_map(log_scale_bound)  # refuses a bad bound now rather than at condition()

    def _condition(self, context: torch.Tensor) -> ConditionedConvAffineCoupling:
        net = functools.partial(self.net, context=context)
        return ConditionedConvAffineCoupling(self.channels, net, **self.options)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, context_dim={self.context_dim}, mask={self.options['mask']!r}"


# ---------------------------------------------------------------------------
# Multi-scale: a transform on the first channels, and Glow
# ---------------------------------------------------------------------------


def _joint(transform: Transform, value: torch.Tensor, forward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of ``transform`` (no cache, no checks) and the forward map's log-determinant."""
    joint = transform._call_and_log_det if forward else transform._inverse_and_log_det
    if joint is not None:
        return joint(value)
    if forward:
        y = transform._call(value)
        return y, transform.log_abs_det_jacobian(value, y)
    x = transform._inverse(value)
    return x, transform.log_abs_det_jacobian(x, value)


class ChannelSlice(ImageTransform, TransformModule):
    r"""``transform`` applied to the first :math:`A` channels of an image of
    ``channels`` channels (:math:`A` = ``transform.channels``), the others
    passed through unchanged:

    .. math:: y_{:A} = f(x_{:A}), \qquad y_{A:} = x_{A:}, \qquad \log|\det J| = \log|\det f'|.

    This is how :func:`glow` factors out half of the channels at each level
    while the whole stack stays one bijection of a fixed shape: the
    factored-out channels ride along, untouched, to the base distribution.
    Cost: ``transform``'s, plus one copy.

    Example::

        >>> layer = ChannelSlice(actnorm2d(2), 6)
        >>> layer(torch.randn(8, 6, 4, 4)).shape
        torch.Size([8, 6, 4, 4])
    """

    def __init__(self, transform: ImageTransform, channels: int, cache_size: int = 1):
        super().__init__(channels, cache_size=cache_size)
        active = getattr(transform, "channels", None)
        if not isinstance(transform, ImageTransform) or active is None or not 1 <= active < self.channels:
            raise ValueError(
                "ChannelSlice takes an image transform with a known channel count below channels="
                f"{self.channels}, got {type(transform).__name__} with channels={active}"
            )
        if active != transform.out_channels:
            raise ValueError(f"ChannelSlice's transform must keep its channel count, got {transform!r}")
        self.transform = transform

    def _slice(self, value: torch.Tensor, forward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        active = self.transform.channels
        out, log_det = _joint(self.transform, value[..., :active, :, :], forward)
        return torch.cat([out, value[..., active:, :, :]], dim=-3), log_det

    def _call_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._slice(x, forward=True)

    def _inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._slice(y, forward=False)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def _glow_conv(conv: str, channels: int, kernel_size: int) -> ImageTransform:
    if conv == "conv1x1_lu":
        return Conv1x1(channels, "lu")
    if conv == "conv1x1_qr":
        return Conv1x1(channels, "qr")
    if conv == "emerging":
        return EmergingConv(channels, kernel_size, direction="maf")
    return PeriodicConv(channels, kernel_size)


def _check_glow(channels: int, height: int, width: int, levels: int, steps: int, conv: str) -> None:
    for name, value in [("channels", channels), ("height", height), ("width", width)]:
        check_count(name, value)
    check_count("levels", levels)
    check_count("steps", steps)
    if height % 2**levels or width % 2**levels:
        raise ValueError(
            f"glow with levels={levels} squeezes {levels} times, so height and width must be multiples of "
            f"{2**levels}; got height={height}, width={width}: use fewer levels or pad the images"
        )
    if conv not in GLOW_CONVS:
        raise ValueError(f"conv must be one of {GLOW_CONVS}, got {conv!r}")


def glow(
    channels: int,
    height: int,
    width: int,
    levels: int = 2,
    steps: int = 4,
    conv: str = "conv1x1_lu",
    *,
    hidden_channels: int = 64,
    mask: str = "channel",
    kernel_size: int = 3,
) -> list[TransformModule]:
    r"""Glow's multi-scale flow [1] on images of shape ``(channels, height, width)``,
    as the list of transforms of a ``TransformedDistribution`` whose base is
    a ``Normal`` of that same shape (``.to_event(3)``).

    Read in the scoring direction, data to noise (the layers' inverses, as
    ``log_prob`` runs them), each of the ``levels`` levels squeezes the image
    (:class:`Squeeze`), runs ``steps`` steps of :class:`ActNorm2d`, an
    invertible convolution (``conv``: :class:`Conv1x1` ``"lu"`` or ``"qr"``,
    :class:`EmergingConv` with ``direction="maf"`` or :class:`PeriodicConv`)
    and a :class:`ConvAffineCoupling` (``mask``, alternating ``reverse``),
    and then factors out half of its channels, except the last level.

    **The factored-out channels.** Every squeeze acts on the whole tensor,
    the factored-out channels included (a fixed permutation of them, volume
    preserving), and the steps of a level act on its first channels only
    (:class:`ChannelSlice`): a squeeze maps the first :math:`m` channels to
    the first :math:`4m`, so the channels still in play stay first, the
    factored-out ones ride along untouched, and every layer maps one tensor
    of a fixed total size. The latent is finally brought back to the data's
    shape by as many unsqueezes, so the whole list is one bijection of
    ``(channels, height, width)``, and every latent variable, factored out
    early or late, gets the base's standard normal (Glow learns a prior for
    the factored-out half; this stack does not). Level :math:`l` works on
    :math:`2^{l+1} C` of :math:`4^l C` channels at
    :math:`H/2^l \times W/2^l`.

    The list is in the ``TransformedDistribution``'s order (noise to data):
    ``levels`` squeezes of the latent, then the levels from the last to
    the first, each its steps in reverse order (coupling, convolution,
    actnorm) and an :class:`Unsqueeze`. Sampling runs the layers' forward
    maps; with ``conv="emerging"`` those are the convolutions' substitutions
    (see :class:`EmergingConv` for their cost).

    Example::

        >>> import pyro.distributions as dist
        >>> layers = glow(1, 8, 8, levels=2, steps=1, hidden_channels=8)
        >>> flow = dist.TransformedDistribution(dist.Normal(torch.zeros(1, 8, 8), 1.0).to_event(3), layers)
        >>> flow.log_prob(torch.randn(5, 1, 8, 8)).shape, flow.sample((2,)).shape
        (torch.Size([5]), torch.Size([2, 1, 8, 8]))

    References: [1] (the architecture), [2] (the convolutions), [3] (squeeze,
    masks, multi-scale) in :mod:`pyro_nflows.transforms.conv`.
    """
    _check_glow(channels, height, width, levels, steps, conv)
    layers: list[TransformModule] = [Squeeze(channels * 4**level) for level in range(levels)]
    for level in range(levels, 0, -1):
        total, active = channels * 4**level, channels * 2 ** (level + 1)
        for step in range(steps - 1, -1, -1):
            coupling = ConvAffineCoupling(active, hidden_channels, mask=mask, reverse=step % 2 == 1)
            for layer in (coupling, _glow_conv(conv, active, kernel_size), ActNorm2d(active)):
                layers.append(layer if active == total else ChannelSlice(layer, total))
        layers.append(Unsqueeze(total))
    return layers


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def actnorm2d(channels: int) -> ActNorm2d:
    """Glow's activation normalisation per channel, initialised from the first batch."""
    return ActNorm2d(channels)


def conditional_actnorm2d(
    channels: int, context_dim: int, hidden_dims: Sequence[int] | None = None
) -> ConditionalActNorm2d:
    """A scale and shift per channel that an MLP computes from a context, starting at the identity."""
    return ConditionalActNorm2d(channels, context_dim, hidden_dims)


def squeeze(channels: int | None = None) -> Squeeze:
    """Space to depth by 2: ``(C, H, W)`` to ``(4C, H/2, W/2)``; ``channels`` fixes ``C`` (default: any)."""
    return Squeeze(channels)


def unsqueeze(channels: int | None = None) -> Unsqueeze:
    """Depth to space by 2: ``(4C, H, W)`` to ``(C, 2H, 2W)``; ``channels`` fixes ``4C`` (default: any)."""
    return Unsqueeze(channels)


def conv_affine_coupling(
    channels: int,
    hidden_channels: int = 64,
    *,
    mask: str = "channel",
    reverse: bool = False,
    log_scale_bound: float = 3.0,
    kernel_size: int = 3,
) -> ConvAffineCoupling:
    """An affine coupling on images with a convolutional network, channel or checkerboard mask."""
    return ConvAffineCoupling(
        channels, hidden_channels, mask=mask, reverse=reverse, log_scale_bound=log_scale_bound, kernel_size=kernel_size
    )


def conditional_conv_affine_coupling(
    channels: int,
    context_dim: int,
    hidden_channels: int = 64,
    *,
    mask: str = "channel",
    reverse: bool = False,
    log_scale_bound: float = 3.0,
    kernel_size: int = 3,
) -> ConditionalConvAffineCoupling:
    """An affine coupling on images whose convolutional network also reads a context vector."""
    return ConditionalConvAffineCoupling(
        channels,
        context_dim,
        hidden_channels,
        mask=mask,
        reverse=reverse,
        log_scale_bound=log_scale_bound,
        kernel_size=kernel_size,
    )
