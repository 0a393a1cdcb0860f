r"""Pyro models whose posteriors are known, for testing and comparing guides.

**Neal's funnel** (Neal 2003 [1]), in 10 dimensions, with nothing observed:

.. math:: y \sim N(0, 3), \qquad x_i \mid y \sim N(0, e^{y/2}), \quad i = 1..9.

The "posterior" is the prior itself, known exactly: the marginal sd of
:math:`y` is 3, and the joint density is normalised, so the log-normaliser
:math:`\log Z` is 0 and the ELBO of any guide :math:`q` is
:math:`-\mathrm{KL}(q \,\|\, p) \le 0`, with 0 for a perfect guide. Its
difficulty is a dependence of scale, not a correlation: the spread of every
:math:`x_i` is set by :math:`y`.

**Eight schools** (Rubin 1981 [2]; Gelman et al. [3], section 5.5), the
effects :math:`y_j` of a coaching programme in eight schools, with known
standard errors :math:`\sigma_j`; *centered*:

.. math:: \mu \sim N(0, 5), \quad \tau \sim \text{HalfCauchy}(5), \quad
          \theta_j \sim N(\mu, \tau), \quad y_j \sim N(\theta_j, \sigma_j),
          \quad j = 1..8,

and *non-centered*, :math:`\tilde\theta_j \sim N(0, 1)` and
:math:`\theta_j = \mu + \tau \tilde\theta_j`. Both give the same joint
distribution of :math:`(\mu, \tau, \theta)`, hence the same posterior: by the
change of variables,
:math:`\log p_c(\mu, \tau, \theta) = \log p_{nc}(\mu, \tau, \tilde\theta) - 8 \log\tau`.
The centered form has a funnel between :math:`\tau` and :math:`\theta`, which
is what makes it a test of a guide (and what makes NUTS diverge on it).

Every model broadcasts over batch dimensions on the left of its sites, so
``Trace_ELBO(vectorize_particles=True)`` and ``Predictive(parallel=True)``
work with it.

Example::

    >>> from pyro.infer.autoguide import AutoNormal
    >>> from pyro_nflows.models import eight_schools, eight_schools_data
    >>> y, sigma = eight_schools_data()
    >>> y.shape, y.dtype
    (torch.Size([8]), torch.float64)
    >>> guide = AutoNormal(eight_schools)
    >>> sorted(guide(y, sigma))
    ['mu', 'tau', 'theta']

References:

[1] Radford M. Neal. Slice sampling. Annals of Statistics 31(3), 2003.
[2] Donald B. Rubin. Estimation in Parallel Randomized Experiments. Journal
    of Educational Statistics 6(4), 1981.
[3] Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki
    Vehtari, Donald B. Rubin. Bayesian Data Analysis, 3rd edition, 2013.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

__all__ = [
    "EIGHT_SCHOOLS_SIGMA",
    "EIGHT_SCHOOLS_Y",
    "eight_schools",
    "eight_schools_data",
    "eight_schools_noncentered",
    "funnel",
]

EIGHT_SCHOOLS_Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
"""The estimated effects :math:`y_j` of the eight schools."""

EIGHT_SCHOOLS_SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)
"""The standard errors :math:`\\sigma_j` of those estimates."""


def funnel() -> None:
    """Neal's funnel in 10 dimensions: ``y ~ N(0, 3)``, then the 9-vector
    ``x ~ N(0, exp(y / 2))`` (one event, site ``"x"``).

    Its log-normaliser is 0, so the ELBO of a guide is minus its KL divergence
    to the true posterior. Written so that particles vectorise: the scale of
    ``x`` is expanded from whatever batch shape ``y`` has.
    """
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    scale = torch.exp(y / 2).unsqueeze(-1).expand(y.shape + (9,))
    pyro.sample("x", dist.Normal(0.0, scale).to_event(1))


def eight_schools_data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The observed effects ``y`` and their standard errors ``sigma``, each of
    shape ``(8,)``, in ``dtype``."""
    return torch.tensor(EIGHT_SCHOOLS_Y, dtype=dtype), torch.tensor(EIGHT_SCHOOLS_SIGMA, dtype=dtype)


def eight_schools(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """The centered eight schools model: sites ``mu``, ``tau``, ``theta`` (in the
    plate ``"schools"`` of ``len(y)``) and the observed ``obs``, in ``y``'s dtype."""
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    """The non-centered eight schools model: the same joint distribution of
    ``(mu, tau, theta)``, with latent ``theta_tilde ~ N(0, 1)`` and the
    deterministic site ``theta = mu + tau * theta_tilde``."""
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("schools", len(y)):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(y.new_tensor(0.0), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)
