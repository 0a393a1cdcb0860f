"""Tests of the example Pyro models (pyro_nflows.models).

Each model's log-density is checked against a hand-written formula or against
the other parameterisation, not against the code it tests.
"""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.util import site_is_subsample

import pyro_nflows
from pyro_nflows import models
from pyro_nflows.models import (
    EIGHT_SCHOOLS_SIGMA,
    EIGHT_SCHOOLS_Y,
    eight_schools,
    eight_schools_data,
    eight_schools_noncentered,
    funnel,
)

REFERENCE = Path(__file__).parent / "data" / "eight_schools_nuts.json"
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@pytest.fixture(autouse=True)
def fresh_param_store():
    """A fixed seed and an empty param store for each test; the store before it comes back after it."""
    pyro.set_rng_seed(0)
    with pyro.get_param_store().scope():
        yield


def _sample_sites(trace: poutine.Trace) -> list[str]:
    return [name for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]


def _trace(model, values: dict[str, torch.Tensor], *args) -> poutine.Trace:
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args)
    trace.compute_log_prob()
    return trace


# ---------------------------------------------------------------------------
# Neal's funnel
# ---------------------------------------------------------------------------


def test_funnel_sites_and_shapes():
    trace = poutine.trace(funnel).get_trace()
    latent = _sample_sites(trace)
    assert latent == ["y", "x"]
    assert trace.nodes["y"]["value"].shape == ()
    assert trace.nodes["x"]["value"].shape == (9,)
    assert trace.nodes["x"]["fn"].event_shape == (9,)
    assert not any(trace.nodes[name]["is_observed"] for name in latent)


@pytest.mark.parametrize("y", [-4.0, 0.0, 1.5])
def test_funnel_log_density_is_the_two_normals(y, float64):
    """In float64 throughout (the funnel's constants take the default dtype)."""
    x = torch.linspace(-2.0, 3.0, 9, dtype=torch.float64)
    trace = _trace(funnel, {"y": torch.tensor(y, dtype=torch.float64), "x": x})
    # log N(y; 0, 3) + sum_i log N(x_i; 0, e^{y/2}), written out.
    expected = -LOG_SQRT_2PI - math.log(3.0) - y**2 / 18.0
    expected += sum(-LOG_SQRT_2PI - y / 2 - xi**2 / (2 * math.exp(y)) for xi in x.tolist())
    assert trace.log_prob_sum().item() == pytest.approx(expected, abs=1e-10)


def test_funnel_broadcasts_over_a_plate_of_particles():
    with pyro.plate("particles", 4, dim=-1):
        trace = poutine.trace(funnel).get_trace()
    trace.compute_log_prob()
    y, x = trace.nodes["y"]["value"], trace.nodes["x"]["value"]
    assert y.shape == (4,) and x.shape == (4, 9)
    joint = trace.nodes["y"]["log_prob"] + trace.nodes["x"]["log_prob"]
    assert joint.shape == (4,)
    for particle in range(4):  # each particle scores as the unbatched model does
        alone = _trace(funnel, {"y": y[particle], "x": x[particle]}).log_prob_sum()
        assert torch.allclose(joint[particle], alone)


def test_funnel_trains_with_vectorised_particles():
    guide = AutoNormal(funnel)
    svi = SVI(funnel, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=4, vectorize_particles=True))
    losses = [svi.step() for _ in range(5)]
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in losses)
    # One log-weight log p - log q per vectorised draw.
    log_weights, _, _ = vectorized_importance_weights(funnel, guide, num_samples=4, max_plate_nesting=0)
    assert log_weights.shape == (4,) and torch.isfinite(log_weights).all()


# ---------------------------------------------------------------------------
# Eight schools
# ---------------------------------------------------------------------------


def test_eight_schools_data():
    y, sigma = eight_schools_data()
    assert y.shape == sigma.shape == (8,)
    assert y.dtype == sigma.dtype == torch.float64
    assert y.tolist() == list(EIGHT_SCHOOLS_Y) and sigma.tolist() == list(EIGHT_SCHOOLS_SIGMA)
    assert (sigma > 0).all()
    y32, sigma32 = eight_schools_data(torch.float32)
    assert y32.dtype == sigma32.dtype == torch.float32


def test_the_stored_nuts_reference_is_for_these_data():
    reference = json.loads(REFERENCE.read_text())
    assert reference["y"] == list(EIGHT_SCHOOLS_Y)
    assert reference["sigma"] == list(EIGHT_SCHOOLS_SIGMA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eight_schools_sites_follow_the_data(dtype):
    y, sigma = eight_schools_data(dtype)
    centered = poutine.trace(eight_schools).get_trace(y, sigma)
    assert _sample_sites(centered) == ["mu", "tau", "theta", "obs"]
    assert centered.nodes["obs"]["is_observed"] and torch.equal(centered.nodes["obs"]["value"], y)
    assert centered.nodes["theta"]["value"].shape == (8,)
    assert [frame.name for frame in centered.nodes["theta"]["cond_indep_stack"]] == ["schools"]
    assert all(centered.nodes[name]["value"].dtype == dtype for name in ("mu", "tau", "theta"))

    noncentered = poutine.trace(eight_schools_noncentered).get_trace(y, sigma)
    assert _sample_sites(noncentered) == ["mu", "tau", "theta_tilde", "theta", "obs"]
    mu, tau, theta_tilde = (noncentered.nodes[name]["value"] for name in ("mu", "tau", "theta_tilde"))
    assert torch.equal(noncentered.nodes["theta"]["value"], mu + tau * theta_tilde)
    assert all(noncentered.nodes[name]["value"].dtype == dtype for name in ("mu", "tau", "theta_tilde", "theta"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_centered_and_noncentered_are_one_joint_distribution(seed):
    """log p_c(mu, tau, theta) = log p_nc(mu, tau, theta_tilde) - 8 log tau,
    with theta = mu + tau * theta_tilde (the Jacobian of theta_tilde -> theta)."""
    y, sigma = eight_schools_data()
    generator = torch.Generator().manual_seed(seed)
    mu = 10.0 * torch.randn((), generator=generator, dtype=torch.float64)
    tau = torch.rand((), generator=generator, dtype=torch.float64) * 20.0 + 0.1
    theta_tilde = torch.randn(8, generator=generator, dtype=torch.float64)
    theta = mu + tau * theta_tilde
    centered = _trace(eight_schools, {"mu": mu, "tau": tau, "theta": theta}, y, sigma).log_prob_sum()
    noncentered = _trace(eight_schools_noncentered, {"mu": mu, "tau": tau, "theta_tilde": theta_tilde}, y, sigma)
    assert torch.allclose(noncentered.nodes["theta"]["value"], theta)
    expected = noncentered.log_prob_sum() - 8 * tau.log()
    assert centered.dtype == torch.float64
    assert centered.item() == pytest.approx(expected.item(), abs=1e-9)


def test_eight_schools_log_density_is_written_out():
    y, sigma = eight_schools_data()
    mu, tau = torch.tensor(4.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    theta = torch.linspace(-5.0, 20.0, 8, dtype=torch.float64)
    actual = _trace(eight_schools, {"mu": mu, "tau": tau, "theta": theta}, y, sigma).log_prob_sum()
    expected = -LOG_SQRT_2PI - math.log(5.0) - mu**2 / 50.0
    expected += math.log(2 / math.pi) - math.log(5.0) - math.log1p((tau / 5.0) ** 2)  # half-Cauchy(5)
    expected += (-LOG_SQRT_2PI - tau.log() - (theta - mu) ** 2 / (2 * tau**2)).sum()
    expected += (-LOG_SQRT_2PI - sigma.log() - (y - theta) ** 2 / (2 * sigma**2)).sum()
    assert actual.item() == pytest.approx(expected.item(), abs=1e-10)


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The NeuTra banana, the logistic regression, the hierarchical regression
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_banana_density_is_normalised_and_is_its_samples(rho):
    """The log-density integrates to 1 on a grid that holds the mass, its
    samples' mean is the density's mean, and the model's one site scores it."""
    banana = models.BananaShaped(1.15, 1.0, rho)
    x0, x1 = torch.meshgrid(torch.linspace(-7, 7, 701, dtype=torch.float64),
                            torch.linspace(-6, 30, 1801, dtype=torch.float64), indexing="ij")
    grid = torch.stack([x0, x1], -1)
    density = banana.log_prob(grid).exp()
    cell = (14 / 700) * (36 / 1800)
    assert abs(float(density.sum() * cell) - 1.0) < 1e-4
    samples = banana.sample((200_000,)).double()
    mean = (density[..., None] * grid).sum((0, 1)) * cell
    # x1 = u1 / a + b (u0^2 + a^2): mean b (1 + a^2) = 2.3225; the samples' standard error is under 0.005
    assert torch.allclose(mean, torch.tensor([0.0, 1.0 + 1.15**2], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(samples.mean(0), mean, atol=0.03)
    trace = _trace(models.banana, {"x": samples[:5]}, 1.15, 1.0, rho)
    assert torch.allclose(trace.nodes["x"]["log_prob"], banana.log_prob(samples[:5]))


def test_banana_refuses_bad_parameters():
    with pytest.raises(ValueError, match="a must lie"):
        models.BananaShaped(0.0)
    with pytest.raises(ValueError, match="rho must lie"):
        models.BananaShaped(rho=1.0)


def test_logistic_regression_log_density_is_written_out():
    features, labels = models.logistic_regression_data()
    assert features.shape == (100, 4) and labels.shape == (100,) and set(labels.tolist()) <= {0.0, 1.0}
    intercept = torch.tensor(0.3, dtype=torch.float64)
    weights = torch.tensor([1.0, -0.5, 0.2, 0.0], dtype=torch.float64)
    trace = _trace(models.logistic_regression, {"intercept": intercept, "weights": weights}, features, labels)
    logits = intercept + features @ weights
    likelihood = (labels * logits - torch.nn.functional.softplus(logits)).sum()
    prior = -0.5 * (intercept**2 + weights.square().sum()) / 4 - 5 * (math.log(2.0) + LOG_SQRT_2PI)
    assert torch.allclose(trace.log_prob_sum(), likelihood + prior)


def test_hierarchical_log_density_is_written_out():
    group, covariate, response = models.hierarchical_data()
    assert group.shape == covariate.shape == response.shape == (32,)
    values = {name: torch.tensor(value, dtype=torch.float64)
              for name, value in {"mu": 0.5, "tau": 0.8, "beta": 0.4, "sigma": 1.2}.items()}
    values["alpha"] = torch.linspace(-1, 1, 8, dtype=torch.float64)
    trace = _trace(models.hierarchical, values, group, covariate, response)

    def normal(x, loc, scale):
        return (-0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - LOG_SQRT_2PI).sum()

    two, five = torch.tensor(2.0, dtype=torch.float64), torch.tensor(5.0, dtype=torch.float64)
    expected = (normal(values["mu"], 0, five) + normal(values["tau"], 0, two) + math.log(2)
                + normal(values["beta"], 0, two) + normal(values["sigma"], 0, two) + math.log(2)
                + normal(values["alpha"], values["mu"], values["tau"])
                + normal(response, values["alpha"][group] + values["beta"] * covariate, values["sigma"]))
    assert torch.allclose(trace.log_prob_sum(), expected)


@pytest.mark.parametrize("name", ["banana", "logistic_regression", "hierarchical"])
def test_new_models_train_with_vectorised_particles(name):
    model, args = {"banana": (models.banana, ()),
                   "logistic_regression": (models.logistic_regression, models.logistic_regression_data()),
                   "hierarchical": (models.hierarchical, models.hierarchical_data())}[name]
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO(num_particles=4, vectorize_particles=True,
                                                                      max_plate_nesting=1))
    losses = [svi.step(*args) for _ in range(150)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-20:]) < sum(losses[:20])


def test_exported_from_the_package():
    assert "models" in pyro_nflows.__all__ and pyro_nflows.models is models
    for name in models.__all__:
        assert getattr(models, name) is not None


def test_docstring_examples_run():
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(models, globs={"torch": torch}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
