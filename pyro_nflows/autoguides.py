r"""Normalizing flows inside Pyro autoguides.

:class:`AutoFlow` is a drop-in Pyro autoguide (an
:class:`~pyro.infer.autoguide.AutoContinuous`, like
:class:`~pyro.infer.autoguide.AutoMultivariateNormal`) whose posterior over
all latent sites, packed into one unconstrained vector :math:`z \in
\mathbb{R}^D` as in ADVI [1], is a learnable diagonal Gaussian pushed through
a flow :math:`F` (any stack of the package's transforms, or Pyro's):

.. math:: \epsilon \sim N(0, I_D), \qquad u = \sigma \odot \epsilon, \qquad
          z = \mu + F(u), \qquad
          \log q(z) = \log N(u; 0, \operatorname{diag}\sigma^2)
                      - \log\lvert\det \partial F / \partial u\rvert .

Each site's value is then ``biject_to(site.support)`` of its slice of
:math:`z` (Pyro's ``AutoContinuous`` machinery: constrained supports, plates,
vectorised particles, :class:`~pyro.infer.Predictive`).

**Where the location goes.** The scale :math:`\sigma` acts before the flow
and the location :math:`\mu` after it. So the flow works on centred inputs
whatever the magnitude of the latents, and ``init_loc_fn`` really places the
initial posterior: :math:`\mu` starts at the unconstrained image of the
``init_loc_fn`` values and, for a flow with :math:`F(0) = 0` (Householder,
LinIAF/ccLinIAF, planar; IAF up to its small initial output), that is the
initial posterior median. (With the location first, :math:`z = F(\mu +
\sigma\odot\epsilon)`, a Householder flow would start centred on a random
rotation of the initial point.) The family of distributions is the same
either way: a shift of :math:`F`'s input is absorbed by its parameters, and a
shift of its output by :math:`\mu`.

**Where the scale goes** (``scale_position``). By default :math:`\sigma` acts
before the flow, as above: the only order in which an affine flow is more
than a diagonal Gaussian (a rotation of :math:`N(0, I)` is :math:`N(0, I)`,
so a Householder flow after the scale would do nothing). With
``scale_position="after"``,

.. math:: z = \mu + \sigma \odot F(\epsilon),

the flow always sees a standard normal, whatever the scales of the latents,
and its changes are relative to each coordinate's scale. For planar and
Sylvester flows, whose layers are constrained in the coordinates they act in
(:math:`w^\top \hat u > -1`, an orthonormal :math:`Q`), the two orders are
different families; on Neal's funnel the planar and Sylvester guides do
better with the scale after the flow (measured:
benchmarks/README.md#guide-scale-position), which is not yet their default.

Compared with Pyro's ``AutoNormalizingFlow`` / ``AutoIAFNormal``, the base is
learnable (not a fixed standard normal), ``init_loc_fn`` is honoured,
:meth:`~AutoFlow.median` and :meth:`~AutoFlow.quantiles` exist (closed form
for affine flows, by sampling otherwise), a flow given as a plain list of
modules is registered and trained, and every parameter is registered once.

Named guides for the usual posteriors: :class:`AutoHouseholder` [4],
:class:`AutoIAF` [3], :class:`AutoSylvester` [6], :class:`AutoPlanar` [2],
:class:`AutoConvexTriangular` [5].

Example::

    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> def model():
    ...     y = pyro.sample("y", dist.Normal(0.0, 3.0))
    ...     pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)).expand([9]).to_event(1))
    >>> guide = AutoFlow(model, flow="householder:10+iaf:2")
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    >>> loss = svi.step()
    >>> sorted(guide.median())
    ['x', 'y']

**Parameters and the param store.** Like every Pyro autoguide, the guide's
parameters live in Pyro's param store under the guide's name
(``AutoFlow.loc``, ``AutoFlow.scale``, ``AutoFlow.flows$$$0.made...``), each
exactly once. When the store already holds a parameter of that name (after
``pyro.get_param_store().load(...)``, or from an earlier guide of the same
name), the guide adopts the stored tensor, for the flow as for the
location and scale, so that what the optimiser updates is what the guide
computes with; call :func:`pyro.clear_param_store` between unrelated guides.
The store holds parameters only: flows with buffers that are not fixed by
their construction (``lu_linear``'s random permutation, ``actnorm``'s
initialisation flag, ``permute``) round-trip through ``state_dict`` (or
``torch.save(guide)``), not through the param store.

References:

[1] Alp Kucukelbir, Dustin Tran, Rajesh Ranganath, Andrew Gelman, David M.
    Blei. Automatic Differentiation Variational Inference. JMLR 2017.
    arXiv:1603.00788
[2] Danilo Jimenez Rezende, Shakir Mohamed. Variational Inference with
    Normalizing Flows. ICML 2015. arXiv:1505.05770
[3] Diederik P. Kingma, Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya
    Sutskever, Max Welling. Improving Variational Inference with Inverse
    Autoregressive Flow. NeurIPS 2016. arXiv:1606.04934
[4] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    Householder Flow. arXiv:1611.09630
[5] Jakub M. Tomczak, Max Welling. Improving Variational Auto-Encoders using
    convex combination linear Inverse Autoregressive Flow. arXiv:1706.02326
[6] Rianne van den Berg, Leonard Hasenclever, Jakub M. Tomczak, Max Welling.
    Sylvester Normalizing Flows for Variational Inference. UAI 2018.
    arXiv:1803.05649
[7] Matthew Hoffman, Pavel Sountsov, Joshua V. Dillon, Ian Langmore, Dustin
    Tran, Srinivas Vasudevan. NeuTra-lizing Bad Geometry in Hamiltonian Monte
    Carlo Using Neural Transport. arXiv:1903.03704
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import Permute
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn.module import PyroParam
from pyro.params.param_store import param_with_module_name
from torch import nn
from torch.distributions import biject_to
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    IndependentTransform,
    Transform,
)

from pyro_nflows.registry import build_flow, parse_spec
from pyro_nflows.transforms.elementwise import ActNorm, ElementwiseAffine
from pyro_nflows.transforms.linear import (
    ConvexTriangularLinear,
    Householder,
    LULinear,
    QRLinear,
    TriangularLinear,
    check_count_matrices,
)
from pyro_nflows.transforms.sylvester_flow import KINDS as SYLVESTER_KINDS
from pyro_nflows.validation import check_bool, check_count, check_hidden_dims, check_positive

__all__ = [
    "AutoConvexTriangular",
    "AutoFlow",
    "AutoHouseholder",
    "AutoIAF",
    "AutoPlanar",
    "AutoSylvester",
]

FlowFactory = Callable[[int], Union[Transform, Sequence[Transform]]]
FlowArg = Union[str, Sequence[Transform], FlowFactory]

# Transforms that are affine maps y = A x + b with no data-dependent state:
# a Gaussian stays Gaussian through them, so median/quantiles have a closed form.
_AFFINE_TYPES = (Householder, TriangularLinear, ConvexTriangularLinear, LULinear, QRLinear, ElementwiseAffine, Permute)
# Where the diagonal scale acts, relative to the flow (AutoFlow's scale_position).
SCALE_POSITIONS = ("before", "after")


def _is_affine(transform: Transform) -> bool:
    return isinstance(transform, _AFFINE_TYPES) and not isinstance(transform, ActNorm)


def _elementwise_sign(transform: Transform):
    """``+1``/``-1`` (a number or a tensor) when ``transform`` maps each
    coordinate on its own (monotone, as every ``biject_to`` transform is);
    ``None`` when it mixes coordinates (simplex, ordered vectors, Cholesky
    factors, ...) or does not say which way it goes."""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    if transform.domain.event_dim != 0 or transform.codomain.event_dim != 0:
        return None
    try:
        return transform.sign
    except NotImplementedError:
        return None


def _as_transform_list(flow, where: str) -> list[Transform]:
    """``flow`` (one transform or a sequence of them) as a checked list."""
    items = [flow] if isinstance(flow, Transform) else flow
    if isinstance(items, (str, bytes)) or not isinstance(items, (Sequence, nn.ModuleList)):
        raise TypeError(f"{where} must be a Transform or a list of Transforms, got {type(flow).__name__}")
    items = list(items)
    for index, item in enumerate(items):
        if isinstance(item, ConditionalTransformModule):
            raise TypeError(
                f"{where}[{index}] is a conditional transform ({type(item).__name__}); an autoguide has no "
                "context to condition it on: use the unconditional version (e.g. iaf instead of conditional_iaf)"
            )
        if not isinstance(item, Transform):
            raise TypeError(f"{where}[{index}] must be a torch Transform, got {type(item).__name__}")
        if item.domain.event_dim > 1:
            raise ValueError(
                f"{where}[{index}] ({type(item).__name__}) acts on events of dimension {item.domain.event_dim}; "
                "an autoguide's latent is one vector, so its transforms must act on vectors"
            )
    return items


def _declared_input_dim(transform: Transform) -> int | None:
    """The event size a transform says it takes, where it says so."""
    for owner in (transform, getattr(transform, "arn", None), getattr(transform, "nn", None)):
        size = getattr(owner, "input_dim", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


def _arguments_signature(args: tuple, kwargs: dict) -> tuple:
    """What of a model's arguments can change its latent sites' shapes: the
    shapes of tensors, the lengths of sequences, and plain numbers and strings."""

    def one(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape))
        if isinstance(value, (bool, int, float, str)) or value is None:
            return ("value", value)
        if isinstance(value, (list, tuple)):
            return ("sequence", len(value))
        return ("object", type(value).__name__)

    return tuple(one(value) for value in args), tuple(sorted((key, one(value)) for key, value in kwargs.items()))


def _latent_shapes(trace) -> dict[str, tuple[int, ...]]:
    """The shapes of a model trace's latent sample sites, by name."""
    return {name: tuple(site["value"].shape) for name, site in trace.iter_stochastic_nodes()}


class AutoFlow(AutoContinuous):
    r"""A Pyro autoguide whose posterior is a learnable diagonal Gaussian
    followed by a normalizing flow, over all latent sites at once:

    .. math:: z = \mu + F(\sigma \odot \epsilon), \quad \epsilon \sim N(0, I_D),
              \qquad \text{site values} = \text{biject\_to}(\text{support})(z_{\text{site}}),

    :math:`\mu` initialised by ``init_loc_fn`` (mapped to the unconstrained
    space), :math:`\sigma = \operatorname{softplus}(\cdot)` initialised to
    ``init_scale``, :math:`F` the flow (see the module docstring for why the
    location comes after it).

    :param model: a Pyro model whose latent sites are all continuous.
    :param flow: the flow :math:`F`, one of

        - a spec string for :func:`pyro_nflows.build_flow`, such as
          ``"householder:4+iaf:2"``, built once the latent dimension :math:`D`
          is known (at the first call); a bad spec raises the registry's
          ``ValueError`` here;
        - a callable ``flow(D)`` returning a transform or a list of them,
          called at the first call;
        - a list of transforms (modules or parameter-free transforms such as
          Pyro's ``Permute``) of input dimension :math:`D`; a different
          declared dimension raises ``ValueError`` at the first call. An empty
          list gives a diagonal Gaussian.

        Modules are registered as submodules (``guide.flows``, an
        :class:`~torch.nn.ModuleList`), so their parameters are trained, saved
        by ``state_dict`` and registered in the param store once each. Flows
        built here (spec or callable) are moved to the dtype and device of
        the model's latents.
    :param init_loc_fn: Pyro's per-site initialisation (default
        :func:`~pyro.infer.autoguide.initialization.init_to_median`).
    :param init_scale: initial :math:`\sigma` (a positive number).
    :param scale_position: ``"before"`` the flow (default),
        :math:`z = \mu + F(\sigma \odot \epsilon)`, or ``"after"`` it,
        :math:`z = \mu + \sigma \odot F(\epsilon)` (see the module docstring).

    :meth:`get_posterior` returns the posterior over :math:`z` as a
    :class:`~pyro.distributions.TransformedDistribution`;
    :meth:`get_base_dist` (:math:`N(0, I)`) and :meth:`get_transform`
    (:math:`\epsilon \mapsto \mu + F(\sigma\odot\epsilon)`) give the same
    posterior in the form :class:`~pyro.infer.reparam.NeuTraReparam` [7] uses.

    Example::

        >>> from pyro.infer import Predictive
        >>> def model(data):
        ...     scale = pyro.sample("scale", dist.HalfNormal(1.0))
        ...     with pyro.plate("data", len(data)):
        ...         pyro.sample("obs", dist.Normal(0.0, scale), obs=data)
        >>> pyro.clear_param_store()  # parameters live in the store under the guide's name
        >>> guide = AutoFlow(model, flow="iaf:2", init_scale=0.05)
        >>> samples = Predictive(model, guide=guide, num_samples=5)(torch.randn(4))
        >>> samples["scale"].shape  # Predictive keeps the data plate's dimension
        torch.Size([5, 1])
    """

    scale_constraint = constraints.softplus_positive

    def __init__(
        self,
        model: Callable,
        flow: FlowArg,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        scale_position: str = "before",
    ):
        init_scale = check_positive("init_scale", init_scale)
        if scale_position not in SCALE_POSITIONS:
            raise ValueError(f"scale_position must be one of {SCALE_POSITIONS}, got {scale_position!r}")
        transforms = None
        if isinstance(flow, str):
            parse_spec(flow)  # a bad spec fails now, with the registry's message
        elif isinstance(flow, (Transform, Sequence, nn.ModuleList)):
            transforms = _as_transform_list(flow, "flow")
        elif not callable(flow):
            raise TypeError(
                "flow must be a spec string such as 'householder:4+iaf:2', a list of transforms, "
                f"or a callable latent_dim -> transforms; got {type(flow).__name__}"
            )
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._init_scale = init_scale
        self.scale_position = scale_position
        self._flow = None if transforms is not None else flow
        self._set_flows(transforms or [])

    def _set_flows(self, transforms: list[Transform], like: torch.Tensor | None = None) -> None:
        """Hold ``transforms`` (moved to ``like``'s dtype and device, if given)
        as the flow, before anything registers their parameters."""
        modules = nn.ModuleList([t for t in transforms if isinstance(t, nn.Module)])
        if like is not None:
            modules.to(device=like.device, dtype=like.dtype)
        self._stack = tuple(transforms)
        self.flows = modules

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        self._latent_signature = (_arguments_signature(args, kwargs), _latent_shapes(self.prototype_trace))
        init_loc = self._init_loc()
        dim = self.latent_dim
        if self._flow is not None:
            if isinstance(self._flow, str):
                built = build_flow(self._flow, dim)
            else:
                built = _as_transform_list(self._flow(dim), f"the transforms flow({dim}) returned")
            self._set_flows(built, like=init_loc)
        for index, transform in enumerate(self._stack):
            declared = _declared_input_dim(transform)
            if declared is not None and declared != dim:
                raise ValueError(
                    f"flow[{index}] ({type(transform).__name__}) takes vectors of size {declared}, "
                    f"but the model's latent dimension is {dim} (all latent sites, unconstrained and flattened)"
                )
        self.loc = PyroParam(init_loc, constraints.real)
        self.scale = PyroParam(torch.full_like(init_loc, self._init_scale), self.scale_constraint)
        for name in ("loc", "scale"):
            # PyroModule takes a value already in the param store, whatever its shape.
            value = getattr(self, name)
            if value.shape != init_loc.shape:
                raise ValueError(
                    f"the param store holds {self._pyro_get_fullname(name)!r} with shape {tuple(value.shape)}, "
                    f"but this guide's latent dimension is {dim}; call pyro.clear_param_store() before "
                    "building a different guide of the same name"
                )
        self._flow_stack()  # registers the flow's parameters now, as loc and scale are

    def forward(self, *args, **kwargs):
        if self.prototype_trace is not None:
            self._check_latents_unchanged(args, kwargs)
        return super().forward(*args, **kwargs)

    def _check_latents_unchanged(self, args: tuple, kwargs: dict) -> None:
        """When the model's arguments change shape, run the model again and
        refuse latent sites other than the ones this guide was built for
        (say, a plate over data of another size); ``ValueError`` naming them."""
        signature, shapes = self._latent_signature
        new_signature = _arguments_signature(args, kwargs)
        if new_signature == signature:
            return
        trace = poutine.block(poutine.trace(poutine.block(self.model, self._prototype_hide_fn)).get_trace)(
            *args, **kwargs
        )
        # Only the guide's own sites: one observed when the guide was built and
        # latent now (Predictive(model, guide)(x) without y) is the model's to sample, as in Pyro.
        new_shapes = {name: shape for name, shape in _latent_shapes(trace).items() if name in shapes}
        if new_shapes != shapes:
            raise ValueError(
                f"{type(self).__name__} was built for the latent sites {shapes} (name: shape), but the model "
                f"called with these arguments has {new_shapes}: build a new guide for it (after "
                "pyro.clear_param_store())"
            )
        self._latent_signature = (new_signature, shapes)

    # -- the posterior ------------------------------------------------------

    def _flow_stack(self) -> list[Transform]:
        """The flow's transforms, their parameters registered with (and, where
        the store already holds them, taken from) Pyro's param store."""
        flows = self.flows  # inside the guide's call, PyroModule registers the parameters here
        if self._pyro_context.active and not pyro.settings.get("module_local_params"):
            self._adopt_stored_parameters(flows)
        return list(self._stack)

    def _adopt_stored_parameters(self, flows: nn.ModuleList) -> None:
        """Make every flow parameter *the* tensor the param store holds under
        its name, so that the optimiser (which updates the store's tensors)
        trains what the guide computes with. PyroModule does this for
        ``loc`` and ``scale``; for a plain ``nn.Module`` it registers the
        module's own tensors but never takes the store's."""
        store = pyro.get_param_store()
        prefix = self._pyro_get_fullname("flows")
        for module_name, module in flows.named_modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                fullname = param_with_module_name(prefix, f"{module_name}.{name}" if module_name else name)
                if fullname not in store:
                    continue
                stored = store[fullname].unconstrained()
                if stored is param:
                    continue
                if stored.shape != param.shape or stored.dtype != param.dtype:
                    raise ValueError(
                        f"the param store holds {fullname!r} with shape {tuple(stored.shape)} and dtype "
                        f"{stored.dtype}, but this guide's flow has shape {tuple(param.shape)} and dtype "
                        f"{param.dtype}; call pyro.clear_param_store() before building a different guide "
                        "of the same name"
                    )
                module._parameters[name] = stored

    def get_posterior(self, *args, **kwargs) -> dist.TransformedDistribution:
        r"""The posterior over the unconstrained latent vector :math:`z`:
        ``TransformedDistribution(get_base_dist(), [scale by sigma, *flows, shift by loc])``
        (``[*flows, scale, shift]`` with ``scale_position="after"``),
        the map :meth:`get_transform` gives (the one NeuTra uses). When every
        transform of the flow is affine the posterior is Gaussian, and its
        ``mean``, ``variance`` and ``covariance_matrix`` are given in closed form."""
        # cache_size=1: scoring the guide's own sample hands each transform back
        # its own output, so no flow ever runs its (possibly sequential or
        # numerical) inverse during training.
        stack = self._flow_stack()
        transforms = self._around(stack, cache_size=1)
        if not all(_is_affine(t) for t in stack):
            return dist.TransformedDistribution(self.get_base_dist(), transforms)
        posterior = _GaussianPosterior(self.get_base_dist(), transforms)
        posterior.moments = self._moments
        return posterior

    @property
    def transform(self) -> Transform:
        """The map from :meth:`get_base_dist` to :math:`z`, as Pyro's
        ``AutoNormalizingFlow.transform`` (the same as :meth:`get_transform`)."""
        return self.get_transform()

    def get_base_dist(self) -> dist.Distribution:
        """:math:`N(0, I_D)`, the base of :meth:`get_transform`."""
        loc = self.loc
        return dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)

    def get_transform(self, *args, **kwargs) -> Transform:
        r""":math:`\epsilon \mapsto \mu + F(\sigma \odot \epsilon)` (or
        :math:`\mu + \sigma \odot F(\epsilon)`, see ``scale_position``): the posterior is
        ``TransformedDistribution(get_base_dist(), get_transform())``."""
        return ComposeTransform(self._around(self._flow_stack()))

    def _around(self, stack: list[Transform], cache_size: int = 0) -> list[Transform]:
        r"""The flow ``stack`` with the scale by :math:`\sigma` and the shift by :math:`\mu`
        in their places."""
        scale = AffineTransform(0.0, self.scale, event_dim=1, cache_size=cache_size)
        shift = AffineTransform(self.loc, 1.0, event_dim=1, cache_size=cache_size)
        if self.scale_position == "after":
            return [*stack, scale, shift]
        return [scale, *stack, shift]

    # -- summaries ----------------------------------------------------------

    def _loc_scale(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and marginal standard deviations of :math:`z`, in closed form,
        when every transform of the flow is affine, :math:`F(u) = A u + b`:
        :math:`z \sim N(\mu + b, A \operatorname{diag}(\sigma^2) A^\top)`.
        ``NotImplementedError`` otherwise."""
        stack = list(self._stack)
        if not all(_is_affine(t) for t in stack):
            names = sorted({type(t).__name__ for t in stack if not _is_affine(t)})
            raise NotImplementedError(f"no closed-form marginals through {', '.join(names)}")
        mean, root = self._moments(detach=True)
        return mean, root.square().sum(0).sqrt()

    def _moments(self, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        r"""For an affine flow :math:`F(u) = A u + b`: the mean :math:`\mu + b` of
        :math:`z` and a square root :math:`S` of its covariance,
        :math:`S^\top S = A \operatorname{diag}(\sigma^2) A^\top` (row :math:`i` of
        :math:`S` is :math:`\sigma_i A e_i`, from pushing :math:`0` and
        :math:`\sigma_i e_i` through the flow). With the scale after the flow,
        :math:`z = \mu + \sigma \odot (A \epsilon + b)`: the mean is
        :math:`\mu + \sigma \odot b` and row :math:`i` of :math:`S` is :math:`\sigma \odot A e_i`."""
        loc, scale = (self.loc.detach(), self.scale.detach()) if detach else (self.loc, self.scale)
        after = self.scale_position == "after"
        points = torch.cat([torch.zeros_like(loc)[None], torch.eye(len(loc)).to(loc) if after else torch.diag(scale)])
        for transform in self._stack:
            points = transform(points)
        offset, rows = points[0], points[1:] - points[0]
        if after:
            return loc + scale * offset, rows * scale
        return loc + offset, rows

    def _check_ready(self, *args, **kwargs) -> None:
        if self.prototype_trace is None:
            # Set up as the first call would (parameters registered in the store).
            with self._pyro_context:
                self._setup_prototype(*args, **kwargs)

    def _latent_quantiles(self, probs: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Coordinate-wise quantiles of :math:`z`, shape ``probs.shape + (D,)``."""
        try:
            loc, scale = self._loc_scale()
        except NotImplementedError:
            check_count("num_samples", num_samples, minimum=2)
            samples = self.get_transform()(self._quasi_normal(num_samples))
            return torch.quantile(samples, probs.to(samples.dtype), dim=0)
        return dist.Normal(loc, scale).icdf(probs.to(loc.dtype)[:, None])

    def _quasi_normal(self, num_samples: int) -> torch.Tensor:
        r"""``num_samples`` points of :math:`N(0, I_D)` for the Monte Carlo
        summaries: a scrambled Sobol sequence of seed 0 through the normal
        quantile function (randomised quasi-Monte Carlo: deterministic, and
        torch's random state is left untouched), or, beyond the dimensions
        Sobol sequences cover, plain draws from a generator of seed 0."""
        dim = self.latent_dim
        if dim <= torch.quasirandom.SobolEngine.MAXDIM:
            engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=0)
            uniform = engine.draw(num_samples, dtype=torch.float64)
        else:
            generator = torch.Generator().manual_seed(0)
            uniform = torch.rand(num_samples, dim, generator=generator, dtype=torch.float64)
        tiny = torch.finfo(torch.float64).eps
        normal = torch.special.ndtri(uniform.clamp(tiny, 1 - tiny))
        return normal.to(dtype=self.loc.dtype, device=self.loc.device)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, num_samples: int = 1000, **kwargs) -> dict[str, torch.Tensor]:
        r"""Posterior quantiles of every latent site, as Pyro's autoguides give
        them: ``{name: tensor of shape (len(quantiles),) + site shape}``.
        ``*args, **kwargs`` are the model's (used only if the guide has not
        been called yet, to set it up).

        Each coordinate of a site is a monotone function
        :math:`c = T(z_j)` (``T = biject_to(site.support)``) of one
        coordinate of :math:`z`, so its quantile :math:`q` is :math:`T` of
        the quantile :math:`q` of :math:`z_j` (of :math:`1 - q` where
        :math:`T` is decreasing, as for ``less_than`` supports); values lie in
        the support. The quantiles of :math:`z_j` are exact when the flow is
        affine (Householder, LinIAF/ccLinIAF, LU/QR, element-wise affine,
        permutations: :math:`z` is Gaussian) and otherwise estimated from
        ``num_samples`` draws of the posterior (torch's global RNG, so seed
        it with :func:`pyro.set_rng_seed` for reproducible values; the
        standard error of a median is about :math:`1.25\, \mathrm{sd} /
        \sqrt{\mathtt{num\_samples}}`).

        Sites whose support is not element-wise (``simplex``, ordered vectors,
        correlation Cholesky factors, ...) have no coordinate-wise
        quantiles in the unconstrained space, and marginal quantiles of the
        constrained coordinates would not lie in the support: they raise
        ``NotImplementedError``; summarise samples from
        ``Predictive(model, guide=guide, num_samples=...)`` instead.

        :param quantiles: probabilities strictly between 0 and 1.
        :param num_samples: posterior draws used when there is no closed form.
        """
        probs = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
        if probs.numel() == 0 or not bool(((probs > 0) & (probs < 1)).all()):
            raise ValueError(f"quantiles must be probabilities strictly between 0 and 1, got {quantiles!r}")
        self._check_ready(*args, **kwargs)
        count = probs.numel()
        latent = self._latent_quantiles(torch.cat([probs, 1 - probs]), num_samples)
        result: dict[str, list[torch.Tensor]] = {}
        for k in range(count):
            rows = zip(self._unpack_latent(latent[k]), self._unpack_latent(latent[count + k]))
            for (site, at_q), (_, at_one_minus_q) in rows:
                transform = biject_to(site["fn"].support)
                sign = _elementwise_sign(transform)
                if sign is None:
                    raise NotImplementedError(
                        f"site {site['name']!r} has support {site['fn'].support}, whose transform "
                        f"{type(transform).__name__} mixes coordinates: it has no coordinate-wise quantiles; "
                        "summarise Predictive(model, guide=guide, num_samples=...) samples instead"
                    )
                increasing = torch.as_tensor(sign) > 0
                value = torch.where(increasing, transform(at_q), transform(at_one_minus_q))
                result.setdefault(site["name"], []).append(value)
        return {name: torch.stack(values) for name, values in result.items()}

    @torch.no_grad()
    def median(self, *args, num_samples: int = 1000, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior median of every latent site, ``{name: tensor of the site's
        shape}``: :meth:`quantiles` at 0.5 (exact for affine flows, from
        ``num_samples`` posterior draws otherwise; same rules for supports)."""
        return {
            name: value[0] for name, value in self.quantiles([0.5], *args, num_samples=num_samples, **kwargs).items()
        }


class _GaussianPosterior(dist.TransformedDistribution):
    """A guide's posterior through an affine flow: a Gaussian, whose moments
    have closed forms (a ``TransformedDistribution`` has none).

    ``moments`` (set after construction, so that torch's ``expand`` keeps
    working; an expanded copy has none) returns the mean and a square root
    ``S`` of the covariance, ``S^T S``, as :meth:`AutoFlow._moments` does.
    """

    moments: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _moment(self, index: int) -> torch.Tensor:
        if self.moments is None:
            raise NotImplementedError("an expanded posterior has no closed-form moments; sample it instead")
        return self.moments()[index]

    @property
    def mean(self) -> torch.Tensor:
        return self._moment(0)

    @property
    def covariance_matrix(self) -> torch.Tensor:
        root = self._moment(1)
        return root.mT @ root

    @property
    def variance(self) -> torch.Tensor:
        return self._moment(1).square().sum(-2)


# ---------------------------------------------------------------------------
# Named guides: each builds its flow once the latent dimension D is known.
# ---------------------------------------------------------------------------


def _registry_flow(name: str, count: int | None, options: dict[str, Any], dim: int) -> list[Transform]:
    """The registry's stack ``name:count`` for latents of size ``dim`` (``count``
    None: ``dim``), ``options`` going to every layer."""
    return build_flow(f"{name}:{count or dim}", dim, defaults=options)


class AutoHouseholder(AutoFlow):
    r"""A full-covariance Gaussian posterior as a rotated diagonal one
    (Householder flow, Tomczak & Welling [4], arXiv:1611.09630):

    .. math:: z = \mu + H_K \cdots H_1 (\sigma \odot \epsilon), \qquad
              H_k = I - 2\, v_k v_k^\top / \lVert v_k \rVert^2,
              \qquad z \sim N\big(\mu,\; H \operatorname{diag}(\sigma^2) H^\top\big).

    The flow is orthogonal, so volume preserving (:math:`\log|\det| = 0`):
    the entropy is the diagonal Gaussian's, and the reflections only rotate
    its axes. :math:`K = D` reflections reach every orthogonal matrix, so every
    covariance (its eigendecomposition), with :math:`2D` parameters for the
    Gaussian plus :math:`KD` for the rotation. Median and quantiles are exact
    (the posterior is Gaussian); the initial median is exactly the
    ``init_loc_fn`` point.

    :param count_transforms: :math:`K`, default :math:`D` (the latent dimension).

    Example::

        guide = AutoHouseholder(model, count_transforms=4)
    """

    def __init__(
        self,
        model: Callable,
        count_transforms: int | None = None,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
    ):
        if count_transforms is not None:
            check_count("count_transforms", count_transforms)
        flow = functools.partial(_registry_flow, "householder", count_transforms, {})
        super().__init__(model, flow, init_loc_fn=init_loc_fn, init_scale=init_scale)
        self.count_transforms = count_transforms


class AutoIAF(AutoFlow):
    r"""Inverse autoregressive flow posterior (Kingma et al. [3], arXiv:1606.04934):
    ``num_transforms`` affine IAF layers after the diagonal Gaussian,

    .. math:: u^{(l)}_i = u^{(l-1)}_i\, e^{s_i(u^{(l-1)}_{<i})} + m_i(u^{(l-1)}_{<i}),
              \qquad \log|\det| = \textstyle\sum_{l,i} s_i(u^{(l-1)}_{<i}),

    :math:`(m, s)` from a MADE (hidden widths ``hidden_dims``, default
    :math:`\max(64, 4D)` twice), orderings alternating natural / reversed
    between layers (the first layer is natural: with latent sites in the
    model's order, a coordinate's scale can depend on the sites sampled
    before it, as in a hierarchical model or Neal's funnel). Sampling and
    scoring the guide's own samples cost one network pass per layer.
    ``stable=True`` uses the gated update
    :math:`\sigma_i u_i + (1 - \sigma_i) m_i` of [3]. Median and quantiles
    are estimated by sampling.

    :param num_transforms: number of IAF layers (>= 1).
    :param hidden_dims: hidden widths of each layer's MADE.
    :param stable: gated (numerically stable) update.

    Example::

        guide = AutoIAF(model, num_transforms=2, hidden_dims=[32, 32])
    """

    def __init__(
        self,
        model: Callable,
        num_transforms: int = 2,
        hidden_dims: Sequence[int] | None = None,
        *,
        stable: bool = False,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        scale_position: str = "before",
    ):
        check_count("num_transforms", num_transforms)
        if hidden_dims is not None:
            hidden_dims = check_hidden_dims(hidden_dims, minimum_layers=1)
        flow = functools.partial(
            _registry_flow, "iaf", num_transforms, {"hidden_dims": hidden_dims, "stable": check_bool("stable", stable)}
        )
        super().__init__(model, flow, init_loc_fn=init_loc_fn, init_scale=init_scale, scale_position=scale_position)
        self.num_transforms = num_transforms
        self.hidden_dims = hidden_dims
        self.stable = stable


class AutoSylvester(AutoFlow):
    r"""Sylvester flow posterior (van den Berg et al. [6], arXiv:1803.05649):
    ``num_transforms`` layers

    .. math:: u \mapsto u + Q R \tanh(\tilde R Q^\top u + b), \qquad
              \log|\det| = \textstyle\sum_m \log\lvert 1 + r_{mm} \tilde r_{mm}
              \tanh'(\cdot)_m \rvert,

    :math:`R, \tilde R` upper triangular and :math:`Q` with orthonormal
    columns, built as ``kind`` says: ``"orthogonal"`` (:math:`M = \lceil D/2
    \rceil` orthonormal columns), ``"householder"`` (a product of
    reflections) or ``"triangular"`` (the identity or the reversal
    permutation, alternating between layers). Median and quantiles are
    estimated by sampling.

    :param kind: ``"orthogonal"``, ``"householder"`` or ``"triangular"``.
    :param num_transforms: number of layers (>= 1).

    Example::

        guide = AutoSylvester(model, kind="householder", num_transforms=4)
    """

    def __init__(
        self,
        model: Callable,
        kind: str = "orthogonal",
        num_transforms: int = 4,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        scale_position: str = "before",
    ):
        if kind not in SYLVESTER_KINDS:
            raise ValueError(f"unknown Sylvester kind {kind!r}; known kinds: {', '.join(map(repr, SYLVESTER_KINDS))}")
        check_count("num_transforms", num_transforms)
        flow = functools.partial(_registry_flow, "sylvester", num_transforms, {"kind": kind})
        super().__init__(model, flow, init_loc_fn=init_loc_fn, init_scale=init_scale, scale_position=scale_position)
        self.kind = kind
        self.num_transforms = num_transforms


class AutoPlanar(AutoFlow):
    r"""Planar flow posterior (Rezende & Mohamed [2], arXiv:1505.05770):
    ``num_transforms`` layers

    .. math:: u \mapsto u + \hat w \tanh(w^\top u + b), \qquad
              \log|\det| = \log\lvert 1 + \hat w^\top w\, \tanh'(w^\top u + b) \rvert,

    with :math:`w^\top \hat w > -1` so that each layer is invertible. Each
    layer bends the density along one direction, so many layers are needed
    in more than a few dimensions. Median and quantiles are estimated by
    sampling.

    :param num_transforms: number of layers (>= 1).

    Example::

        guide = AutoPlanar(model, num_transforms=16)
    """

    def __init__(
        self,
        model: Callable,
        num_transforms: int = 8,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        scale_position: str = "before",
    ):
        check_count("num_transforms", num_transforms)
        flow = functools.partial(_registry_flow, "planar", num_transforms, {})
        super().__init__(model, flow, init_loc_fn=init_loc_fn, init_scale=init_scale, scale_position=scale_position)
        self.num_transforms = num_transforms


class AutoConvexTriangular(AutoFlow):
    r"""ccLinIAF posterior (Tomczak & Welling [5], arXiv:1706.02326): the
    diagonal Gaussian through a convex combination of unit lower triangular
    matrices,

    .. math:: z = \mu + \Big(\textstyle\sum_{k=1}^K w_k L_k\Big)(\sigma \odot \epsilon),
              \qquad w = \operatorname{softmax}(\cdot), \qquad \log|\det| = 0,

    a full-covariance Gaussian (a unit lower triangular matrix times a
    diagonal one is any Cholesky factor). Median and quantiles are exact; the
    initial median is exactly the ``init_loc_fn`` point.

    :param count_matrices: :math:`K` (>= 2; one matrix is :class:`AutoFlow` with ``"triangular_linear"``).

    Example::

        guide = AutoConvexTriangular(model, count_matrices=3)
    """

    def __init__(
        self,
        model: Callable,
        count_matrices: int = 3,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
    ):
        check_count_matrices(count_matrices)  # before the first call builds the flow
        flow = functools.partial(_registry_flow, "convex_triangular_linear", count_matrices, {})
        super().__init__(model, flow, init_loc_fn=init_loc_fn, init_scale=init_scale)
        self.count_matrices = count_matrices
