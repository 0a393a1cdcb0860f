"""Amortized posteriors of Pyro models (neural posterior estimation): ``pyro_nflows.amortized``.

The reference is the conjugate Normal-Normal model, whose posterior is known:
mu ~ N(0, 1) and two draws x_i | mu ~ N(mu, 0.5^2) give
mu | x ~ N(4 (x_1 + x_2) / 9, 1 / 9), whatever x.
"""

import doctest
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_nflows import amortized
from pyro_nflows.amortized import AmortizedPosterior, fit_posterior, simulate

TINY = dict(num_layers=1, hidden_dims=[16, 16], epochs=2, progress=False, seed=0)


def normal_normal(x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("draws", 2):
        return pyro.sample("x", dist.Normal(mu, 0.5), obs=x)


def _analytic(x: torch.Tensor) -> tuple[float, float]:
    """Mean and sd of mu | x: precision 1 + 2 / 0.25 = 9."""
    return 4 * x.sum().item() / 9, 1 / 3


@pytest.fixture(scope="module")
def conjugate() -> AmortizedPosterior:
    return fit_posterior(normal_normal, "x", 2000, num_layers=2, hidden_dims=[32, 32], epochs=30, progress=False,
                         seed=0)


def test_the_posterior_of_the_conjugate_model_has_the_analytic_mean_and_sd(conjugate):
    """After a small training run (2,000 simulations, 30 epochs) the mean is
    within 0.1 (0.3 posterior sd) and the sd within 20% of the analytic ones,
    for two observations, one in the bulk of the prior predictive and one 1.2
    sd out (its mean -1.3; the prior predictive's sd of the mean is 1.06);
    the Monte Carlo error of 4,000 draws is about 0.005 on the mean."""
    torch.manual_seed(0)
    for observation in (torch.tensor([0.5, 1.0]), torch.tensor([-1.0, -1.6])):
        draws = conjugate(observation).sample((4000,))["mu"]
        mean, sd = _analytic(observation)
        assert draws.shape == (4000,)
        assert abs(draws.mean().item() - mean) < 0.1, (observation, draws.mean().item(), mean)
        assert abs(draws.std().item() / sd - 1) < 0.2, (observation, draws.std().item(), sd)


def test_a_batch_of_observations_gives_one_posterior_each(conjugate):
    torch.manual_seed(1)
    observations = torch.tensor([[0.5, 1.0], [-1.0, -1.6], [0.0, 0.0]])
    posterior = conjugate(observations)
    assert posterior.batch_shape == (3,)
    draws = posterior.sample((3000,))["mu"]
    assert draws.shape == (3000, 3)
    expected = torch.tensor([_analytic(row)[0] for row in observations])
    assert torch.allclose(draws.mean(0), expected, atol=0.1), (draws.mean(0), expected)
    assert posterior.log_prob({"mu": draws}).shape == (3000, 3)
    assert posterior.log_prob({"mu": torch.zeros(5, 1)}).shape == (5, 3)  # a value batch that broadcasts


def constrained(x=None):
    """A HalfNormal scale, three Beta weights, a simplex, a 2-vector location; x is a 4 x 2 matrix."""
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    with pyro.plate("components", 3):
        weight = pyro.sample("weight", dist.Beta(2.0, 2.0))
    mix = pyro.sample("mix", dist.Dirichlet(torch.ones(3)))
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    mean = loc + (weight.unsqueeze(-2) * mix).sum(-1, keepdim=True)  # Pyro's shape rules: event dims on the right
    with pyro.plate("rows", 4):
        return pyro.sample("x", dist.Normal(mean, scale.unsqueeze(-1)).to_event(1), obs=x)


SHAPES = {"scale": (), "weight": (3,), "mix": (3,), "loc": (2,)}


@pytest.fixture(scope="module")
def constrained_posterior() -> AmortizedPosterior:
    return fit_posterior(constrained, "x", 400, **TINY)


def test_constrained_sites_come_back_in_their_supports_with_their_shapes(constrained_posterior):
    posterior = constrained_posterior
    assert posterior.latent_sites == ("scale", "weight", "mix", "loc") and posterior.observed_sites == ("x",)
    assert posterior.density.input_dim == 1 + 3 + 2 + 2  # the simplex of 3 has 2 unconstrained coordinates
    assert posterior.density.context_dim == 8
    torch.manual_seed(2)
    for batch in [(), (5,)]:
        draws = posterior(torch.randn(*batch, 4, 2)).sample((100,))
        assert {name: value.shape for name, value in draws.items()} == {
            name: torch.Size((100, *batch, *shape)) for name, shape in SHAPES.items()
        }
        assert (draws["scale"] > 0).all()
        assert ((draws["weight"] >= 0) & (draws["weight"] <= 1)).all()
        assert torch.allclose(draws["mix"].sum(-1), torch.ones(()), atol=1e-5) and (draws["mix"] >= 0).all()


def test_log_prob_is_the_flow_density_plus_the_support_transforms_log_jacobian(constrained_posterior):
    """By hand: u = (log scale, logit weight, stick-breaking inverse of mix, loc), and
    log q(theta) = log q(u) - log scale - sum log(w (1 - w)) - log|det d mix / d u_mix|."""
    torch.manual_seed(3)
    posterior = constrained_posterior(torch.randn(4, 2))
    draws = posterior.sample((50,))
    log_prob = posterior.log_prob(draws)
    assert log_prob.shape == (50,) and torch.isfinite(log_prob).all()
    weight = draws["weight"]
    stick = torch.distributions.StickBreakingTransform()
    mix_u = stick.inv(draws["mix"])
    u = torch.cat([draws["scale"].log()[:, None], (weight / (1 - weight)).log(), mix_u, draws["loc"]], dim=-1)
    by_hand = (
        posterior.unconstrained.log_prob(u)
        - draws["scale"].log()
        - (weight * (1 - weight)).log().sum(-1)
        - stick.log_abs_det_jacobian(mix_u, draws["mix"])
    )
    assert torch.allclose(log_prob, by_hand, atol=1e-3), (log_prob - by_hand).abs().max()


def test_the_density_of_a_positive_site_integrates_to_one():
    """The Jacobian's sign, checked by integrating q(scale | x) over (0, inf) on a grid."""

    def model():
        scale = pyro.sample("scale", dist.HalfNormal(1.0))
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(0.0, scale))

    posterior = fit_posterior(model, "x", 300, **TINY)(torch.tensor([0.3, -0.8, 0.5]))
    grid = torch.logspace(-5, 2, 20001)
    density = posterior.log_prob({"scale": grid}).exp().double()
    assert abs(torch.trapezoid(density, grid.double()).item() - 1) < 1e-2


def test_simulate_draws_the_prior_predictive_with_the_sites_shapes():
    torch.manual_seed(4)
    draws = simulate(constrained, 1000, simulation_batch_size=300, progress=False)
    assert {name: tuple(value.shape) for name, value in draws.items()} == {
        **{name: (1000, *shape) for name, shape in SHAPES.items()}, "x": (1000, 4, 2)
    }
    assert abs(draws["scale"].mean().item() - math.sqrt(2 / math.pi)) < 0.1  # HalfNormal(1)'s mean
    one_at_a_time = simulate(constrained, 5, parallel=False, progress=False)
    assert {name: value.shape for name, value in one_at_a_time.items()} == {
        name: torch.Size((5, *value.shape[1:])) for name, value in draws.items()
    }


def test_a_deterministic_summary_can_be_observed_and_an_embedding_is_trained():
    def model():
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("points", 10):
            x = pyro.sample("x", dist.Normal(mu, 1.0).to_event(1))
        pyro.deterministic("mean", x.mean(-2, keepdim=True), event_dim=1)  # batch dims stay where the plate put them

    summary = fit_posterior(model, "mean", 300, latent=["mu"], **TINY)  # x, not observed, would be latent
    assert summary.latent_sites == ("mu",) and summary.observed_sites == ("mean",) and summary.density.context_dim == 2
    embedding = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 4))
    before = [parameter.detach().clone() for parameter in embedding.parameters()]
    embedded = fit_posterior(model, "x", 300, embedding=embedding, **TINY)
    assert embedded.density.embedding is embedding and embedded.density.config["embedded_dim"] == 4
    assert all(not torch.equal(b, p) for b, p in zip(before, embedding.parameters()))
    assert embedded(torch.randn(10, 2)).sample((7,))["mu"].shape == (7, 2)


def test_simulations_given_are_used_as_they_are():
    torch.manual_seed(5)
    draws = simulate(normal_normal, 300, progress=False)
    posterior = fit_posterior(normal_normal, "x", simulations=draws, **TINY)
    assert posterior.density.loc.item() == pytest.approx(draws["mu"].mean().item(), abs=0.2)


def nan_sometimes(x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    noise = pyro.sample("noise", dist.Normal(0.0, 1.0))
    value = torch.where(mu > 1.0, torch.full_like(mu, float("nan")), mu + noise)  # NaN for about 16% of draws
    return pyro.sample("x", dist.Delta(value), obs=x)


def test_nan_simulations_are_dropped_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        posterior = fit_posterior(nan_sometimes, "x", 400, latent=["mu"], **TINY)
    messages = [str(w.message) for w in caught if "dropped" in str(w.message)]
    assert len(messages) == 1 and "simulations whose observation or unconstrained latent is NaN" in messages[0]
    dropped = int(messages[0].split("dropped ")[1].split(" of")[0])
    assert 30 < dropped < 110
    assert posterior.latent_sites == ("mu",)  # "noise" is marginalised


def only_observed(x=None):
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def discrete(x=None):
    k = pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
    pyro.sample("x", dist.Normal(k.float(), 1.0), obs=x)


def with_factor(x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.factor("penalty", -(mu**2))
    pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def not_vectorised(x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(mu.reshape(1) * torch.ones(3), 1.0).to_event(1), obs=x)


def dependent_support(x=None):
    high = pyro.sample("high", dist.HalfNormal(1.0))
    u = pyro.sample("u", dist.Uniform(0.0, high + 1.0))
    pyro.sample("x", dist.Normal(u, 1.0), obs=x)


def always_nan(x=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Delta(mu * float("nan")), obs=x)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: fit_posterior(only_observed, "x", 100, **TINY), "no latent sites"),
        (lambda: fit_posterior(normal_normal, "y", 100, **TINY), r"no sample site\(s\) \['y'\] to observe"),
        (lambda: fit_posterior(normal_normal, "x", 2, **TINY), "num_simulations must be an integer >= 3, got 2"),
        (lambda: fit_posterior(normal_normal, "x", 0, **TINY), "num_simulations must be an integer >= 3, got 0"),
        (lambda: fit_posterior(normal_normal, "x", 1.5, **TINY), "num_simulations must be an integer"),
        (lambda: fit_posterior(always_nan, "x", 100, **TINY), "only 0 of 100 simulations are finite"),
        (lambda: fit_posterior(normal_normal, [], 100, **TINY), "observed must name the observed site"),
        (lambda: fit_posterior(normal_normal, "x", 100, latent=["x"], **TINY), "are not latent sites"),
        (lambda: fit_posterior(discrete, "x", 100, **TINY), "latent site 'k' is discrete"),
        (lambda: fit_posterior(with_factor, "x", 100, **TINY), r"pyro.factor site\(s\) \['penalty'\]"),
        (lambda: fit_posterior(not_vectorised, "x", 100, **TINY), "pass parallel=False"),
        (lambda: fit_posterior(dependent_support, "x", 100, **TINY), "support of the site 'u'.*depends on other"),
        (lambda: fit_posterior(normal_normal, "x", 100, epoch=3), r"unexpected arguments \['epoch'\]"),
        (lambda: fit_posterior(normal_normal, "x", 100, simulations={}, **TINY), "not both"),
        (lambda: fit_posterior(normal_normal, "x", simulations={"mu": torch.zeros(9)}, **TINY), r"site\(s\) \['x'\]"),
        (lambda: fit_posterior("model", "x", 100, **TINY), "model must be a callable Pyro model"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_slow_path_simulates_a_model_that_does_not_vectorise():
    torch.manual_seed(6)
    draws = simulate(not_vectorised, 4, parallel=False, progress=False)
    assert draws["x"].shape == (4, 3) and draws["mu"].shape == (4,)


def test_bad_observations_and_values_are_refused(constrained_posterior):
    with pytest.raises(ValueError, match=r"site 'x' has shape \(4, 2\).*got \(8,\)"):
        constrained_posterior(torch.randn(8))
    posterior = constrained_posterior(torch.randn(4, 2))
    draws = posterior.sample((3,))
    with pytest.raises(ValueError, match=r"no value for the latent site\(s\) \['loc'\]"):
        posterior.log_prob({name: value for name, value in draws.items() if name != "loc"})
    with pytest.raises(ValueError, match="site 'scale' lie outside its support"):
        posterior.log_prob({**draws, "scale": -draws["scale"]})


def test_the_module_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(amortized, globs=dict(vars(amortized))):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 3
