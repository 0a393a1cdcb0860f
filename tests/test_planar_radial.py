"""Properties of planar and radial flows beyond the shared checks: the
invertibility constraint for any raw parameters, agreement with Pyro's
``Planar``/``Radial``, inversion of points the flow did not produce (far away,
near-singular), correct gradients through the numerical inverse, and clear
errors on bad input."""

import doctest
import functools
import importlib

import pyro.distributions as dist
import pytest
import torch
from checks import moved
from pyro.distributions.transforms import Planar as PyroPlanar
from pyro.distributions.transforms import Radial as PyroRadial
from pyro.distributions.transforms.planar import ConditionedPlanar as PyroConditionedPlanar

from pyro_nflows.transforms import (
    ConditionedPlanar,
    ConditionedRadial,
    Planar,
    Radial,
    conditional_planar,
    conditional_radial,
)
from pyro_nflows.transforms import planar_flow as planar_module
from pyro_nflows.transforms.planar_flow import planar_parameters
from pyro_nflows.transforms.roots import InverseNotConverged, monotone_root

pytestmark = pytest.mark.usefixtures("float64")


def _singular_planar(dim, log_margin, bias=0.3):
    """A planar layer with 1 + w^T u_hat = softplus(w^T u) ~ exp(log_margin)."""
    w = torch.randn(dim)
    v = torch.randn(dim)
    v = v - (v @ w) / (w @ w) * w  # a component orthogonal to w, so w^T u = log_margin
    u = log_margin * w / (w @ w) + v
    return ConditionedPlanar(dim, u, w, torch.tensor([bias]))


# ---------------------------------------------------------------------------
# The invertibility constraint
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_w_dot_u_hat_stays_above_minus_one_for_any_raw_parameters(dtype):
    scales = torch.tensor([1e-3, 1.0, 10.0, 1e3]).to(dtype)
    u = torch.randn(4, 4, 500, 6, dtype=dtype) * scales[:, None, None, None]
    w = torch.randn(4, 4, 500, 6, dtype=dtype) * scales[None, :, None, None]
    # Adversarial: u pointing against w, by far.
    u[..., :100, :] = -50 * w[..., :100, :] / (w[..., :100, :] ** 2).sum(-1, keepdim=True)
    u_hat, margin = planar_parameters(u, w)
    assert (margin > 0).all()  # 1 + w^T u_hat > 0 exactly, even where softplus underflows
    assert torch.isfinite(u_hat).all()
    # And it is what the margin says it is, w^T u_hat = margin - 1, up to the
    # rounding of u_hat = u + (...) w, which may cancel.
    dot = (w * u_hat).sum(-1, keepdim=True)
    size = (w.abs() * (u.abs() + (u_hat - u).abs())).sum(-1, keepdim=True) + 1
    rounding = 50 * torch.finfo(dtype).eps * size
    assert ((dot - (margin - 1)).abs() <= rounding).all()
    # Moderate parameters: strictly above -1 as computed.
    moderate = (scales[:, None, None, None] * scales[None, :, None, None] == 1).expand_as(dot)
    assert (dot[moderate & (margin > 1e-3)] > -1).all()


def test_zero_w_gives_a_translation():
    u = torch.randn(3)
    t = ConditionedPlanar(3, u, torch.zeros(3), torch.tensor([0.4]))
    x = torch.randn(10, 3)
    assert torch.allclose(t(x), x + u * torch.tanh(torch.tensor(0.4)), atol=1e-15)
    assert (t.log_abs_det_jacobian(x, t(x)) == 0).all()
    assert torch.allclose(t._inverse(t._call(x)), x, atol=1e-14)


def test_planar_log_det_stays_finite_at_extreme_parameters():
    w = torch.randn(4)
    for log_margin in [-30.0, -200.0, -800.0]:  # softplus underflows to 0 below about -745
        t = ConditionedPlanar(4, log_margin * w / (w @ w), w, torch.tensor([0.0]))
        x = torch.randn(50, 4)
        x[0] = 0  # exactly on the fold: w^T x + b = 0
        log_det = t.log_abs_det_jacobian(x, t(x))
        assert torch.isfinite(log_det).all()


def test_radial_constraint_keeps_beta_above_minus_alpha():
    for alpha_prime, beta_prime in [(-800.0, -800.0), (5.0, -40.0), (-40.0, 5.0), (30.0, 30.0)]:
        t = ConditionedRadial(3, torch.zeros(3), torch.tensor([alpha_prime]), torch.tensor([beta_prime]))
        _, alpha, gamma = t.constrained_parameters()
        assert (alpha > 0).all() and (gamma > 0).all()  # gamma = alpha + beta
        x = torch.randn(20, 3)
        assert torch.isfinite(t.log_abs_det_jacobian(x, t(x))).all()
        assert torch.isfinite(t._inverse(10 * torch.randn(20, 3))).all()


# ---------------------------------------------------------------------------
# Agreement with Pyro (same parametrisation: bias, u, w; x0, alpha', beta')
# ---------------------------------------------------------------------------


def test_planar_matches_pyro():
    ours = moved(Planar(6).double(), scale=0.5, seed=None)
    pyro = PyroPlanar(6).double()
    with torch.no_grad():
        pyro.u.copy_(ours.u)
        pyro.w.copy_(ours.w)
        pyro.bias.copy_(ours.bias)
    x = 2 * torch.randn(40, 6)
    y_pyro = pyro(x)
    assert torch.allclose(ours(x), y_pyro, atol=1e-13)
    assert torch.allclose(ours.log_abs_det_jacobian(x, y_pyro), pyro.log_abs_det_jacobian(x, y_pyro), atol=1e-12)


def test_conditioned_planar_with_batched_parameters_matches_pyro():
    bias, u, w = torch.randn(5, 1), torch.randn(5, 4), torch.randn(5, 4)
    ours = ConditionedPlanar(4, u, w, bias)
    pyro = PyroConditionedPlanar((bias, u, w))
    x = torch.randn(3, 5, 4)
    y_pyro = pyro(x)
    assert torch.allclose(ours(x), y_pyro, atol=1e-13)
    assert torch.allclose(ours.log_abs_det_jacobian(x, y_pyro), pyro.log_abs_det_jacobian(x, y_pyro), atol=1e-12)


def test_radial_matches_pyro():
    ours = moved(Radial(6).double(), scale=0.5, seed=None)
    pyro = PyroRadial(6).double()
    with torch.no_grad():
        pyro.x0.copy_(ours.x0)
        pyro.alpha_prime.copy_(ours.alpha_prime)
        pyro.beta_prime.copy_(ours.beta_prime)
    x = 2 * torch.randn(40, 6)
    y_pyro = pyro(x)
    assert torch.allclose(ours(x), y_pyro, atol=1e-13)
    assert torch.allclose(ours.log_abs_det_jacobian(x, y_pyro), pyro.log_abs_det_jacobian(x, y_pyro), atol=1e-12)


def test_pyro_cannot_invert_what_we_can():
    pyro, ours = PyroPlanar(3).double(), Planar(3).double()
    with torch.no_grad():
        for name in ("u", "w", "bias"):
            getattr(pyro, name).copy_(getattr(ours, name))
    y = torch.randn(4, 3)
    with pytest.raises(KeyError):
        pyro.inv(y)
    assert torch.allclose(ours(ours.inv(y)), y, atol=1e-14)


# ---------------------------------------------------------------------------
# Inverting points the flow did not produce
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [Planar, Radial], ids=["planar", "radial"])
@pytest.mark.parametrize("magnitude", [1.0, 1e3, 1e8, 1e15])
def test_inverse_of_arbitrary_points(build, magnitude):
    t = moved(build(5).double(), scale=1.0, seed=None)
    y = magnitude * torch.randn(200, 5)
    x = t._inverse(y)
    assert torch.isfinite(x).all()
    # Backward stable: the point found maps onto y to rounding.
    assert torch.allclose(t._call(x), y, rtol=0, atol=1e-13 * magnitude)
    # And inverts the map on its own outputs.
    assert torch.allclose(t._inverse(t._call(x)), x, rtol=0, atol=1e-12 * magnitude)


def test_radial_inverse_of_points_at_the_edge_of_float_range():
    t = moved(Radial(4).double(), scale=0.5, seed=None)
    y = torch.tensor([[1e300, -1e300, 3e299, 0.0], [1e-300, 0.0, 0.0, 0.0]])
    x = t._inverse(y)
    assert torch.isfinite(x).all()
    assert torch.allclose(t._call(x), y, rtol=1e-13, atol=1e-15)


def test_radial_inverse_at_the_centre_and_its_gradients_are_finite():
    t = moved(Radial(3).double(), scale=0.5, seed=None)
    y = t.x0.detach().clone().requires_grad_()
    x = t._inverse(y)
    assert torch.allclose(x, t.x0, atol=1e-15)
    x.sum().backward()
    assert torch.isfinite(y.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in t.parameters())


@pytest.mark.parametrize("log_margin", [-5.0, -20.0, -30.0])
def test_planar_inverse_near_the_singular_limit(log_margin):
    """1 + w^T u_hat down to ~1e-13: the solver still converges, and the
    result maps back onto y to rounding (x itself is ill-conditioned there)."""
    t = _singular_planar(3, log_margin)
    _, w, bias, margin = t.constrained_parameters()
    assert margin.item() < 1e-2
    y = 3 * torch.randn(500, 3)
    # Points whose preimage sits on the fold w^T x + b = 0, where f' is smallest.
    x_fold = torch.randn(20, 3)
    x_fold = x_fold - ((x_fold @ w + bias) / (w @ w))[:, None] * w
    y = torch.cat([y, t._call(x_fold)])
    x = t._inverse(y)
    assert t.last_inverse_iterations < 100
    assert torch.allclose(t._call(x), y, rtol=0, atol=1e-13)
    # Away from the fold the inverse is well conditioned and x is accurate.
    x_far = 3 * torch.randn(500, 3)
    x_far = x_far[(x_far @ w + bias).abs() > 1]
    assert torch.allclose(t._inverse(t._call(x_far)), x_far, rtol=0, atol=1e-10)


def test_planar_near_singular_in_float32_converges():
    t = _singular_planar(3, -12.0)
    t32 = ConditionedPlanar(3, t.u.float(), t.w.float(), t.bias.float())
    y = 3 * torch.randn(1000, 3, dtype=torch.float32)
    x = t32._inverse(y)
    assert torch.allclose(t32._call(x), y, rtol=0, atol=1e-5)


def test_planar_inverse_in_float32_with_a_large_u_hat():
    """A case where f's rounding noise (|w^T u_hat| = 20.5 in float32) exceeds
    the solver's tolerance at a small root: the iterates straddle the root one
    Newton step apart; the solver must still stop at the root (by shrinking
    its bracket), neither cycle nor return a point far from it."""
    scale = 20.53145935908092  # w^T u_hat, so u = softplus^{-1}(scale + 1) with w = 1
    u = torch.tensor([scale + 1]).expm1().log()
    f32 = dict(dtype=torch.float32)
    t = ConditionedPlanar(1, u.float(), torch.tensor([1.0], **f32), torch.tensor([-2.4539467768676793], **f32))
    y = torch.tensor([-20.40400941020963], **f32)
    x = t._inverse(y)
    assert torch.allclose(x, torch.tensor([-0.1130924], **f32), atol=1e-5)
    assert torch.allclose(t._call(x), y, atol=1e-5)


def test_planar_inverse_counts_its_iterations():
    t = moved(Planar(5).double(), scale=0.5, seed=None)
    assert t.last_inverse_iterations is None
    t._inverse(torch.randn(100, 5))
    assert 1 <= t.last_inverse_iterations <= 10


@pytest.mark.parametrize("helper", [conditional_planar, conditional_radial])
def test_conditional_inverse_of_arbitrary_points_with_broadcast_context(helper):
    flow = moved(helper(4, 3, hidden_dims=(8,)).double(), scale=0.3, seed=None)
    t = flow.condition(torch.randn(5, 3))
    y = 4 * torch.randn(2, 5, 4)
    x = t._inverse(y)
    assert x.shape == y.shape
    assert torch.allclose(t._call(x), y, atol=1e-12)


@pytest.mark.parametrize("build", [Planar, Radial], ids=["planar", "radial"])
def test_log_det_is_computed_from_x(build):
    t = moved(build(3).double(), scale=0.5, seed=None)
    x = torch.randn(6, 3)
    expected = t.log_abs_det_jacobian(x, t(x))
    assert torch.equal(t.log_abs_det_jacobian(x, torch.zeros(6, 3)), expected)


# ---------------------------------------------------------------------------
# Gradients through the inverse
# ---------------------------------------------------------------------------


def test_gradients_through_the_planar_inverse_are_right():
    u = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    bias = torch.randn(3, 1, requires_grad=True)
    y = 2 * torch.randn(2, 3, 4)
    y.requires_grad_()

    def inverse(u, w, bias, y):
        return ConditionedPlanar(4, u, w, bias, cache_size=0)._inverse(y)

    assert torch.autograd.gradcheck(inverse, (u, w, bias, y))


def test_gradients_through_the_radial_inverse_are_right():
    x0 = torch.randn(3, 4, requires_grad=True)
    alpha_prime = torch.randn(3, 1, requires_grad=True)
    beta_prime = torch.randn(3, 1, requires_grad=True)
    y = 2 * torch.randn(2, 3, 4)
    y.requires_grad_()

    def inverse(x0, alpha_prime, beta_prime, y):
        return ConditionedRadial(4, x0, alpha_prime, beta_prime, cache_size=0)._inverse(y)

    assert torch.autograd.gradcheck(inverse, (x0, alpha_prime, beta_prime, y))


def test_log_prob_of_data_has_the_finite_difference_gradient():
    """The training signal of density estimation: d log p(data) / d parameters,
    through a stack of planar layers inverted numerically."""
    data = 1.5 * torch.randn(30, 2)
    params = [torch.randn(2, requires_grad=True) if i % 3 < 2 else torch.randn(1, requires_grad=True) for i in range(9)]
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)

    def log_prob(*params):
        layers = [ConditionedPlanar(2, *params[3 * k : 3 * k + 3], cache_size=0) for k in range(3)]
        return dist.TransformedDistribution(base, layers).log_prob(data).sum()

    assert torch.autograd.gradcheck(log_prob, tuple(params))


def test_the_gradient_is_not_just_present_but_trains_toward_the_data():
    """End to end: maximum likelihood through the numerical inverse fits a
    stack of planar layers to a shifted, scaled Gaussian (the gradchecks above
    are what pin the gradient down exactly)."""
    torch.manual_seed(1)
    data = torch.randn(500, 2) * 0.5 + torch.tensor([1.0, -0.5])
    layers = [Planar(2).double() for _ in range(4)]
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    flow = dist.TransformedDistribution(base, layers)
    optimizer = torch.optim.Adam([p for layer in layers for p in layer.parameters()], lr=0.05)
    start = -flow.log_prob(data).mean().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < start - 0.5


# ---------------------------------------------------------------------------
# Bad input: clear errors, never a silent wrong answer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [Planar, Radial], ids=["planar", "radial"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_to_the_inverse_is_a_clear_error(build, bad):
    t = build(3)
    y = torch.randn(4, 3)
    y[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite input.*1 of 12"):
        t.inv(y)


def test_non_finite_parameters_are_a_clear_error():
    t = Planar(3).double()
    with torch.no_grad():
        t.w[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite parameter"):
        t.inv(torch.randn(2, 3))


def test_an_inverse_that_does_not_converge_raises(monkeypatch):
    monkeypatch.setattr(planar_module, "monotone_root", functools.partial(monotone_root, max_iterations=1))
    t = moved(Planar(3).double(), scale=0.5, seed=None)
    with pytest.raises(InverseNotConverged, match="ConditionedPlanar inverse|Planar inverse"):
        t.inv(torch.randn(50, 3))


@pytest.mark.parametrize("module_name", ["planar_flow", "radial_flow"])
def test_docstring_examples_run(module_name):
    module = importlib.import_module(f"pyro_nflows.transforms.{module_name}")
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(module, globs={"torch": torch, **vars(module)}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radial_log_det_stays_finite_and_exact_far_from_its_centre(dtype):
    """log|det| is written as log1p of small ratios: no overflow of r^2 in float32 at |x| ~ 1e20,
    and it goes to 0 like the exact value far away."""
    flow = moved(Radial(3).to(dtype), scale=0.5, seed=None)
    for size in (1e10, 1e20, 1e30):
        x = size * torch.randn(5, 3, dtype=dtype)
        log_det = flow.log_abs_det_jacobian(x, flow._call(x))
        assert torch.isfinite(log_det).all() and (log_det.abs() < 1e-6).all()
