r"""Amortized posteriors of Pyro models: neural posterior estimation in one call.

A Pyro model with latent sites :math:`\theta` and observed sites :math:`x`
is a simulator with a prior: running it forward draws
:math:`(\theta_i, x_i) \sim p(\theta)\, p(x \mid \theta)`. Neural posterior
estimation (NPE, Papamakarios & Murray [1]) fits a conditional flow
:math:`q(\theta \mid x)` to such pairs by maximum likelihood. Since

.. math:: \mathbb{E}_{p(\theta, x)}\bigl[-\log q(\theta \mid x)\bigr]
          = \mathbb{E}_{p(x)}\,\mathrm{KL}\bigl(p(\theta \mid x) \,\|\, q(\theta \mid x)\bigr)
            + \text{const},

the minimiser is the posterior itself for every :math:`x` the prior predictive
reaches: one training run gives the posterior of any observation
(*amortized*), with no likelihood evaluation and no run per observation.

:func:`fit_posterior` does the three steps:

1. **Simulate** ``num_simulations`` draws of the prior predictive with Pyro's
   own machinery (:func:`simulate`): the model runs under
   :func:`pyro.poutine.uncondition` (so observed sites are drawn, not
   clamped) inside a :func:`pyro.plate` of ``simulation_batch_size`` draws
   placed left of every batch dimension of the model, and
   :func:`pyro.poutine.trace` records every site, as
   :class:`pyro.infer.Predictive` does with ``parallel=True``.
2. **Pack** each latent site into the unconstrained space with
   :math:`u_s = T_s^{-1}(\theta_s)`, :math:`T_s` = ``biject_to(site.support)``,
   and flatten and concatenate the sites in the model's order into one vector
   :math:`u \in \mathbb{R}^D`, as Pyro's ``AutoContinuous`` guides do (ADVI
   [4]); the observed sites are flattened and concatenated into
   :math:`c \in \mathbb{R}^C`.
3. **Train** a conditional flow :math:`q(u \mid c)` with
   :func:`pyro_nflows.density.fit` (its loop: validation split, early
   stopping with best weights, checkpoints, NaN handling, progress bar); an
   ``embedding=`` module maps the (standardised, flattened) observation to the
   conditioner's input, for structured observations (it may reshape them).

The result, :class:`AmortizedPosterior`, is called on an observation and
returns a :class:`Posterior` whose samples are dicts of site values in their
constrained supports and whose density is that of :math:`\theta`:

.. math:: \log q(\theta \mid x) = \log q(u \mid c)
          - \sum_s \log\bigl\lvert\det \partial T_s(u_s) / \partial u_s\bigr\rvert,
          \qquad u_s = T_s^{-1}(\theta_s).

**Invalid simulations.** A draw whose observation or unconstrained latent is
NaN or infinite is dropped (with a warning that counts them); ``ValueError``
if fewer than 3 remain. Dropping is sound for NPE: the posterior of a finite
observation is unchanged when the draws that give no finite observation are
taken out (sbi's ``exclude_invalid_x`` does the same).

**Requirements on the model.** Continuous latent sites (a discrete one:
``ValueError``; marginalise it or observe it), supports that do not depend on
other sites (as for ``AutoContinuous``; checked), no ``pyro.factor`` (a
simulator cannot draw from a reweighted joint; refused), and, with
``parallel=True``, a model that broadcasts over a batch dimension on the left
of its sites (Pyro's tensor-shape rules, as for ``Predictive(parallel=True)``;
checked site by site, with ``parallel=False`` as the slow way out).

**Cost.** Simulation: ``num_simulations`` model runs in
``ceil(num_simulations / simulation_batch_size)`` vectorised passes (plus one
prototype run). Training: ``fit``'s, ``epochs`` passes over the draws of one
flow evaluation each. Sampling: one flow pass in the sampling direction per
draw, then the support transforms; scoring: the inverse support transforms
and one flow pass. Sequential rounds (SNPE-C / APT [3]) are not implemented.

Example::

    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro_nflows.amortized import fit_posterior
    >>> def model():
    ...     scale = pyro.sample("scale", dist.HalfNormal(1.0))
    ...     with pyro.plate("data", 3):
    ...         pyro.sample("x", dist.Normal(0.0, scale))
    >>> posterior = fit_posterior(model, "x", num_simulations=200, epochs=2, num_layers=1, progress=False, seed=0)
    >>> draws = posterior(torch.tensor([0.5, -1.0, 0.2])).sample((100,))
    >>> draws["scale"].shape, bool((draws["scale"] > 0).all())
    (torch.Size([100]), True)

References:

[1] George Papamakarios, Iain Murray. Fast epsilon-free Inference of
    Simulation Models with Bayesian Conditional Density Estimation. NeurIPS
    2016. arXiv:1605.06376
[2] Jan-Matthis Lueckmann, Pedro J. Goncalves, Giacomo Bassetto, Kaan
    Oecal, Marcel Nonnenmacher, Jakob H. Macke. Flexible statistical
    inference for mechanistic models of neural dynamics. NeurIPS 2017.
    arXiv:1711.01861
[3] David S. Greenberg, Marcel Nonnenmacher, Jakob H. Macke. Automatic
    Posterior Transformation for Likelihood-Free Inference. ICML 2019.
    arXiv:1905.07488
[4] Alp Kucukelbir, Dustin Tran, Rajesh Ranganath, Andrew Gelman, David M.
    Blei. Automatic Differentiation Variational Inference. JMLR 2017.
    arXiv:1603.00788
[5] Jan-Matthis Lueckmann, Jan Boelts, David S. Greenberg, Pedro J.
    Goncalves, Jakob H. Macke. Benchmarking Simulation-Based Inference.
    AISTATS 2021. arXiv:2101.04653
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import biject_to
from torch.distributions.constraints import Constraint
from torch.distributions.transforms import Transform, identity_transform
from tqdm.auto import tqdm

from pyro_nflows import density
from pyro_nflows.validation import check_bool, check_count

__all__ = ["DEFAULT_NUM_SIMULATIONS", "AmortizedPosterior", "Posterior", "fit_posterior", "simulate"]

DEFAULT_NUM_SIMULATIONS = 10_000
MIN_SIMULATIONS = 3  # fit holds out at least one draw for validation and trains on at least two
_PLATE = "_num_simulations"
_NOT_VECTORISED = (
    "the model does not broadcast over a batch dimension on the left of its sites (Pyro's tensor-shape rules: "
    "independent dimensions declared with pyro.plate or .to_event, event dimensions indexed from the right). "
    "Fix the model, or pass parallel=False to run it once per draw (slower)"
)
# fit's arguments that fit_posterior sets itself.
_OWN_ARGUMENTS = {"data", "context", "validation_data", "validation_context", "embedding", "seed", "progress"}


# ---------------------------------------------------------------------------
# Sites and their packing into one flat vector
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """One site: its name, the shape of one draw, and the bijection from the
    unconstrained space onto its support (the identity for observations)."""

    name: str
    shape: torch.Size
    unconstrained_shape: torch.Size
    transform: Transform
    support: object

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)


class _Layout:
    """Sites packed, in order, into one flat vector of ``sum(site.size)`` entries."""

    def __init__(self, sites: Sequence[_Site], what: str):
        self.sites, self.what = tuple(sites), what
        self.size = sum(site.size for site in self.sites)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(site.name for site in self.sites)

    def owner(self, column: int) -> str:
        """The name of the site that column ``column`` of the flat vector belongs to."""
        start = 0
        for site in self.sites:
            if column < start + site.size:
                return site.name
            start += site.size
        raise IndexError(column)

    def values(self, given, who: str) -> dict[str, torch.Tensor]:
        """``given`` (a mapping of site values; a tensor for a layout of one site) as a dict of tensors."""
        if isinstance(given, Mapping):
            missing = [name for name in self.names if name not in given]
            if missing:
                raise ValueError(
                    f"{who}: no value for the {self.what} site(s) {missing}; give all of {list(self.names)}"
                )
            return {name: torch.as_tensor(given[name]) for name in self.names}
        if len(self.sites) > 1:
            raise ValueError(
                f"{who}: the model has {len(self.sites)} {self.what} sites {list(self.names)}: "
                "give a dict of their values"
            )
        return {self.names[0]: torch.as_tensor(given)}

    def batch_shape(self, values: Mapping[str, torch.Tensor], who: str, constrained: bool = True) -> torch.Size:
        """The batch shape in front of the sites' shapes, common to every site (``ValueError`` otherwise)."""
        shapes = []
        for site in self.sites:
            value, shape = values[site.name], site.shape if constrained else site.unconstrained_shape
            if value.dim() < len(shape) or value.shape[value.dim() - len(shape):] != shape:
                raise ValueError(
                    f"{who}: the {self.what} site {site.name!r} has shape {tuple(shape)} (one draw), so its value must "
                    f"have shape (..., {', '.join(map(str, shape))}); got {tuple(value.shape)}"
                )
            shapes.append(value.shape[: value.dim() - len(shape)])
        try:
            return torch.broadcast_shapes(*shapes)
        except RuntimeError:
            raise ValueError(
                f"{who}: the batch shapes of the {self.what} sites do not broadcast: "
                + ", ".join(f"{site.name} {tuple(shape)}" for site, shape in zip(self.sites, shapes))
            ) from None

    def pack(
        self, values: Mapping[str, torch.Tensor], who: str, check_support: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained site values, shapes ``(*B, *site.shape)`` -> the flat unconstrained
        vector ``u``, shape ``(*B, size)``, and ``sum_s log|det dT_s(u_s)/du_s|``, shape ``B``
        (``ValueError`` for a value outside its support, if ``check_support``)."""
        batch = self.batch_shape(values, who)
        first = values[self.sites[0].name]
        parts, log_det = [], torch.zeros(batch, dtype=first.dtype, device=first.device)
        for site in self.sites:
            value = values[site.name]
            if check_support:
                self._check_support(site, value, who)
            value = value.expand(batch + site.shape)
            unconstrained = site.transform.inv(value)
            log_det = log_det + _sum_trailing(site.transform.log_abs_det_jacobian(unconstrained, value), len(batch))
            parts.append(unconstrained.reshape(batch + (-1,)))
        return torch.cat(parts, dim=-1), log_det

    def unpack(self, flat: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The flat unconstrained vector, shape ``(*B, size)`` -> constrained site values,
        shapes ``(*B, *site.shape)``, and ``sum_s log|det dT_s(u_s)/du_s|``, shape ``B``."""
        batch = flat.shape[:-1]
        values, log_det, start = {}, torch.zeros(batch, dtype=flat.dtype, device=flat.device), 0
        for site in self.sites:
            unconstrained = flat[..., start : start + site.size].reshape(batch + site.unconstrained_shape)
            values[site.name] = site.transform(unconstrained)
            log_det = log_det + _sum_trailing(
                site.transform.log_abs_det_jacobian(unconstrained, values[site.name]), len(batch)
            )
            start += site.size
        return values, log_det

    def flatten(self, values: Mapping[str, torch.Tensor], who: str) -> torch.Tensor:
        """Site values as they are (no transform), flattened and concatenated: shape ``(*B, size)``."""
        batch = self.batch_shape(values, who)
        parts = [values[site.name].expand(batch + site.shape).reshape(batch + (-1,)) for site in self.sites]
        return torch.cat(parts, dim=-1)

    def _check_support(self, site: _Site, value: torch.Tensor, who: str) -> None:
        inside = site.support.check(value)
        if not bool(inside.all()):
            raise ValueError(
                f"{who}: {int((~inside).sum())} value(s) of the site {site.name!r} lie outside its support "
                f"{site.support}; the density is defined on the support only"
            )


def _sum_trailing(log_det: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Sum a transform's log-determinant over every dimension after the first ``batch_dims``."""
    return log_det.reshape(log_det.shape[:batch_dims] + (-1,)).sum(-1)


def _latent_site(name: str, site: dict) -> _Site:
    support = site["fn"].support
    if support.is_discrete:
        raise ValueError(
            f"the latent site {name!r} is discrete ({site['fn']}): neural posterior estimation here models "
            "continuous latents; enumerate or marginalise it out of the model, or observe it"
        )
    transform = biject_to(support)
    unconstrained = transform.inv(site["value"])
    return _Site(name, site["value"].shape, unconstrained.shape, transform, support)


def _observed_site(name: str, site: dict) -> _Site:
    shape = site["value"].shape
    return _Site(name, shape, shape, identity_transform, site["fn"].support)


# ---------------------------------------------------------------------------
# Simulation: the prior predictive, through Pyro's handlers
# ---------------------------------------------------------------------------


def _prototype(model: Callable, model_args: tuple, model_kwargs: dict) -> dict[str, dict]:
    """The sample sites of one unconditioned run of the model, in order (subsample sites pruned)."""
    if not callable(model):
        raise ValueError(f"model must be a callable Pyro model, got {type(model).__name__}")
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(*model_args, **model_kwargs)
    trace = prune_subsample_sites(trace)
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample"}


def _nesting(sites: Mapping[str, dict]) -> int:
    """How many batch dimensions the model's sites use: its plates' and its distributions' batch dimensions."""
    dims = [-frame.dim for site in sites.values() for frame in site["cond_indep_stack"] if frame.vectorized]
    return max([0, *dims, *(len(site["fn"].batch_shape) for site in sites.values())])


def _batch_of_draws(model, model_args, model_kwargs, prototype, names, count: int, parallel: bool) -> dict:
    """``count`` draws of the sites ``names``, each of shape ``(count, *site_shape)``."""
    if not parallel:
        draws = [_prototype(model, model_args, model_kwargs) for _ in range(count)]
        return {name: torch.stack([_one_draw(draw, name, prototype) for draw in draws]) for name in names}
    nesting = _nesting(prototype)
    vectorized = pyro.plate(_PLATE, count, dim=-(nesting + 1))(poutine.uncondition(model))
    try:
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(vectorized).get_trace(*model_args, **model_kwargs)
    except (RuntimeError, ValueError, IndexError) as error:
        raise ValueError(
            f"running the model on a vectorised batch of {count} simulations failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}): {_NOT_VECTORISED}"
        ) from error
    values = {}
    for name in names:
        site, shape = trace.nodes[name], prototype[name]["value"].shape
        expected = (count,) + (1,) * (nesting - len(prototype[name]["fn"].batch_shape)) + shape
        if site["value"].shape != expected:
            raise ValueError(
                f"the site {name!r} has shape {tuple(site['value'].shape)} in a vectorised batch of {count} "
                f"simulations, expected {tuple(expected)}: {_NOT_VECTORISED}"
            )
        _check_fixed_support(name, prototype[name]["fn"].support, site["fn"].support)
        values[name] = site["value"].reshape((count,) + shape)
    return values


def _one_draw(draw: dict, name: str, prototype: dict) -> torch.Tensor:
    value, shape = draw[name]["value"], prototype[name]["value"].shape
    if value.shape != shape:
        raise ValueError(f"the site {name!r} changed shape between runs of the model: {tuple(shape)}, then "
                         f"{tuple(value.shape)}; neural posterior estimation needs sites of fixed shapes")
    _check_fixed_support(name, prototype[name]["fn"].support, draw[name]["fn"].support)
    return value


def _check_fixed_support(name: str, first, other) -> None:
    """``ValueError`` if a site's support has other bounds in another run (a support that depends on other sites)."""
    if type(first) is not type(other):
        raise ValueError(f"the support of the site {name!r} changes between runs ({first}, then {other})")
    for key, value in vars(first).items():
        again = vars(other).get(key)
        if isinstance(value, Constraint):
            _check_fixed_support(name, value, again)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, Constraint) for v in value):
            for part, other_part in zip(value, again):
                _check_fixed_support(name, part, other_part)
        elif not _same(value, again):
            raise ValueError(
                f"the support of the site {name!r} ({first}) depends on other sites of the model: its {key} changes "
                "from draw to draw. Reparametrise the model so that the site's support is fixed (say, "
                "u ~ Uniform(0, 1) and a deterministic low + (high - low) * u)"
            )


def _same(value, again) -> bool:
    """Whether two attributes of a constraint (bounds: numbers or tensors) are equal everywhere."""
    if isinstance(value, torch.Tensor) or isinstance(again, torch.Tensor):
        try:
            return bool((torch.as_tensor(value) == torch.as_tensor(again)).all())
        except RuntimeError:  # shapes that do not broadcast
            return False
    return value == again


def simulate(
    model: Callable,
    num_simulations: int,
    *,
    sites: Sequence[str] | None = None,
    model_args: tuple = (),
    model_kwargs: Mapping | None = None,
    simulation_batch_size: int = 1000,
    parallel: bool = True,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Draw ``num_simulations`` times from the prior predictive of ``model``.

    The model runs under :func:`pyro.poutine.uncondition` (observed sites are
    drawn from their distributions) and :func:`pyro.poutine.trace`, with
    ``parallel=True`` inside a :func:`pyro.plate` of ``simulation_batch_size``
    draws left of every batch dimension of the model, as
    ``Predictive(parallel=True)`` runs it; with ``parallel=False`` once per
    draw. Runs under ``torch.no_grad``; a progress bar counts the draws.

    :param sites: the sites to return (default: every sample site, including
        ``pyro.deterministic`` ones).
    :returns: ``{name: tensor of shape (num_simulations, *site_shape)}``, the
        site shapes of one run of the model.

    ``ValueError`` if a site does not exist, if the model does not broadcast
    over the simulation batch (a site of the wrong shape), or if a site's
    support depends on other sites.

    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", 4):
    ...         pyro.sample("x", dist.Normal(mu, 1.0), obs=torch.zeros(4))
    >>> {name: tuple(value.shape) for name, value in simulate(model, 10, progress=False).items()}
    {'mu': (10,), 'x': (10, 4)}
    """
    check_count("num_simulations", num_simulations)
    check_count("simulation_batch_size", simulation_batch_size)
    check_bool("parallel", parallel)
    model_kwargs = dict(model_kwargs or {})
    prototype = _prototype(model, tuple(model_args), model_kwargs)
    names = list(prototype) if sites is None else list(sites)
    unknown = [name for name in names if name not in prototype]
    if unknown:
        raise ValueError(f"the model has no sample site(s) {unknown}; its sample sites are {list(prototype)}")
    batches = []
    with tqdm(total=num_simulations, desc="simulating", unit="draw", disable=not progress) as bar:
        for start in range(0, num_simulations, simulation_batch_size):
            count = min(simulation_batch_size, num_simulations - start)
            batches.append(_batch_of_draws(model, tuple(model_args), model_kwargs, prototype, names, count, parallel))
            bar.update(count)
    return {name: torch.cat([batch[name] for batch in batches]) for name in names}


# ---------------------------------------------------------------------------
# The posterior
# ---------------------------------------------------------------------------


class Posterior:
    """The amortized posterior :math:`q(\\theta \\mid x)` for given observations,
    returned by calling an :class:`AmortizedPosterior`.

    ``batch_shape`` is the observations' batch shape (``()`` for one
    observation). :meth:`sample` draws dicts of site values in their supports;
    :meth:`log_prob` scores them, the support transforms' log-Jacobian
    included; :attr:`unconstrained` is the flow over the packed unconstrained
    vector :math:`u` as a Pyro distribution (``event_shape == (D,)``).
    Values are float32, the flow's precision.
    """

    def __init__(self, model: density.DensityModel, layout: _Layout, context: torch.Tensor):
        self._model, self._layout, self._context = model, layout, context
        self.batch_shape = context.shape[:-1]

    @property
    def unconstrained(self) -> dist.TransformedDistribution:
        """:math:`q(u \\mid x)` as a Pyro distribution, batch shape :attr:`batch_shape`."""
        return self._model.distribution(self._context)

    @property
    def sites(self) -> tuple[str, ...]:
        """The latent sites, in the model's order."""
        return self._layout.names

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | Sequence[int] = ()) -> dict[str, torch.Tensor]:
        """Draws ``{site: tensor of shape (*sample_shape, *batch_shape, *site_shape)}``, each
        site in its support: :math:`u \\sim q(u \\mid x)`, then :math:`\\theta_s = T_s(u_s)`."""
        flat = self.unconstrained.sample(torch.Size(sample_shape))
        return self._layout.unpack(flat)[0]

    def log_prob(self, value: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:math:`\\log q(\\theta \\mid x) = \\log q(u \\mid x) - \\sum_s \\log|\\det \\partial T_s / \\partial u_s|`
        for site values of shapes ``(..., *site_shape)`` whose batch broadcasts against
        :attr:`batch_shape`; shape: the broadcast batch. ``ValueError`` for a missing site,
        a value of the wrong shape or one outside its site's support."""
        values = {name: tensor.to(self._context) for name, tensor in self._layout.values(value, "log_prob").items()}
        flat, log_det = self._layout.pack(values, "Posterior.log_prob")
        batch = torch.broadcast_shapes(flat.shape[:-1], self.batch_shape)
        return self._model.log_prob(flat.expand(batch + flat.shape[-1:]), self._context) - log_det.to(flat)


class AmortizedPosterior(nn.Module):
    """An amortized posterior of a Pyro model: ``posterior(observation)`` is
    the :class:`Posterior` given that observation (made by :func:`fit_posterior`).

    :param model: the conditional flow :math:`q(u \\mid c)` over the packed
        unconstrained latents given the flattened observations.
    :param latent: the layout of the latent sites; ``observed``: of the observed ones.

    The observation is a tensor for a model with one observed site (shape
    ``(*B, *site_shape)``), a dict of them for several; ``B`` is the batch of
    observations (``()`` for one). Attributes: ``latent_sites``,
    ``observed_sites``, ``density`` (the :class:`~pyro_nflows.density.DensityModel`)
    and ``history`` (its training curves).
    """

    def __init__(self, model: density.DensityModel, latent: _Layout, observed: _Layout):
        super().__init__()
        self.density, self._latent, self._observed = model, latent, observed
        self.history = getattr(model, "history", None)

    @property
    def latent_sites(self) -> tuple[str, ...]:
        return self._latent.names

    @property
    def observed_sites(self) -> tuple[str, ...]:
        return self._observed.names

    def forward(self, observation) -> Posterior:
        """The :class:`Posterior` given ``observation``."""
        values = self._observed.values(observation, "AmortizedPosterior")
        context = self._observed.flatten(values, "AmortizedPosterior")
        return Posterior(self.density, self._latent, context.to(self.density.loc))


# ---------------------------------------------------------------------------
# fit_posterior
# ---------------------------------------------------------------------------


def _names(observed) -> list[str]:
    names = [observed] if isinstance(observed, str) else list(observed) if isinstance(observed, Sequence) else None
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"observed must name the observed site(s): a site name or a list of them, got {observed!r}")
    return names


def _layouts(prototype: dict, observed: list[str], latent: Sequence[str] | None) -> tuple[_Layout, _Layout]:
    """The layouts of the latent and the observed sites, checked against the model's sites."""
    missing = [name for name in observed if name not in prototype]
    if missing:
        raise ValueError(
            f"the model has no sample site(s) {missing} to observe; its sample sites are {list(prototype)}"
        )
    factors = [name for name, site in prototype.items() if isinstance(site["fn"], dist.Unit)]
    if factors:
        raise ValueError(
            f"the model has pyro.factor site(s) {factors}: a factor reweights the joint density, which a draw from "
            "the prior predictive cannot do; neural posterior estimation needs a model that only samples"
        )
    candidates = [name for name, site in prototype.items() if name not in observed
                  and not site["infer"].get("was_observed") and not site["infer"].get("_deterministic")]
    if latent is None:
        latent = candidates
    else:
        latent = [latent] if isinstance(latent, str) else list(latent)
        wrong = [name for name in latent if name not in candidates]
        if wrong:
            raise ValueError(f"{wrong} are not latent sites of the model (sample sites that are not observed, "
                             f"nor deterministic); its latent sites are {candidates}")
    if not latent:
        raise ValueError(
            f"the model has no latent sites (sample sites that are not observed; its sample sites are "
            f"{list(prototype)}, observed {observed}): there is no posterior to estimate"
        )
    latent_layout = _Layout([_latent_site(name, prototype[name]) for name in latent], "latent")
    return latent_layout, _Layout([_observed_site(name, prototype[name]) for name in observed], "observed")


def _training_rows(simulations: Mapping, latent: _Layout, observed: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed latents and flattened observations of the valid draws (non-finite ones dropped, with a warning)."""
    who = "fit_posterior(simulations=...)"
    theta = latent.pack(latent.values(simulations, who), who, check_support=False)[0]
    x = observed.flatten(observed.values(simulations, who), who)
    if theta.dim() != 2 or x.dim() != 2 or len(theta) != len(x):
        raise ValueError(f"{who}: every site needs one leading dimension of draws, the same for all; got latents "
                         f"{tuple(theta.shape[:-1])} and observations {tuple(x.shape[:-1])} draws")
    x = x if x.is_floating_point() else x.to(torch.get_default_dtype())
    valid = torch.isfinite(theta).all(-1) & torch.isfinite(x).all(-1)
    dropped = int((~valid).sum())
    if len(valid) - dropped < MIN_SIMULATIONS:
        raise ValueError(f"fit_posterior: only {len(valid) - dropped} of {len(valid)} simulations are finite; at least "
                         f"{MIN_SIMULATIONS} are needed (to train on 2 and validate on 1)")
    if dropped:
        warnings.warn(
            f"fit_posterior: dropped {dropped} of {len(valid)} simulations whose observation or unconstrained latent "
            "is NaN or infinite; the posterior is trained on the others", RuntimeWarning, stacklevel=3
        )
    theta, x = theta[valid], x[valid]
    constant = torch.nonzero(theta.std(0) == 0).flatten().tolist()
    if constant:
        raise ValueError(f"the latent site(s) {sorted({latent.owner(c) for c in constant})} take one value in every "
                         "simulation: there is nothing to infer about them; leave them out with latent=[...]")
    return theta, x


def _check_fit_options(options: dict) -> None:
    accepted = set(inspect.signature(density.fit).parameters) - _OWN_ARGUMENTS
    wrong = sorted(set(options) - accepted)
    if wrong:
        raise ValueError(f"fit_posterior got unexpected arguments {wrong}; it passes these on to "
                         f"pyro_nflows.density.fit: {sorted(accepted)}")


def fit_posterior(
    model: Callable,
    observed: str | Sequence[str],
    num_simulations: int | None = None,
    *,
    latent: Sequence[str] | None = None,
    model_args: tuple = (),
    model_kwargs: Mapping | None = None,
    simulations: Mapping[str, torch.Tensor] | None = None,
    simulation_batch_size: int = 1000,
    parallel: bool = True,
    embedding: nn.Module | None = None,
    seed: int | None = None,
    progress: bool = True,
    **fit_options,
) -> AmortizedPosterior:
    """Neural posterior estimation: simulate the prior predictive of ``model``,
    train a conditional flow :math:`q(\\theta \\mid x)` on the draws, and return
    the :class:`AmortizedPosterior` (see the module docstring for the maths).

    :param model: a Pyro model; called as ``model(*model_args, **model_kwargs)``.
    :param observed: the name of the observed site, or a list of names; their
        values are flattened and concatenated into the flow's context. Sites
        observed in the model (``obs=...``) are drawn all the same
        (:func:`pyro.poutine.uncondition`); a ``pyro.deterministic`` site
        (a summary statistic) may be observed.
    :param num_simulations: the simulation budget (default
        :data:`DEFAULT_NUM_SIMULATIONS`); at least 3. ``fit`` holds out its
        ``validation_fraction`` for early stopping.
    :param latent: the latent sites to infer (default: every sample site that
        is neither observed nor deterministic); the others are marginalised.
    :param simulations: draws made already, ``{site: (n, *site_shape)}`` as
        :func:`simulate` returns them (with every latent and observed site);
        then nothing is simulated and ``num_simulations`` must be ``None``.
    :param simulation_batch_size: draws per vectorised run of the model.
    :param parallel: vectorise the simulation (see :func:`simulate`).
    :param embedding: a module mapping the standardised, flattened observation
        ``(n, C)`` to the conditioner's input ``(n, E)``, trained jointly.
    :param seed: seeds the simulation and the training.
    :param fit_options: passed to :func:`pyro_nflows.density.fit`: ``flow``,
        ``num_layers``, ``hidden_dims``, ``epochs``, ``batch_size``, ``lr``,
        ``patience``, ``checkpoint``, ...

    ``ValueError`` for a model without latent sites, an observed or latent
    site that the model does not have, a discrete latent site, a
    ``pyro.factor``, a budget under 3, fewer than 3 finite simulations, a
    latent site that never varies, and arguments ``fit`` does not take.

    >>> import pyro, pyro.distributions as dist, torch
    >>> def model():
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     pyro.sample("x", dist.Normal(mu, 0.5))
    >>> posterior = fit_posterior(model, "x", 300, epochs=2, num_layers=1, progress=False, seed=0)
    >>> posterior.latent_sites, posterior(torch.tensor(0.3)).log_prob({"mu": torch.zeros(5)}).shape
    (('mu',), torch.Size([5]))
    """
    names = _names(observed)
    check_count("simulation_batch_size", simulation_batch_size)
    _check_fit_options(fit_options)
    model_args, model_kwargs = tuple(model_args), dict(model_kwargs or {})
    if seed is not None:
        torch.manual_seed(seed)
    prototype = _prototype(model, model_args, model_kwargs)
    latent_layout, observed_layout = _layouts(prototype, names, latent)
    if simulations is None:
        budget = DEFAULT_NUM_SIMULATIONS if num_simulations is None else num_simulations
        check_count("num_simulations", budget, minimum=MIN_SIMULATIONS)
        simulations = simulate(
            model, budget, sites=[*latent_layout.names, *observed_layout.names], model_args=model_args,
            model_kwargs=model_kwargs, simulation_batch_size=simulation_batch_size, parallel=parallel,
            progress=progress,
        )
    elif num_simulations is not None:
        raise ValueError("give num_simulations (to simulate) or simulations (draws made already), not both")
    theta, x = _training_rows(simulations, latent_layout, observed_layout)
    trained = density.fit(theta, context=x, embedding=embedding, seed=seed, progress=progress, **fit_options)
    return AmortizedPosterior(trained, latent_layout, observed_layout)
