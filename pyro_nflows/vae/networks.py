r"""The gated MLP encoder and decoder of the Householder-flow and ccLinIAF VAEs.

A gated layer (Dauphin et al. [3], used for VAEs by Tomczak & Welling [1, 2])
multiplies a linear map by a sigmoid gate computed from the same input,

.. math:: \mathrm{gated}(x) = (W_1 x + b_1) \odot \sigma(W_2 x + b_2),

which trains faster and more stably than a ReLU layer of the same width in
these models.

- :class:`GatedMLP`: a stack of gated layers (the identity when there are none).
- :class:`Encoder`: :math:`x \to h` by gated layers of widths ``hidden_dims``,
  then :math:`\mu = W_\mu h + b_\mu` and
  :math:`\log\sigma^2 = \mathrm{hardtanh}_{[-6, 2]}(W_v h + b_v)` (the bound
  of [1, 2]: :math:`\sigma \in [0.05, 2.7]`). It also returns :math:`h`, the
  last hidden layer, from which the amortized flow posteriors read their
  parameters (:mod:`pyro_nflows.vae.posteriors`).
- :class:`Decoder`: :math:`z \to` gated layers of the reversed widths
  :math:`\to` a linear output: the logits of a Bernoulli likelihood, or the
  mean of a Gaussian one (whose per-pixel scale is a learned parameter of the
  VAE, see :mod:`pyro_nflows.vae.model`).

With ``hidden_dims=()`` both are linear maps (:math:`h = x`): a
linear-Gaussian VAE whose marginal likelihood is known in closed form, which
the tests use to check :func:`~pyro_nflows.vae.train.estimate_nll`.

References:

[1] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    Householder Flow. arXiv:1611.09630
[2] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    convex combination linear Inverse Autoregressive Flow. arXiv:1706.02326
[3] Yann N. Dauphin, Angela Fan, Michael Auli, David Grangier. Language
    Modeling with Gated Convolutional Networks. arXiv:1612.08083
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pyro_nflows.validation import check_count, check_hidden_dims

__all__ = ["LOG_VARIANCE_BOUNDS", "Decoder", "Encoder", "GatedLinear", "GatedMLP"]

#: Bounds of the encoder's log-variance, as in [1, 2].
LOG_VARIANCE_BOUNDS = (-6.0, 2.0)


class GatedLinear(nn.Module):
    r"""One gated layer, :math:`(W_1 x + b_1) \odot \sigma(W_2 x + b_2)`.

    Example::

        >>> layer = GatedLinear(64, 300)
        >>> layer(torch.rand(5, 64)).shape
        torch.Size([5, 300])
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        check_count("in_features", in_features)
        check_count("out_features", out_features)
        # One matrix for both halves: one GEMM per layer instead of two.
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear(x).chunk(2, dim=-1)
        return value * torch.sigmoid(gate)


class GatedMLP(nn.Sequential):
    """Gated layers of widths ``hidden_dims`` after an input of width
    ``in_features``; the identity when ``hidden_dims`` is empty.
    ``out_features`` is the width of what it returns."""

    def __init__(self, in_features: int, hidden_dims: Sequence[int]):
        widths = [check_count("in_features", in_features)] + check_hidden_dims(hidden_dims)
        super().__init__(*(GatedLinear(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.out_features = widths[-1]


class Encoder(nn.Module):
    r"""``forward(x) -> (mu, log_var, h)``: the base Gaussian's mean and
    log-variance (bounded to ``LOG_VARIANCE_BOUNDS``), and the last hidden
    layer :math:`h` (width :attr:`context_dim`), each with ``x``'s batch shape."""

    def __init__(self, x_dim: int, z_dim: int, hidden_dims: Sequence[int]):
        super().__init__()
        self.body = GatedMLP(x_dim, hidden_dims)
        self.context_dim = self.body.out_features
        self.mean = nn.Linear(self.context_dim, check_count("z_dim", z_dim))
        self.log_var = nn.Linear(self.context_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(x)
        log_var = F.hardtanh(self.log_var(h), *LOG_VARIANCE_BOUNDS)
        return self.mean(h), log_var, h


class Decoder(nn.Module):
    """``forward(z)``: gated layers of widths ``hidden_dims`` (given in the
    encoder's order and used reversed), then a linear map to ``x_dim`` outputs
    (Bernoulli logits or a Gaussian mean)."""

    def __init__(self, z_dim: int, x_dim: int, hidden_dims: Sequence[int]):
        super().__init__()
        self.body = GatedMLP(z_dim, list(reversed(check_hidden_dims(hidden_dims))))
        self.out = nn.Linear(self.body.out_features, check_count("x_dim", x_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z))
