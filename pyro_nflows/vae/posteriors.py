r"""Amortized flow posteriors: :math:`q(z \mid x)` as a Gaussian pushed through
flows whose parameters the encoder computes from :math:`x`.

.. math::

    z_0 \sim \mathcal N\big(\mu(x), \operatorname{diag}\sigma^2(x)\big), \qquad
    z = f_K \circ \dots \circ f_1(z_0), \qquad
    \log q(z \mid x) = \log \mathcal N(z_0; \mu, \sigma^2)
        - \sum_{k=1}^K \log\Bigl|\det \frac{\partial f_k}{\partial z_{k-1}}\Bigr|,

every :math:`f_k` a ``Conditioned<X>`` transform of the package whose
parameters are computed from :math:`h(x)`, the encoder's last hidden layer,
so they have the batch shape of :math:`x`.

A posterior is named by a spec string, ``name`` or ``name:N(key=value, ...)``
(the syntax of :mod:`pyro_nflows.registry`):

==================================  ==================================================================
spec                                :math:`q(z \mid x)`
==================================  ==================================================================
``gaussian``                        :math:`\mathcal N(\mu, \operatorname{diag}\sigma^2)`, no flow
``householder:T``                   :math:`T` Householder reflections [1]; :math:`v_1 = W_1 h + b_1`,
                                    :math:`v_{t+1} = W_{t+1} v_t + b_{t+1}` (the paper's chain)
``convex_triangular_linear:K``      ccLinIAF [2]: :math:`z = (\sum_k w_k L_k) z_0`, the :math:`K`
                                    unit lower triangular :math:`L_k` and the logits of :math:`w`
                                    linear in :math:`h`
``iaf:K``                           :math:`K` IAF steps [3] with the stable gated update
                                    :math:`\sigma z + (1 - \sigma) m`; each MADE reads :math:`h` too
                                    (its first layer), orderings alternate natural / reversed
``sylvester:K(kind=...)``           :math:`K` Sylvester flows [4], ``kind`` ``orthogonal`` (default),
                                    ``householder`` or ``triangular`` (alternating the reversal
                                    permutation); :math:`Q, R, \tilde R, b` linear in :math:`h`
``planar:K``                        :math:`K` planar flows [5]; :math:`u, w, b` linear in :math:`h`
``residual:K``                      :math:`K` invertible residual blocks [6], :math:`h` entering
                                    every layer of the Lipschitz network
``continuous:K``                    :math:`K` continuous flows [7] whose dynamics
                                    :math:`f(z, t, h)` read :math:`h` (FFJORD's amortized posterior)
==================================  ==================================================================

``N`` may be left out: one layer (``householder``: one reflection;
``convex_triangular_linear``: 3 matrices). The registry's aliases work here
too (``convex_triangular:K``, ``ccliniaf:K``). Options are those of the family's
conditional helper in :mod:`pyro_nflows.transforms` (``available_posteriors()``
lists them), e.g. ``"sylvester:4(kind='householder', count_transforms=8)"``,
``"iaf:2(hidden_dims=(320, 320))"``, ``"planar:8(hidden_dims=(100,))"``. By
default every parameter network is a linear map from :math:`h`, as in the
papers; IAF's MADE has two hidden layers of ``max(64, 4 * z_dim)`` units.

The families other than ``householder`` are the package's ``Conditional<X>``
flows built by :func:`pyro_nflows.registry.build_flow`; the Householder chain,
where each vector is computed from the previous one rather than from
:math:`h`, is :class:`HouseholderChain`.

References:

[1] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    Householder Flow. arXiv:1611.09630
[2] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    convex combination linear Inverse Autoregressive Flow. arXiv:1706.02326
[3] Diederik P. Kingma, Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya
    Sutskever, Max Welling. Improving Variational Inference with Inverse
    Autoregressive Flow. arXiv:1606.04934
[4] Rianne van den Berg, Leonard Hasenclever, Jakub M. Tomczak, Max Welling.
    Sylvester Normalizing Flows for Variational Inference. arXiv:1803.05649
[5] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with
    Normalizing Flows. arXiv:1505.05770
[6] Ricky T. Q. Chen, Jens Behrmann, David Duvenaud, Jörn-Henrik Jacobsen.
    Residual Flows for Invertible Generative Modeling. arXiv:1906.02735
[7] Will Grathwohl, Ricky T. Q. Chen, Jesse Bettencourt, Ilya Sutskever,
    David Duvenaud. FFJORD: Free-form Continuous Dynamics for Scalable
    Reversible Generative Models. arXiv:1810.01367
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions.utils import _sum_rightmost

from pyro_nflows.nn.widths import default_hidden_dims
from pyro_nflows.registry import build_flow, canonical_name, parse_spec
from pyro_nflows.transforms.base import ContextParameters, condition_on
from pyro_nflows.transforms.linear import ConditionedHouseholder
from pyro_nflows.validation import check_count

__all__ = [
    "POSTERIORS",
    "AmortizedFlow",
    "ConditionalStack",
    "ConditionedPosterior",
    "HouseholderChain",
    "PosteriorFamily",
    "available_posteriors",
    "build_posterior",
    "parse_posterior",
]


@dataclass(frozen=True)
class PosteriorFamily:
    """A posterior family: its name (a registry flow's name, or ``"gaussian"``)
    and a one-line summary."""

    name: str
    summary: str


POSTERIORS: dict[str, PosteriorFamily] = {
    family.name: family
    for family in [
        PosteriorFamily("gaussian", "diagonal Gaussian, no flow (the plain VAE)"),
        PosteriorFamily(
            "householder", "householder:T - T reflections, v_1 from h, v_{t+1} from v_t (Tomczak & Welling 2016)"
        ),
        PosteriorFamily(
            "convex_triangular_linear",
            "convex_triangular_linear:K (or ccliniaf:K) - ccLinIAF with K matrices (Tomczak & Welling 2017)",
        ),
        PosteriorFamily("iaf", "iaf:K - K gated IAF steps reading h (Kingma et al. 2016)"),
        PosteriorFamily(
            "sylvester",
            "sylvester:K(kind=orthogonal|householder|triangular) - K Sylvester flows (van den Berg et al. 2018)",
        ),
        PosteriorFamily("planar", "planar:K - K planar flows (Rezende & Mohamed 2015)"),
        PosteriorFamily("residual", "residual:K - K invertible residual blocks reading h (Chen et al. 2019)"),
        PosteriorFamily(
            "continuous", "continuous:K - K continuous flows whose dynamics read h (FFJORD, Grathwohl et al. 2019)"
        ),
    ]
}

_NAME = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)")


def available_posteriors() -> str:
    """One line per posterior family: its spec and summary."""
    return "\n".join(f"{family.name:<26} {family.summary}" for family in POSTERIORS.values())


def _unknown(what: str) -> ValueError:
    return ValueError(f"{what}; valid posteriors: {', '.join(POSTERIORS)} (see available_posteriors())")


def parse_posterior(spec: str) -> tuple[str, int | None, dict[str, Any]]:
    """``(family, N or None, options)`` of a posterior spec; ``ValueError`` for
    an unknown family, bad syntax or a combination of families. Families go
    by their registry names (aliases such as ``ccliniaf`` are the registry's).

    >>> parse_posterior("sylvester:4(kind='triangular')")
    ('sylvester', 4, {'kind': 'triangular'})
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _unknown(f"a posterior spec must be a non-empty string such as 'householder:10', got {spec!r}")
    match = _NAME.match(spec)
    if match is None:
        raise _unknown(f"cannot parse the posterior spec {spec!r}")
    written = match[1]
    name = canonical_name(written)
    if name not in POSTERIORS:
        raise _unknown(f"unknown posterior {written!r}")
    if "+" in spec:
        raise ValueError(f"a posterior spec names one family, got {spec!r}")
    rest = spec[match.end() :].strip()
    if name == "gaussian":
        if rest:
            raise ValueError(f"the 'gaussian' posterior takes no count or options, got {spec!r}")
        return name, None, {}
    [(_, count, options)] = parse_spec(name + rest)
    return name, count, options


class AmortizedFlow(nn.Module):
    """Maps the encoder's last hidden layer ``h`` (width ``context_dim``) to
    the list of conditioned transforms of :math:`q(z \\mid x)`."""

    def __init__(self, z_dim: int, context_dim: int):
        super().__init__()
        self.z_dim = check_count("z_dim", z_dim)
        self.context_dim = check_count("context_dim", context_dim)

    def forward(self, h: torch.Tensor) -> list:
        raise NotImplementedError


class ConditionalStack(AmortizedFlow):
    """A stack of the package's conditional flows, each conditioned on ``h``
    (no layers: the Gaussian posterior)."""

    def __init__(self, z_dim: int, context_dim: int, layers: list):
        super().__init__(z_dim, context_dim)
        self.layers = nn.ModuleList(layers)

    def forward(self, h: torch.Tensor) -> list:
        return [layer.condition(h) for layer in self.layers]


class HouseholderChain(AmortizedFlow):
    r"""The Householder flow of Tomczak & Welling [1]: :math:`T` reflections
    whose vectors form a chain,

    .. math:: v_1 = W_1 h + b_1, \qquad v_{t+1} = W_{t+1} v_t + b_{t+1}, \qquad
              z_T = H_T \cdots H_1 z_0, \quad H_t = I - 2 \frac{v_t v_t^\top}{\|v_t\|^2},

    applied as one :class:`~pyro_nflows.transforms.ConditionedHouseholder`
    (two matrix products whatever :math:`T` is). Volume preserving: with
    :math:`T \ge 1` the posterior is a full-covariance Gaussian
    :math:`\mathcal N(U\mu, U \operatorname{diag}\sigma^2 U^\top)`, :math:`U`
    orthogonal.
    """

    def __init__(self, z_dim: int, context_dim: int, count: int = 1):
        super().__init__(z_dim, context_dim)
        check_count("the number of reflections", count)
        self.first = nn.Linear(context_dim, z_dim)
        self.chain = nn.ModuleList(nn.Linear(z_dim, z_dim) for _ in range(count - 1))

    def vectors(self, h: torch.Tensor) -> torch.Tensor:
        """:math:`v_1, \\dots, v_T`, shape ``h.shape[:-1] + (T, z_dim)``."""
        vectors = [self.first(h)]
        for layer in self.chain:
            vectors.append(layer(vectors[-1]))
        return torch.stack(vectors, dim=-2)

    def forward(self, h: torch.Tensor) -> list:
        vectors = ContextParameters(self.vectors, h, module=self)  # recomputed when stale
        return [condition_on(ConditionedHouseholder(self.z_dim, vectors), self, h)]

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, context_dim={self.context_dim}, count={len(self.chain) + 1}"


def _defaults(name: str, z_dim: int) -> dict[str, Any]:
    """Options the papers use where the package's helpers default otherwise."""
    if name == "iaf":
        return {"hidden_dims": default_hidden_dims(z_dim, network="made"), "stable": True}
    if name in ("residual", "continuous"):
        return {}  # their networks read h and z together: the helpers' own widths
    return {"hidden_dims": ()}  # the parameters are linear in h


def build_posterior(spec: str, z_dim: int, context_dim: int) -> AmortizedFlow:
    """The :class:`AmortizedFlow` a posterior spec names, for latents of size
    ``z_dim`` and an encoder whose last hidden layer has ``context_dim`` units.

    >>> flow = build_posterior("planar:2", z_dim=4, context_dim=16)
    >>> [type(t).__name__ for t in flow(torch.randn(3, 16))]
    ['ConditionedPlanar', 'ConditionedPlanar']
    """
    check_count("z_dim", z_dim)
    check_count("context_dim", context_dim)
    name, count, options = parse_posterior(spec)
    if name == "gaussian":
        return ConditionalStack(z_dim, context_dim, [])
    if name == "householder":
        if options:
            raise ValueError(f"the 'householder' posterior takes no options, got {sorted(options)} in {spec!r}")
        return HouseholderChain(z_dim, context_dim, 1 if count is None else count)
    layers = build_flow(spec, z_dim, context_dim, defaults=_defaults(name, z_dim))
    return ConditionalStack(z_dim, context_dim, layers)


class ConditionedPosterior:
    r""":math:`q(z \mid x)` for one batch of :math:`x`: the base Gaussian's
    ``loc`` and ``scale`` (shape ``batch + (z_dim,)``) and the conditioned
    transforms (parameters of batch shape ``batch``)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, transforms: list):
        self.loc = loc
        self.scale = scale
        self.transforms = transforms

    def base(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def distribution(self) -> dist.TransformedDistribution:
        """As a Pyro distribution (batch shape ``batch``, event ``(z_dim,)``),
        for ``pyro.sample`` in a guide: Pyro scores the guide's own sample
        through the transforms' caches, so no inverse is computed."""
        return dist.TransformedDistribution(self.base(), self.transforms)

    def rsample_with_log_prob(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(z, log q(z|x))`` for standard normal ``noise`` of shape
        ``sample_shape + batch + (z_dim,)``: :math:`z_0 = \mu + \sigma \epsilon`
        pushed through the flows, the log-determinants summed on the way."""
        z = self.loc + self.scale * noise
        log_q = self.base().log_prob(z)
        for transform in self.transforms:
            z_next = transform(z)
            log_det = transform.log_abs_det_jacobian(z, z_next)
            log_q = log_q - _sum_rightmost(log_det, 1 - transform.codomain.event_dim)  # element-wise flows
            z = z_next
        return z, log_q
