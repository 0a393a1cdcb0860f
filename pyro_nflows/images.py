r"""Image density estimation: ``fit_images(images)`` returns an :class:`ImageDensityModel`.

The data are images of shape ``(n, C, H, W)`` whose pixels take ``K``
values, the integer levels :math:`0, \dots, K - 1` (``K = 2 ** num_bits``:
256 for 8-bit images, 2 for binary ones; any ``K`` by a fractional
``num_bits``, e.g. ``log2(17)`` for scikit-learn's digits,
:func:`pyro_nflows.datasets.digits_images`).

**The model.** A standard normal base on :math:`(C, H, W)`, Glow's
multi-scale flow (:func:`~pyro_nflows.transforms.glow`, levels of squeeze,
steps of actnorm + invertible convolution + affine coupling, half the
channels factored out per level), and a fixed map :math:`P` from the flow's
space to the pixel values (:class:`PixelMap`):

.. math::

    \text{logit:}\quad x = \frac{K}{1 - 2\alpha}\,\bigl(\sigma(y) - \alpha\bigr), \qquad
    \log\Bigl|\frac{dx}{dy}\Bigr| = \log\frac{K}{1 - 2\alpha} + \log\sigma(y) + \log\sigma(-y),
    \quad \alpha = 0.05

(RealNVP's [2]; :math:`[0, K]` is the image of
:math:`[\mathrm{logit}\,\alpha, \mathrm{logit}(1 - \alpha)]`), or
``"centred"`` (Glow's [1]), :math:`x = K (y + 1/2)`,
:math:`\log|dx/dy| = \log K`. The map's log-determinant is part of
:meth:`ImageDensityModel.log_prob`, so :math:`p(x)` is a density on
pixel values in the data's own units (levels), whose unit bins
:math:`[k, k + 1)^D` have volume 1.

**Dequantisation** (Theis et al. [3]; Ho et al. [4]). A discrete image
:math:`k \in \{0, \dots, K-1\}^D` has the probability
:math:`P(k) = \int_{[0,1)^D} p(k + u)\, du`, and for any density
:math:`q(u \mid k)` on :math:`[0, 1)^D`, by Jensen's inequality,

.. math::

    \log P(k) \;\ge\; \mathbb{E}_{u \sim q(\cdot \mid k)}\bigl[\log p(k + u) - \log q(u \mid k)\bigr],

with equality when :math:`q(u \mid k) = p(k + u) / P(k)`. Uniform
dequantisation takes :math:`q = U[0, 1)^D` (:math:`\log q = 0`): adding
:math:`U(0, 1)` noise to each level (:math:`U(0, 1/2^{\text{bits}})` on the
:math:`[0, 1]` scale). Variational dequantisation learns :math:`q` with a
conditional flow (:class:`VariationalDequantizer`) and maximises the bound in
:math:`p` and :math:`q` jointly. The bits per dimension of a test set,
:math:`-\frac{1}{D \ln 2}\,\overline{\text{bound}}`
(:func:`bits_per_dim`), bound the discrete data's code length from above.

**Training** (:func:`fit_images`) is :func:`pyro_nflows.density.fit`'s,
from the same pieces (:mod:`pyro_nflows.training`:
:class:`~pyro_nflows.training.EpochLoop`,
:class:`~pyro_nflows.training.TrainingState`,
:class:`~pyro_nflows.training.Checkpoint`; :mod:`pyro_nflows.distributed`):
a validation split, Adam with a cosine schedule, clipped gradients, early
stopping with the best weights, a checkpoint per epoch and exact resume,
Ctrl-C and NaN handling, a progress bar, data-parallel training under
``torchrun``. Each epoch draws the dequantisation noise of every training
image with the shuffling generator, so a resume is exact; the validation
images keep one fixed draw, so that epochs are compared on the same noise.

``save`` / :func:`load` write and read one file through
:mod:`pyro_nflows.saving` (kind ``"images"``: the configuration as JSON,
the weights, a checksum).

Example::

    >>> from pyro_nflows import datasets
    >>> images = datasets.digits_images()[:200]
    >>> model = fit_images(images, levels=2, steps=1, num_bits=datasets.DIGITS_BITS, epochs=1,
    ...                    hidden_channels=8, seed=0, progress=False)
    >>> model.sample(4).shape
    torch.Size([4, 1, 8, 8])
    >>> bool(bits_per_dim(model, images[:50]) > 0)
    True

Measurements (bits/dim on the digits for the four convolutions and
normflows' Glow) are in ``benchmarks/README.md#images``.

References:

[1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
[2] Laurent Dinh, Jascha Sohl-Dickstein, Samy Bengio. Density estimation using
    Real NVP. arXiv:1605.08803
[3] Lucas Theis, Aäron van den Oord, Matthias Bethge. A note on the evaluation
    of generative models. arXiv:1511.01844
[4] Jonathan Ho, Xi Chen, Aravind Srinivas, Yan Duan, Pieter Abbeel. Flow++:
    Improving Flow-Based Generative Models with Variational Dequantization and
    Architecture Design. arXiv:1902.00275
[5] Yuri Burda, Roger Grosse, Ruslan Salakhutdinov. Importance Weighted
    Autoencoders. arXiv:1509.00519
"""

from __future__ import annotations

import functools
import json
import math
import types
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import Transform
from torch.nn import functional as F

from pyro_nflows.density import (
    _agree_across_processes,
    _batches,
    _check_settings,
    _draw_seed,
    _Epochs,
    _fingerprint,
    _mean_log_prob,
    _optimisation,
    _resume,
    _Rows,
    _split,
    _where,
)
from pyro_nflows.distributed import data_parallel, join_process_group
from pyro_nflows.saving import read_model, write_model
from pyro_nflows.training import EpochLoop, TrainingState
from pyro_nflows.transforms.glow_flow import ConditionedConvAffineCoupling, ConvCouplingNet, glow
from pyro_nflows.validation import check_bool, check_count, check_kernel_size

__all__ = [
    "DEQUANTIZATIONS",
    "LOGIT_ALPHA",
    "SCALINGS",
    "ImageDensityModel",
    "PixelMap",
    "VariationalDequantizer",
    "bits_per_dim",
    "check_images",
    "fit_images",
    "load",
]

DEQUANTIZATIONS = ("uniform", "variational")
SCALINGS = ("logit", "centred")
#: RealNVP's margin: pixel values in [0, K] are the image of sigmoid values in [alpha, 1 - alpha].
LOGIT_ALPHA = 0.05
# The seed of the one draw of dequantisation noise that validation images keep for a whole fit.
_VALIDATION_NOISE_SEED = 0
# The most values a pixel may take: float32 holds every integer up to 2**24 exactly.
_MAX_BITS = 24
# Noise in (0, 1) for the logistic base of the variational dequantiser, away from logit's infinities.
_NOISE_MARGIN = 1e-6


def _num_values(num_bits) -> int:
    """``K = 2 ** num_bits``, the number of values a pixel takes; ``ValueError`` unless an integer >= 2."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, float)) or not 0 < num_bits <= _MAX_BITS:
        raise ValueError(f"num_bits must be a number in (0, {_MAX_BITS}], got {num_bits!r}")
    exact = 2.0**num_bits
    values = round(exact)
    if values < 2 or abs(exact - values) > 1e-9 * values:
        raise ValueError(
            f"num_bits must be log2 of the number of values a pixel takes, an integer >= 2 (8 for 256 values, "
            f"math.log2(17) for 17); got {num_bits!r}, 2 ** num_bits = {exact:.6g}"
        )
    return values


def _as_tensor(images, name: str) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array of images, got {type(images).__name__}")
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"{name} must hold real pixel values, got a tensor of {images.dtype}")
    return images


def check_images(
    images,
    num_values: int,
    name: str = "images",
    event_shape: tuple[int, int, int] | None = None,
    *,
    discrete: bool = True,
    min_images: int = 1,
) -> torch.Tensor:
    """Return ``images`` as a float tensor (float32 unless it was floating) of shape ``(n, C, H, W)`` (``event_shape``
    ``(C, H, W)`` if given; any batch shape in front of it when
    ``min_images=0``), or raise ``ValueError`` naming the fault and the images at
    fault (indices in the batch): another shape, NaN or infinite values, values
    outside ``0..num_values - 1`` or, with ``discrete=False`` (dequantised
    values, what :meth:`ImageDensityModel.log_prob` scores), outside
    ``[0, num_values]``, and, with ``discrete=True``, values that are not integers."""
    tensor = _as_tensor(images, name)
    wrong = tensor.dim() != 4 if min_images else tensor.dim() < 3
    if not wrong and event_shape is not None:
        wrong = tuple(tensor.shape[-3:]) != tuple(event_shape)
    if wrong:
        expected = "(n, C, H, W)" if event_shape is None else "(n, {}, {}, {})".format(*event_shape)
        if not min_images:
            expected = expected.replace("(n,", "(...,")
        raise ValueError(
            f"{name} must be images of shape {expected} (a batch of images of C channels, H x W pixels), got a "
            f"tensor of shape {tuple(tensor.shape)}; a single image needs a batch dimension: image[None]"
        )
    if len(tensor) < min_images:
        raise ValueError(f"{name} holds {len(tensor)} images; at least {min_images} are needed")
    values = tensor.double()
    high = num_values - 1 if discrete else num_values
    faults = [
        (~torch.isfinite(values), "NaN or infinite values"),
        ((values < 0) | (values > high), f"values outside the declared range 0..{high}"),
    ]
    if discrete:
        faults.append((values != values.round(), "values that are not integer pixel levels"))
    for mask, what in faults:
        bad = mask.flatten(-3).any(-1)
        if bool(bad.any()):
            found = values[mask]
            example = f"; e.g. {found[0].item():.6g}" if torch.isfinite(found[0]) else ""
            raise ValueError(
                f"{name} has {what} in {int(bad.sum())} image(s) (first: {_where(bad)[:10]}){example}. Pixels are "
                f"the integer levels 0..{num_values - 1} of K = 2 ** num_bits values: images in [0, 1] are "
                "(images * (K - 1)).round(); fix num_bits if the images have more levels"
            )
    return tensor if tensor.is_floating_point() else tensor.to(torch.float32)


# ---------------------------------------------------------------------------
# The fixed map between the flow's space and the pixel values
# ---------------------------------------------------------------------------


class PixelMap(Transform):
    r"""The fixed map from the flow's space to pixel values in :math:`[0, K]`,
    element-wise on events of shape ``(C, H, W)`` (``event_dim = 3``):

    - ``"logit"``: :math:`x = \frac{K}{1 - 2\alpha}(\sigma(y) - \alpha)`, inverse
      :math:`y = \mathrm{logit}(\alpha + (1 - 2\alpha) x / K)`,
      :math:`\log|dx/dy| = \log\frac{K}{1 - 2\alpha} - \mathrm{softplus}(y) - \mathrm{softplus}(-y)`;
    - ``"centred"``: :math:`x = K (y + 1/2)`, :math:`y = x / K - 1/2`,
      :math:`\log|dx/dy| = \log K`.

    ``log_abs_det_jacobian`` sums over the :math:`D = CHW` pixels. Both
    directions cost :math:`O(D)` per image. The logit map's codomain is the
    interval :math:`(-\alpha K, (1 - \alpha) K) / (1 - 2\alpha)`, a little
    wider than :math:`[0, K]` (the mass beyond it is lost to the discrete
    model, which only lowers the bound); the centred map's is the whole line.

    Example::

        >>> pixels = PixelMap(256)
        >>> y = pixels.inv(torch.tensor([[[[0.0, 128.0], [200.5, 256.0]]]]))
        >>> torch.allclose(pixels(y), torch.tensor([[[[0.0, 128.0], [200.5, 256.0]]]]), atol=1e-3)
        True
    """

    bijective = True
    sign = 1

    def __init__(self, num_values: int, scaling: str = "logit", cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        self.num_values = check_count("num_values", num_values, minimum=2)
        self.scaling = scaling
        self._logit_scale = num_values / (1 - 2 * LOGIT_ALPHA)

    @property
    def domain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, 3)

    @property
    def codomain(self) -> constraints.Constraint:
        if self.scaling == "centred":
            return constraints.independent(constraints.real, 3)
        low, high = -LOGIT_ALPHA * self._logit_scale, (1 - LOGIT_ALPHA) * self._logit_scale
        return constraints.independent(constraints.interval(low, high), 3)

    def with_cache(self, cache_size: int = 1) -> "PixelMap":
        return self if self._cache_size == cache_size else PixelMap(self.num_values, self.scaling, cache_size)

    def _call(self, y: torch.Tensor) -> torch.Tensor:
        if self.scaling == "centred":
            return self.num_values * (y + 0.5)
        return self._logit_scale * (torch.sigmoid(y) - LOGIT_ALPHA)

    def _inverse(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaling == "centred":
            return x / self.num_values - 0.5
        share = LOGIT_ALPHA + x / self._logit_scale
        return torch.log(share) - torch.log1p(-share)

    def log_abs_det_jacobian(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pixels = math.prod(y.shape[-3:])
        if self.scaling == "centred":
            return y.new_full(y.shape[:-3], pixels * math.log(self.num_values))
        per_pixel = -F.softplus(y) - F.softplus(-y)
        return pixels * math.log(self._logit_scale) + per_pixel.sum((-3, -2, -1))

    def __repr__(self) -> str:
        return f"PixelMap(num_values={self.num_values}, scaling={self.scaling!r})"


# ---------------------------------------------------------------------------
# Variational dequantisation
# ---------------------------------------------------------------------------


def _log_sigmoid_slope(z: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \sigma'(z) = \log\sigma(z) + \log\sigma(-z)`, summed over each image."""
    return (F.logsigmoid(z) + F.logsigmoid(-z)).sum((-3, -2, -1))


def _read_with_features(net: ConvCouplingNet, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``net`` on ``x`` with the context's feature maps stacked on as more channels."""
    return net(torch.cat([x, features.expand(x.shape[:-3] + features.shape[-3:])], dim=-3))


class VariationalDequantizer(nn.Module):
    r"""The dequantising distribution :math:`q(u \mid k)` on :math:`[0, 1)^D` of
    variational dequantisation (Flow++ [4]), a small flow conditioned on the image :math:`k`:

    .. math::

        \varepsilon \sim \mathrm{Logistic}(0, 1)^D, \qquad z = g_k(\varepsilon), \qquad u = \sigma(z),

        \log q(u \mid k) = \sum_i \log\sigma'(\varepsilon_i) - \log\Bigl|\det\frac{\partial g_k}{\partial
        \varepsilon}\Bigr| - \sum_i \log\sigma'(z_i),

    where :math:`\log\sigma'(a) = \log\sigma(a) + \log\sigma(-a)` (the
    logistic's log-density) and :math:`g_k` is ``steps`` affine couplings
    (:class:`~pyro_nflows.transforms.glow_flow.ConditionedConvAffineCoupling`,
    checkerboard masks of alternating parity) whose
    :class:`~pyro_nflows.transforms.glow_flow.ConvCouplingNet` reads, besides
    the kept pixels, ``hidden_channels`` feature maps that a two-layer
    convolutional network computes from the image (scaled to
    :math:`k / K - 1/2`). The couplings start at the identity, where
    :math:`u = \sigma(\varepsilon)` is exactly uniform (the logistic is the
    sigmoid's inverse image of :math:`U(0, 1)`) and :math:`\log q = 0`: the
    variational bound starts at the uniform one.

    ``forward(context, noise)`` takes the scaled images and uniform noise
    :math:`v \in (0, 1)^D` (:math:`\varepsilon = \mathrm{logit}\, v`) of the
    same shape ``batch + (C, H, W)`` and returns :math:`u` and
    :math:`\log q(u \mid k)` (shape ``batch``), differentiable in the
    parameters (reparametrised). Cost: one pass of the feature network and of
    each coupling's network.
    """

    def __init__(self, channels: int, steps: int = 4, hidden_channels: int = 32, kernel_size: int = 3):
        super().__init__()
        self.channels = check_count("channels", channels)
        check_count("dequantizer_steps", steps)
        hidden_channels = check_count("dequantizer_channels", hidden_channels)
        padding = check_kernel_size(kernel_size) // 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=padding),
            nn.ReLU(),
        )
        self.nets = nn.ModuleList(
            ConvCouplingNet(channels + hidden_channels, 2 * channels, hidden_channels, kernel_size=kernel_size)
            for _ in range(steps)
        )

    def forward(self, context: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = noise.shape[:-3]
        flat_context = context.reshape((-1,) + context.shape[-3:])
        features = self.features(flat_context)
        epsilon = torch.logit(noise.reshape(flat_context.shape).clamp(_NOISE_MARGIN, 1 - _NOISE_MARGIN))
        z, log_q = epsilon, _log_sigmoid_slope(epsilon)
        for index, net in enumerate(self.nets):
            net_of = functools.partial(_read_with_features, net, features)
            coupling = ConditionedConvAffineCoupling(self.channels, net_of, mask="checkerboard", reverse=index % 2 == 1)
            out = coupling(z)
            log_q = log_q - coupling.log_abs_det_jacobian(z, out)
            z = out
        log_q = log_q - _log_sigmoid_slope(z)
        return torch.sigmoid(z).reshape(noise.shape), log_q.reshape(batch)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class ImageDensityModel(nn.Module):
    r"""A normalizing-flow density on images of shape ``(C, H, W)`` whose
    pixels take ``K = 2 ** num_bits`` values (see :mod:`pyro_nflows.images`):
    a standard normal base, :func:`~pyro_nflows.transforms.glow` and the
    fixed :class:`PixelMap` to pixel values.

    :param channels, height, width: the images' shape; ``height`` and
        ``width`` must be multiples of ``2 ** levels``.
    :param levels, steps, conv: Glow's levels (squeezes), steps per level
        and invertible convolution (``"conv1x1_lu"``, ``"conv1x1_qr"``,
        ``"emerging"``, ``"periodic"``), as in :func:`~pyro_nflows.transforms.glow`,
        with its ``hidden_channels``, ``mask`` and ``kernel_size`` (keyword only).
    :param num_bits: :math:`\log_2 K`; pixels are the integers
        :math:`0..K - 1` (a fractional ``num_bits`` for a ``K`` that is no
        power of 2: ``math.log2(17)``).
    :param scaling: ``"logit"`` (default) or ``"centred"`` (:class:`PixelMap`).
    :param dequantization: ``"uniform"`` or ``"variational"`` (a
        :class:`VariationalDequantizer` of ``dequantizer_steps`` couplings and
        ``dequantizer_channels`` hidden channels).

    ``log_prob(x)`` is the density at dequantised images :math:`x \in [0, K]^D`;
    ``log_prob_bound(images)`` the lower bound on :math:`\log P(k)` of integer
    images (uniform or variational, one draw of noise or several);
    ``sample(n)`` draws images; ``save(path)`` / :func:`load` store and
    restore it exactly. Scoring costs one pass of Glow's inverse (one pass
    of every coupling network; a variational model adds its dequantiser's);
    sampling one pass of its forward (with ``conv="emerging"``, the
    convolutions' substitutions).
    """

    def __init__(
        self,
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
        num_bits: float = 8,
        scaling: str = "logit",
        dequantization: str = "uniform",
        dequantizer_steps: int = 4,
        dequantizer_channels: int = 32,
    ):
        super().__init__()
        num_values = _num_values(num_bits)
        if dequantization not in DEQUANTIZATIONS:
            raise ValueError(f"dequantization must be one of {DEQUANTIZATIONS}, got {dequantization!r}")
        self.config = {
            "channels": channels, "height": height, "width": width, "levels": levels, "steps": steps, "conv": conv,
            "hidden_channels": hidden_channels, "mask": mask, "kernel_size": kernel_size, "num_bits": num_bits,
            "scaling": scaling, "dequantization": dequantization, "dequantizer_steps": dequantizer_steps,
            "dequantizer_channels": dequantizer_channels,
        }
        self.pixels = PixelMap(num_values, scaling)
        layers = glow(channels, height, width, levels, steps, conv, hidden_channels=hidden_channels, mask=mask,
                      kernel_size=kernel_size)
        self.layers = nn.ModuleList(layers)
        self.dequantizer = None
        if dequantization == "variational":
            self.dequantizer = VariationalDequantizer(channels, dequantizer_steps, dequantizer_channels, kernel_size)

    @property
    def event_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return self.config["channels"], self.config["height"], self.config["width"]

    @property
    def num_values(self) -> int:
        """``K``, the number of values a pixel takes."""
        return self.pixels.num_values

    @property
    def dequantization(self) -> str:
        return self.config["dequantization"]

    def _anchor(self) -> torch.Tensor:
        return next(self.parameters())

    def distribution(self) -> dist.TransformedDistribution:
        """The model as a Pyro distribution with ``event_shape == (C, H, W)``, on dequantised pixel values."""
        anchor = self._anchor()
        base = dist.Normal(anchor.new_zeros(self.event_shape), 1.0).to_event(3)
        return dist.TransformedDistribution(base, [*self.layers, self.pixels])

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of dequantised images ``x`` (shape ``(..., C, H, W)``,
        values in ``[0, K]``), in the data's units: shape ``(...)``. Converted to
        the model's dtype; ``ValueError`` for another shape, NaN, or values
        outside ``[0, K]``."""
        x = check_images(x, self.num_values, "x", self.event_shape, discrete=False, min_images=0)
        return self._density(x.to(self._anchor()))

    def _density(self, x: torch.Tensor) -> torch.Tensor:
        return self.distribution().log_prob(x)

    def _dequantize(self, images: torch.Tensor, noise: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k + u, log q(u | k))`` for uniform ``noise`` of the images' shape."""
        if kind == "uniform":
            return images + noise, images.new_zeros(images.shape[:-3])
        u, log_q = self.dequantizer(images / self.num_values - 0.5, noise)
        return images + u, log_q

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The bound :math:`\\log p(k + u) - \\log q(u \\mid k)` of each image for one
        draw of uniform ``noise`` (of the images' shape), with the model's
        dequantisation; no input checks (what training and
        ``DistributedDataParallel`` call; see :meth:`log_prob_bound`)."""
        x, log_q = self._dequantize(images, noise, self.dequantization)
        return self._density(x) - log_q

    def _kind(self, dequantization: str | None) -> str:
        kind = self.dequantization if dequantization is None else dequantization
        if kind not in DEQUANTIZATIONS:
            raise ValueError(f"dequantization must be None or one of {DEQUANTIZATIONS}, got {dequantization!r}")
        if kind == "variational" and self.dequantizer is None:
            raise ValueError("this model was built with uniform dequantization: it has no variational dequantizer")
        return kind

    def log_prob_bound(
        self,
        images: torch.Tensor,
        num_samples: int = 1,
        *,
        importance_weighted: bool = False,
        dequantization: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        r"""A lower bound on :math:`\log P(k)` of each integer image ``k`` (shape
        ``(..., C, H, W)``): :math:`\frac{1}{S}\sum_s [\log p(k + u_s) - \log q(u_s \mid k)]`
        for ``S = num_samples`` draws :math:`u_s \sim q(\cdot \mid k)` (an
        unbiased estimate of the bound), or with ``importance_weighted=True``
        :math:`\log \frac{1}{S}\sum_s p(k + u_s) / q(u_s \mid k)`, whose
        expectation is a lower bound that rises to :math:`\log P(k)` as
        :math:`S` grows (Burda et al. [5]). ``dequantization``: the model's
        (``None``), or ``"uniform"`` to score a variational model with uniform
        noise. Noise is drawn with ``generator`` (torch's global one if ``None``).
        Cost: one scoring pass of ``S`` times the images (and their memory)."""
        check_count("num_samples", num_samples)
        check_bool("importance_weighted", importance_weighted)
        kind = self._kind(dequantization)
        images = check_images(images, self.num_values, "images", self.event_shape, min_images=0)
        images = images.to(self._anchor())
        noise = torch.rand((num_samples, *images.shape), generator=generator).to(images)
        x, log_q = self._dequantize(images.expand(noise.shape), noise, kind)  # every draw in one pass
        bounds = self._density(x) - log_q
        if importance_weighted:
            return torch.logsumexp(bounds, 0) - math.log(num_samples)
        return bounds.mean(0)

    @torch.no_grad()
    def sample(self, n: int, *, quantize: bool = True) -> torch.Tensor:
        """Draw ``n`` images, shape ``(n, C, H, W)``: integer pixel levels in
        ``0..K - 1`` (the continuous draw rounded down and clipped to the range), or
        with ``quantize=False`` the continuous draws themselves (in the
        :class:`PixelMap`'s codomain, which reaches a little beyond ``[0, K]``)."""
        check_count("n", n)
        check_bool("quantize", quantize)
        drawn = self.distribution().sample((n,))
        return drawn.floor().clamp(0, self.num_values - 1) if quantize else drawn

    def save(self, path: str | Path) -> None:
        """Write the configuration (as JSON), the weights and their checksum to
        ``path``, atomically (see :mod:`pyro_nflows.saving`)."""
        write_model(self, self.config, "images", path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device | None = "cpu") -> "ImageDensityModel":
        """Restore a model written by :meth:`save` (weights only, no unpickling);
        ``ValueError`` naming the file for anything that is not an intact model
        file of this version (see :func:`pyro_nflows.saving.read_model`)."""
        return read_model(cls, "images", path, map_location, check_config=_check_saved_config)


def _check_saved_config(config: dict, state) -> None:
    """A variational model's file holds its dequantizer's weights, and a uniform model's none."""
    variational = any(key.startswith("dequantizer.") for key in state)
    if variational != (config.get("dequantization") == "variational"):
        raise ValueError(
            f"dequantization {config.get('dequantization')!r} does not match the weights, which "
            f"{'hold' if variational else 'lack'} a variational dequantizer"
        )


def load(path: str | Path, map_location: str | torch.device | None = "cpu") -> ImageDensityModel:
    """Restore an :class:`ImageDensityModel` written by :meth:`ImageDensityModel.save`."""
    return ImageDensityModel.load(path, map_location=map_location)


def bits_per_dim(
    model: ImageDensityModel,
    images,
    num_samples: int = 1,
    *,
    importance_weighted: bool = False,
    dequantization: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    r"""Bits per dimension of integer ``images`` (shape ``(n, C, H, W)``) under ``model``:

    .. math:: \text{bits/dim} = -\frac{1}{n D \ln 2} \sum_{j=1}^{n} \text{bound}(k_j), \qquad D = CHW,

    the bound of :meth:`ImageDensityModel.log_prob_bound` (``num_samples``
    draws, ``importance_weighted``, ``dequantization``), with noise drawn
    from a generator seeded by ``seed`` (the same number on every call). An
    upper bound on the bits per pixel value of a code built from the model
    (bins of volume 1: :math:`-\log_2 P(k) \le -\text{bound}/\ln 2`); for
    8-bit images, in the units papers report. Cost: ``num_samples`` scoring
    passes over the images, ``batch_size`` at a time.
    """
    check_count("batch_size", batch_size)
    images = check_images(images, model.num_values, "images", model.event_shape)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        total = sum(
            model.log_prob_bound(chunk, num_samples, importance_weighted=importance_weighted,
                                 dequantization=dequantization, generator=generator).double().sum().item()
            for chunk in images.split(batch_size)
        )
    return -total / (len(images) * math.prod(model.event_shape) * math.log(2))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _given_images(images, validation_data, num_values: int) -> tuple[_Rows, _Rows | None]:
    """The training images and the given validation images (``None``: held out of ``images``), checked."""
    data = check_images(images, num_values, "images", min_images=2)
    if validation_data is None:
        return _Rows(data), None
    validation = check_images(validation_data, num_values, "validation_data", tuple(data.shape[1:]))
    return _Rows(data), _Rows(validation)


def _noise(count: int, event_shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform noise in [0, 1) for ``count`` images, drawn on the CPU with ``generator``."""
    return torch.rand((count, *event_shape), generator=generator).to(device)


def _initialise(model: ImageDensityModel, train: _Rows, generator: torch.Generator, batch_size: int) -> None:
    """The data-dependent initialisations (Glow's actnorm) from a large batch of dequantised training images."""
    chosen = torch.randperm(len(train), generator=generator)[: 4 * batch_size]
    images = train.data[chosen.to(train.data.device)]
    with torch.no_grad():
        model(images, _noise(len(images), model.event_shape, generator, images.device))


def fit_images(
    images,
    levels: int = 2,
    steps: int = 4,
    conv: str = "conv1x1_lu",
    dequantization: str = "uniform",
    num_bits: float = 8,
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    validation_fraction: float = 0.1,
    validation_data=None,
    patience: int = 30,
    clip_norm: float = 5.0,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    distributed: bool = True,
    *,
    hidden_channels: int = 64,
    mask: str = "channel",
    kernel_size: int = 3,
    scaling: str = "logit",
    dequantizer_steps: int = 4,
    dequantizer_channels: int = 32,
) -> ImageDensityModel:
    r"""Fit a Glow density to integer ``images`` (shape ``(n, C, H, W)``, pixels
    ``0..K - 1``, ``K = 2 ** num_bits``) by maximising the dequantisation bound

    .. math:: \frac{1}{n}\sum_j \mathbb{E}_{u \sim q(\cdot \mid k_j)}
              \bigl[\log p(k_j + u) - \log q(u \mid k_j)\bigr] \;\le\; \frac{1}{n}\sum_j \log P(k_j)

    (one draw of :math:`u` per image and epoch; :math:`q` uniform, or learned
    jointly with ``dequantization="variational"``; see :mod:`pyro_nflows.images`).

    :param levels, steps, conv: Glow's architecture (:class:`ImageDensityModel`);
        ``height`` and ``width`` must be multiples of ``2 ** levels`` (8 x 8
        digits: ``levels`` 1, 2 or 3).
    :param num_bits: :math:`\log_2 K` (``datasets.DIGITS_BITS`` for the digits' 17 values).
    :param batch_size: images per optimisation step (the global batch when
        training data-parallel).
    :param checkpoint: a file written after every epoch; if it exists,
        training resumes from it, exactly (the same images, to the byte, and
        the same settings are required). Its folder must exist.
    :param distributed: train data-parallel when started under ``torchrun``,
        as :func:`pyro_nflows.density.fit` does (every process passes the same
        images and arguments; the result matches one process with the same
        global batch); ``False`` trains in this process alone.

    The rest is :func:`pyro_nflows.density.fit`'s: ``validation_fraction`` of
    the images held out (or ``validation_data``), Adam at ``lr`` with a cosine
    schedule over all steps, gradient norms clipped at ``clip_norm``,
    early stopping after ``patience`` epochs without a better validation
    bound and the best weights restored, a progress bar (train and
    validation bounds in nats per image, and the validation bits/dim),
    Ctrl-C or a loss that turns NaN stopping with the best weights (and a
    warning). The model's ``history`` holds the curves (nats per image).
    Cost per epoch: one scoring pass and its backward per training image,
    one scoring pass per validation image.
    """
    num_values = _num_values(num_bits)
    rows, given = _given_images(images, validation_data, num_values)
    _check_settings(epochs, batch_size, patience, lr, clip_norm)
    ranks, device = join_process_group(distributed, torch.device(device) if device is not None else torch.device("cpu"))
    model_options = dict(levels=levels, steps=steps, conv=conv, hidden_channels=hidden_channels, mask=mask,
                         kernel_size=kernel_size, num_bits=num_bits, scaling=scaling, dequantization=dequantization,
                         dequantizer_steps=dequantizer_steps, dequantizer_channels=dequantizer_channels)
    arguments = [model_options, epochs, batch_size, lr, validation_fraction, patience, clip_norm, seed, device.type,
                 str(checkpoint)]
    seed = _agree_across_processes(ranks, device, rows, given, batch_size, seed, arguments)
    if seed is not None:
        torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else _draw_seed())
    train, validation = _split(rows, given, validation_fraction, generator)
    model = ImageDensityModel(*rows.data.shape[1:], **model_options).to(device)
    noise = torch.rand(validation.data.shape, generator=torch.Generator().manual_seed(_VALIDATION_NOISE_SEED))
    train, validation = train.to(device), _Rows(validation.data, noise).to(device)
    _initialise(model, train, generator, batch_size)

    steps_total = epochs * len(_batches(torch.arange(len(train)), batch_size, 1))
    optimizer, scheduler = _optimisation(model, lr, steps_total)
    hint = f"; resume with fit_images(..., checkpoint={str(checkpoint)!r})" if checkpoint is not None else ""
    loop = EpochLoop(model, epochs, patience, metric="validation bound", name="fit_images", progress=progress,
                     ranks=ranks, interrupt_hint=hint)
    state = TrainingState(model, optimizer, scheduler, generator, loop)
    settings = json.dumps({**model.config, "epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience,
                           "clip_norm": clip_norm})
    saved = _resume(checkpoint, state, settings, _fingerprint(train, validation), ranks, device)

    score = data_parallel(model, device, sync_buffers=False) if ranks.distributed else model
    per_bit = 1 / (math.prod(model.event_shape) * math.log(2))
    with loop:
        for epoch in loop:
            model.train()
            noisy = _Rows(train.data, _noise(len(train), model.event_shape, generator, device))
            epoch_of = _Epochs(lambda chosen: noisy[chosen].log_prob(score), len(train), state, batch_size, 1,
                               clip_norm, ranks, device)
            train_value = epoch_of.train(epoch)
            model.eval()
            value = _mean_log_prob(types.SimpleNamespace(log_prob=model), validation, 4 * batch_size, ranks)
            loop.record(epoch, train_value, value, bits=-value * per_bit)
            if saved is not None:
                saved.save(state)
    if ranks.distributed:  # return only once rank 0 has written the last checkpoint
        ranks.all_agree(True, device)
    model.history = loop.history
    return model
