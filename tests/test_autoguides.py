"""Tests of the flow autoguides (pyro_nflows.autoguides).

References whose truth does not depend on this package (the models
themselves come from pyro_nflows.models):

- Neal's funnel in 10 dimensions, y ~ N(0, 3), x_i ~ N(0, exp(y / 2)), whose
  log-normaliser is exactly 0: the ELBO is minus the KL divergence to the
  true posterior, so it is <= 0 for every correct guide, and a higher ELBO
  is a better posterior.
- Centered eight schools against a long NUTS run from Pyro
  (tests/data/eight_schools_nuts.json, made by benchmarks/eight_schools_reference.py).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.importance import vectorized_importance_weights
from torch.distributions import biject_to

from pyro_nflows.autoguides import (
    AutoConvexTriangular,
    AutoFlow,
    AutoHouseholder,
    AutoIAF,
    AutoPlanar,
    AutoSylvester,
)
from pyro_nflows.models import eight_schools, funnel
from pyro_nflows.transforms import FlowTransform, conditional_iaf, householder, iaf

REFERENCE = Path(__file__).parent / "data" / "eight_schools_nuts.json"


# ---------------------------------------------------------------------------
# Models (the funnel and eight schools come from pyro_nflows.models)
# ---------------------------------------------------------------------------


def mixed(data: torch.Tensor) -> None:
    """Several sites with constrained supports and a plate."""
    noise = pyro.sample("noise", dist.HalfNormal(2.0))
    weight = pyro.sample("weight", dist.Beta(2.0, 3.0))
    with pyro.plate("groups", 3):
        effect = pyro.sample("effect", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(weight * effect.sum(-1, keepdim=True), noise), obs=data)


DATA = torch.tensor([0.3, -1.2, 0.8, 2.1, -0.4])
SUPPORTS = {"noise": constraints.positive, "weight": constraints.unit_interval, "effect": constraints.real}
LATENT_DIM = 5  # noise, weight, effect[3]


# name -> (factory(model, **options), number of parameters: loc, scale and the flow's)
GUIDES = {
    "AutoFlow-spec": (lambda m, **o: AutoFlow(m, "householder:2+iaf(hidden_dims=[16, 16])", **o), 2 + 1 + 6),
    "AutoHouseholder": (lambda m, **o: AutoHouseholder(m, count_transforms=3, **o), 2 + 1),
    "AutoIAF": (lambda m, **o: AutoIAF(m, num_transforms=2, hidden_dims=[16, 16], **o), 2 + 2 * 6),
    "AutoSylvester-orthogonal": (lambda m, **o: AutoSylvester(m, kind="orthogonal", num_transforms=2, **o), 2 + 2 * 6),
    "AutoSylvester-householder": (
        lambda m, **o: AutoSylvester(m, kind="householder", num_transforms=2, **o),
        2 + 2 * 6,
    ),
    "AutoSylvester-triangular": (lambda m, **o: AutoSylvester(m, kind="triangular", num_transforms=2, **o), 2 + 2 * 5),
    "AutoPlanar": (lambda m, **o: AutoPlanar(m, num_transforms=3, **o), 2 + 3 * 3),
    "AutoConvexTriangular": (lambda m, **o: AutoConvexTriangular(m, count_matrices=2, **o), 2 + 2),
}


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def train(
    model, guide, steps: int, *args, lr: float = 0.01, particles: int = 4, elbo=None, lrd: float = 1.0
) -> list[float]:
    elbo = elbo or Trace_ELBO(num_particles=particles, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr, "lrd": lrd}), elbo)
    return [svi.step(*args) for _ in range(steps)]


@torch.no_grad()
def log_weights(model, guide, num_samples: int, *args, max_plate_nesting: int = 0) -> torch.Tensor:
    """log p(x, z) - log q(z) for each of ``num_samples`` draws z ~ q (Pyro's own, vectorised)."""
    weights, _, _ = vectorized_importance_weights(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=max_plate_nesting
    )
    return weights


def draws(model, guide, num_samples: int, *args, parallel: bool = True) -> dict[str, torch.Tensor]:
    sites = list(SUPPORTS) if model is mixed else None
    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=sites, parallel=parallel)
    return predictive(*args)


# ---------------------------------------------------------------------------
# Every guide: training, shapes, supports, parameters, saving
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GUIDES))
def test_guide_trains_on_constrained_plated_sites(name):
    factory, expected_parameters = GUIDES[name]
    guide = factory(mixed)
    losses = train(mixed, guide, 30, DATA, lr=0.02, particles=8)
    assert all(math.isfinite(loss) for loss in losses)
    assert guide.latent_dim == LATENT_DIM

    # Every parameter once, in the module and in the param store alike.
    parameters = list(guide.parameters())
    assert len(parameters) == expected_parameters
    assert all(isinstance(p, torch.nn.Parameter) for p in parameters)
    store = pyro.get_param_store()
    stored = [store[key].unconstrained() for key in store.keys()]
    assert len({id(p) for p in stored}) == len(stored) == expected_parameters
    assert {id(p) for p in stored} == {id(p) for p in parameters}

    # Shapes: one draw, vectorised draws, Predictive.
    sample = guide(DATA)
    assert sample["noise"].shape == () and sample["weight"].shape == () and sample["effect"].shape == (3,)
    for parallel in (False, True):
        predictive = draws(mixed, guide, 7, DATA, parallel=parallel)
        # Global sites get the data plate's dimension: (7, 1).
        assert predictive["noise"].shape == (7, 1) and predictive["weight"].shape == (7, 1)
        assert predictive["effect"].shape == (7, 3)
    for site, support in SUPPORTS.items():
        assert bool(support.check(predictive[site]).all()), site

    # Median and quantiles: in the support, ordered, median = the 0.5 quantile.
    quantiles = guide.quantiles([0.05, 0.5, 0.95], DATA)
    median = guide.median(DATA)
    for site, support in SUPPORTS.items():
        q = quantiles[site]
        assert q.shape == (3,) + sample[site].shape
        assert bool(support.check(q).all()), site
        assert bool((q[0] < q[1]).all() and (q[1] < q[2]).all()), site
        assert median[site].shape == sample[site].shape
        assert bool(support.check(median[site]).all()), site


@pytest.mark.parametrize("name", list(GUIDES))
def test_state_dict_and_param_store_round_trips(name, tmp_path):
    factory, _ = GUIDES[name]
    guide = factory(mixed)
    train(mixed, guide, 3, DATA)

    def samples(g):
        pyro.set_rng_seed(123)
        with torch.no_grad():
            return draws(mixed, g, 5, DATA)

    expected = samples(guide)

    # The whole guide through torch.save / torch.load (flows and all).
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    for site, value in samples(torch.load(buffer, weights_only=False)).items():
        assert torch.equal(value, expected[site]), site

    # state_dict into a fresh guide (set up by one call first, as any autoguide).
    state = guide.state_dict()
    pyro.clear_param_store()
    pyro.set_rng_seed(99)  # different initial parameters
    copy = factory(mixed)
    copy(DATA)
    copy.load_state_dict(state)
    for site, value in samples(copy).items():
        assert torch.allclose(value, expected[site], atol=1e-6), site

    # The param store saved and loaded: a new guide of the same name adopts it.
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = factory(mixed)
    train(mixed, guide, 3, DATA)
    expected = samples(guide)
    pyro.get_param_store().save(tmp_path / "params.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "params.pt")
    pyro.set_rng_seed(99)
    loaded = factory(mixed)
    loaded(DATA)  # set up (init_to_median draws from the prior, so not inside samples())
    for site, value in samples(loaded).items():
        assert torch.allclose(value, expected[site], atol=1e-6), site
    # ... and trains the loaded tensors, not copies of them.
    before = [p.detach().clone() for p in pyro.get_param_store().values()]
    train(mixed, loaded, 2, DATA)
    after = list(pyro.get_param_store().values())
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after))
    assert {id(p) for p in loaded.parameters()} == {
        id(pyro.get_param_store()[n].unconstrained()) for n in pyro.get_param_store().keys()
    }


@pytest.mark.parametrize("name", list(GUIDES))
def test_training_never_runs_a_flows_inverse(name, monkeypatch):
    """Scoring the guide's own samples must come from the transforms' caches
    (an IAF's inverse is sequential, a planar or Sylvester flow's numerical)."""
    original = FlowTransform._cached

    def cached_only(self, value, forward):
        if not forward and self.cached_input(value, forward) is None:
            raise AssertionError(f"{type(self).__name__} ran its inverse")
        return original(self, value, forward)

    monkeypatch.setattr(FlowTransform, "_cached", cached_only)
    guide = GUIDES[name][0](mixed)
    train(mixed, guide, 2, DATA)
    train(mixed, guide, 1, DATA, elbo=Trace_ELBO())


def test_plain_list_of_transform_modules_is_registered_and_trained():
    flows = [householder(LATENT_DIM, count_transforms=2), iaf(LATENT_DIM, hidden_dims=[8])]
    guide = AutoFlow(mixed, flows)
    assert len(list(guide.parameters())) == 1 + 4  # the flows, before the first call
    guide(DATA)
    assert len(list(guide.parameters())) == 2 + 1 + 4
    initial = {n: p.detach().clone() for n, p in guide.flows.named_parameters()}
    train(mixed, guide, 5, DATA, lr=0.05)
    for n, p in guide.flows.named_parameters():
        assert not torch.equal(initial[n], p.detach()), f"{n} did not train"
    assert guide.flows[0] is flows[0] and guide.flows[1] is flows[1]


def _with_transposed_vectors(flow):
    """A user's transform whose parameter is a non-contiguous tensor: Pyro's
    param store would register a contiguous copy, so the guide must not."""
    flow.vectors = torch.nn.Parameter(flow.vectors.detach().t().contiguous().t())
    assert not flow.vectors.is_contiguous()
    return flow


def test_a_non_contiguous_parameter_is_registered_and_trained():
    pyro.clear_param_store()
    guide = AutoFlow(mixed, lambda dim: [_with_transposed_vectors(householder(dim, count_transforms=dim))])
    guide(DATA)
    store = pyro.get_param_store()
    assert {id(p) for p in guide.parameters()} == {id(store[n].unconstrained()) for n in store.keys()}
    before = guide.flows[0].vectors.detach().clone()
    train(mixed, guide, 5, DATA, lr=0.05)
    assert not torch.equal(before, guide.flows[0].vectors.detach())


@pytest.mark.parametrize(
    "factory",
    [
        lambda m: AutoFlow(m, lambda dim: householder(dim, count_transforms=2), init_scale=0.5),
        lambda m: AutoSylvester(m, kind="orthogonal"),
    ],
    ids=["callable", "AutoSylvester"],
)
def test_flows_follow_float64_latents(factory):
    y, sigma = torch.tensor([28.0, 8.0, -3.0]).double(), torch.tensor([15.0, 10.0, 16.0]).double()
    guide = factory(eight_schools)
    train(eight_schools, guide, 3, y, sigma)
    assert guide.latent_dim == 5
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    assert guide(y, sigma)["theta"].dtype == torch.float64
    store = pyro.get_param_store()
    assert {id(p) for p in guide.parameters()} == {id(store[n].unconstrained()) for n in store.keys()}


# ---------------------------------------------------------------------------
# The posterior's parts, initialisation, median and quantiles
# ---------------------------------------------------------------------------


def test_base_and_transform_give_the_posterior():
    guide = AutoIAF(mixed, num_transforms=2, hidden_dims=[16])
    train(mixed, guide, 20, DATA, lr=0.05)
    with torch.no_grad():
        posterior = guide.get_posterior()
        z = posterior.sample((6,))
        neutra = dist.TransformedDistribution(guide.get_base_dist(), [guide.get_transform()])
        # Scoring outside points: the IAF's sequential direction, a fresh tensor each time.
        assert torch.allclose(posterior.log_prob(z.clone()), neutra.log_prob(z.clone()), atol=1e-4)


def test_the_scale_after_the_flow():
    """scale_position="after": z = loc + scale * F(noise), the flow fed the standard normal,
    and the posterior scores its own draws as the NeuTra map does."""
    guide = AutoPlanar(mixed, num_transforms=2, scale_position="after")
    train(mixed, guide, 5, DATA)
    posterior = guide.get_posterior()
    scale, shift = posterior.transforms[-2:]
    assert torch.equal(scale.scale, guide.scale) and torch.equal(shift.loc, guide.loc)
    noise = torch.randn(4, LATENT_DIM)
    flowed = noise
    for flow in guide.flows:
        flowed = flow(flowed)
    torch.testing.assert_close(guide.get_transform()(noise), guide.loc + guide.scale * flowed)
    z = posterior.rsample((6,))
    neutra = dist.TransformedDistribution(guide.get_base_dist(), [guide.get_transform()])
    torch.testing.assert_close(posterior.log_prob(z), neutra.log_prob(z.detach().clone()), atol=1e-4, rtol=1e-4)


def test_the_posterior_is_the_neutra_map_and_draws_what_get_transform_maps():
    """get_posterior() is TransformedDistribution(get_base_dist(), [scale, *flows, shift]),
    the map NeuTra uses: the same noise gives the same point, and .transform is that map."""
    guide = AutoIAF(mixed, num_transforms=2, hidden_dims=[16])
    train(mixed, guide, 5, DATA)
    posterior = guide.get_posterior()
    assert isinstance(posterior.base_dist.base_dist, dist.Normal)
    assert torch.equal(posterior.base_dist.base_dist.scale, torch.ones(LATENT_DIM))
    noise = torch.randn(4, LATENT_DIM)
    expected = guide.get_transform()(noise)
    z = noise
    for transform in posterior.transforms:
        z = transform(z)
    assert torch.allclose(z, expected) and torch.allclose(guide.transform(noise), expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: AutoHouseholder(m, count_transforms=3),
        lambda m: AutoConvexTriangular(m),
        lambda m: AutoFlow(m, "convex_triangular_linear+elementwise_affine", scale_position="after"),
    ],
)
def test_affine_guides_give_the_gaussians_moments(make):
    guide = make(mixed)
    train(mixed, guide, 30, DATA, lr=0.05)
    posterior = guide.get_posterior()
    with torch.no_grad():
        draws = posterior.sample((200_000,))
        assert torch.allclose(posterior.mean, draws.mean(0), atol=0.01)
        assert torch.allclose(posterior.covariance_matrix, torch.cov(draws.T), atol=0.01)
        assert torch.allclose(posterior.variance, torch.diagonal(posterior.covariance_matrix))
    assert posterior.variance.requires_grad  # differentiable, as a distribution's moments are
    other = AutoIAF(mixed, hidden_dims=[8])  # not affine: no closed form, as for any TransformedDistribution
    other(DATA)
    with pytest.raises(NotImplementedError):
        _ = other.get_posterior().variance


@pytest.mark.parametrize("name", list(GUIDES))
def test_init_loc_fn_places_the_initial_posterior(name):
    values = {"noise": torch.tensor(0.7), "weight": torch.tensor(0.2), "effect": torch.tensor([-1.0, 0.5, 2.0])}
    guide = GUIDES[name][0](mixed, init_loc_fn=init_to_value(values=values))
    guide(DATA)
    for site, unconstrained in guide._unpack_latent(guide.loc.detach()):
        assert torch.allclose(biject_to(site["fn"].support)(unconstrained), values[site["name"]], atol=1e-6)
    # The initial median is the init point: exactly for affine flows (F(0) = 0),
    # up to the flow's small initial output (and sampling) otherwise.
    median = guide.median(DATA, num_samples=4000)
    atol = 1e-5 if name in ("AutoHouseholder", "AutoConvexTriangular") else 0.05
    for site, value in values.items():
        assert torch.allclose(median[site], value, atol=atol), (site, median[site], value)


@pytest.mark.parametrize("name", ["AutoHouseholder", "AutoIAF"])
def test_quantiles_match_the_guides_own_draws(name):
    """Closed form (Householder: a Gaussian) and sampled (IAF) quantiles
    against quantiles of 20,000 draws of the constrained sites."""
    factory, _ = GUIDES[name]
    guide = factory(mixed)
    train(mixed, guide, 150, DATA, lr=0.03)
    probs = [0.1, 0.5, 0.9]
    quantiles = guide.quantiles(probs, DATA, num_samples=20000)
    samples = draws(mixed, guide, 20000, DATA)
    for site in SUPPORTS:
        flat = samples[site].reshape(20000, -1)
        empirical = torch.quantile(flat, torch.tensor(probs), dim=0)
        # A sample quantile's standard error is sqrt(q (1 - q) / n) / density:
        # about 0.012 sd at q = 0.1 with n = 20,000 (for a Gaussian), so the
        # difference of two estimates is within 0.06 sd (3.5 standard errors).
        assert bool(((quantiles[site].reshape(3, -1) - empirical).abs() <= 0.06 * flat.std(0)).all()), site


class _Reflected(dist.TransformedDistribution):
    """A distribution on (-inf, 2), which biject_to maps with a decreasing transform."""

    support = constraints.less_than(2.0)


def test_quantiles_through_a_decreasing_bijection():
    def model():
        # 2 - Exponential(1)
        pyro.sample("v", _Reflected(dist.Exponential(torch.tensor(1.0)), [dist.transforms.AffineTransform(2.0, -1.0)]))

    guide = AutoFlow(model, [], init_scale=0.5)  # a diagonal Gaussian: closed form
    guide()
    quantiles = guide.quantiles([0.05, 0.5, 0.95])["v"]
    assert bool((quantiles[0] < quantiles[1]).all() and (quantiles[1] < quantiles[2]).all())
    assert bool((quantiles < 2).all())
    samples = draws(model, guide, 20000)["v"]
    empirical = torch.quantile(samples, torch.tensor([0.05, 0.5, 0.95]))
    assert torch.allclose(quantiles, empirical, atol=0.05 * samples.std().item())


def test_quantiles_refuse_non_elementwise_supports():
    def model():
        pyro.sample("p", dist.Dirichlet(torch.ones(3)))

    guide = AutoIAF(model, hidden_dims=[8])
    guide()
    with pytest.raises(NotImplementedError, match="simplex|Simplex"):
        guide.median()
    assert guide()["p"].shape == (3,)


def test_sampled_median_is_deterministic_and_leaves_the_random_state():
    """A flow with no closed-form median (IAF) estimates it from scrambled Sobol
    points of seed 0: the same value on every call, torch's stream untouched,
    and close to the median of the guide's own draws."""
    guide = AutoIAF(mixed, hidden_dims=[8])
    train(mixed, guide, 50, DATA, lr=0.03)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = guide.median(DATA), guide.median(DATA)
    assert torch.equal(torch.get_rng_state(), state)
    samples = draws(mixed, guide, 20000, DATA)
    for site in SUPPORTS:
        assert torch.equal(first[site], second[site]), site
        flat = samples[site].reshape(20000, -1)
        empirical = torch.quantile(flat, 0.5, dim=0)
        # the default 1000 points against 20,000 draws: within 0.1 sd (Pyro's test_median tolerance is 0.1)
        assert bool(((first[site].reshape(-1) - empirical).abs() <= 0.1 * flat.std(0)).all()), site


def test_median_before_the_first_call_sets_the_guide_up():
    guide = AutoHouseholder(mixed)
    median = guide.median(DATA)
    assert set(median) == set(SUPPORTS)
    assert len(pyro.get_param_store().keys()) == 3


# ---------------------------------------------------------------------------
# ELBOs
# ---------------------------------------------------------------------------


def test_trace_mean_field_elbo_runs_and_learns():
    guide = AutoIAF(mixed, num_transforms=1, hidden_dims=[16])
    losses = train(mixed, guide, 60, DATA, lr=0.05, elbo=TraceMeanField_ELBO(num_particles=4, vectorize_particles=True))
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-10:]) < sum(losses[:10])


def _fit_funnel(factory, steps: int = 300):
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = factory(funnel)
    train(funnel, guide, steps, lr=0.02, particles=8, lrd=0.1 ** (1 / steps))
    pyro.set_rng_seed(2)
    values = log_weights(funnel, guide, 20000)
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


def test_flow_guides_beat_gaussian_guides_on_the_funnel():
    """The funnel's log-normaliser is 0, so ELBO = -KL(q || p) <= 0."""
    results = {
        "AutoNormal": _fit_funnel(AutoNormal),
        "AutoMultivariateNormal": _fit_funnel(AutoMultivariateNormal),
        "AutoIAF": _fit_funnel(lambda m: AutoIAF(m, num_transforms=2)),
    }
    for name, (elbo, se) in results.items():
        assert elbo < 4 * se, f"{name}: an ELBO above log Z = 0 means a wrong log-density ({elbo} +- {se})"
    ours, ours_se = results["AutoIAF"]
    for name in ("AutoNormal", "AutoMultivariateNormal"):
        theirs, theirs_se = results[name]
        gap_se = math.hypot(ours_se, theirs_se)
        assert ours - theirs > 5 * gap_se, (results, name)


def test_eight_schools_against_nuts():
    reference = json.loads(REFERENCE.read_text())
    y = torch.tensor(reference["y"], dtype=torch.float64)
    sigma = torch.tensor(reference["sigma"], dtype=torch.float64)
    guide = AutoIAF(eight_schools, num_transforms=2, hidden_dims=[32, 32])
    train(eight_schools, guide, 400, y, sigma, lr=0.05, particles=8, lrd=0.1 ** (1 / 400))
    pyro.set_rng_seed(3)
    samples = draws(eight_schools, guide, 10000, y, sigma)
    for site in ("mu", "theta"):
        mean = samples[site].reshape(10000, -1).mean(0)
        ref_mean = torch.tensor(reference["mean"][site], dtype=torch.float64).reshape(-1)
        ref_sd = torch.tensor(reference["sd"][site], dtype=torch.float64).reshape(-1)
        # Within half a posterior sd: far above the reference's MC error
        # (mcse ~ 0.01 sd) and the guide's (sd / 100 with 10,000 draws).
        assert bool(((mean - ref_mean).abs() <= 0.5 * ref_sd).all()), (site, mean, ref_mean, ref_sd)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: AutoFlow(mixed, "householder", init_scale=0.0), ValueError, "init_scale"),
        (lambda: AutoFlow(mixed, "householder", init_scale=-1.0), ValueError, "init_scale"),
        (lambda: AutoFlow(mixed, "householder", scale_position="first"), ValueError, "scale_position"),
        (lambda: AutoFlow(mixed, "no_such_flow:2"), ValueError, "unknown flow"),
        (lambda: AutoFlow(mixed, "householder:x"), ValueError, "N must be an integer"),
        (lambda: AutoFlow(mixed, 3), TypeError, "flow must be"),
        (lambda: AutoFlow(mixed, [conditional_iaf(5, 2)]), TypeError, "conditional"),
        (lambda: AutoFlow(mixed, ["householder"]), TypeError, "Transform"),
        (lambda: AutoHouseholder(mixed, count_transforms=0), ValueError, "count_transforms"),
        (lambda: AutoIAF(mixed, num_transforms=0), ValueError, "num_transforms"),
        (lambda: AutoIAF(mixed, hidden_dims=[0]), ValueError, "hidden_dims"),
        (lambda: AutoSylvester(mixed, kind="diagonal"), ValueError, "unknown Sylvester kind"),
        (lambda: AutoPlanar(mixed, num_transforms=0), ValueError, "num_transforms"),
        (lambda: AutoConvexTriangular(mixed, count_matrices=0), ValueError, "count_matrices"),
        (lambda: AutoConvexTriangular(mixed, count_matrices=1), ValueError, "triangular_linear"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_flow_of_the_wrong_dimension_names_both():
    guide = AutoFlow(mixed, [householder(4)])
    with pytest.raises(ValueError, match=r"size 4.*latent dimension is 5"):
        guide(DATA)
    guide = AutoFlow(mixed, "iaf(hidden_dims=[0])")
    with pytest.raises(ValueError, match="hidden_dims"):
        guide(DATA)


def test_bad_quantiles():
    guide = AutoHouseholder(mixed)
    guide(DATA)
    for bad in ([0.0, 0.5], [1.5], []):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            guide.quantiles(bad, DATA)


def test_a_guide_refuses_a_model_whose_latent_sites_changed():
    def model(data):
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    guide = AutoIAF(model, hidden_dims=[8])
    guide(torch.randn(5))
    guide(torch.randn(5))  # the same shapes: nothing re-traced
    with pytest.raises(ValueError, match=r"built for the latent sites \{'z': \(5,\)\}.*\{'z': \(7,\)\}"):
        guide(torch.randn(7))
    pyro.clear_param_store()
    global_only = AutoIAF(mixed, hidden_dims=[8])
    global_only(DATA)
    assert set(global_only(torch.randn(9))) == {"noise", "weight", "effect"}  # more data, the same latents
