"""Residual flows beyond the shared checks: the Lipschitz bound of g (spectral
norms after training, pairs of points, LipSwish), the fixed-point inverse (its
accuracy, its stopping rule, its errors), gradients through it against finite
differences, the stochastic log-determinants against the exact one (z-tests
over many seeded draws: "roulette" unbiased in value and gradient, "series"
with few terms biased), state_dict and pickling with the power-iteration
buffers, and bad input."""

import copy
import doctest
import functools
import importlib
import io
import math

import pyro.distributions as dist
import pytest
import torch
from checks import check_transform, moved

from pyro_nflows.nn import LipschitzMLP, LipSwish
from pyro_nflows.nn.lipschitz import lipswish, lipswish_derivative
from pyro_nflows.transforms import ConditionedResidual, Residual, conditional_residual, residual
from pyro_nflows.transforms.roots import InverseNotConverged

# A z-test bound: with the seeds fixed this is deterministic, and an unbiased
# estimator lands within it with probability 1 - 6e-5 per comparison.
Z_BOUND = 4.0


# ---------------------------------------------------------------------------
# The shared contract (logdet="exact")
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["iaf", "maf"])
def test_residual_passes_the_shared_checks(direction):
    check_transform(lambda: residual(5, hidden_dims=(16, 16), direction=direction), 5)


@pytest.mark.parametrize("direction", ["iaf", "maf"])
def test_conditional_residual_passes_the_shared_checks(direction):
    check_transform(lambda: conditional_residual(5, 3, hidden_dims=(16, 16), direction=direction), 5, 3)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _skewed_data(count=256, dim=2, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(count, dim, generator=generator, dtype=dtype) * torch.linspace(0.5, 2.0, dim, dtype=dtype)
    data[:, -1] += data[:, 0] ** 2 / 2
    return data


def _train(layers, data, steps=15, lr=5e-2, context=None):
    """A few Adam steps of maximum likelihood (the optimiser moves the weights'
    top singular directions, which is what the bounds must survive)."""
    dim = data.shape[-1]
    base = dist.Normal(torch.zeros(dim, dtype=data.dtype), torch.ones(dim, dtype=data.dtype)).to_event(1)
    optimizer = torch.optim.Adam([p for layer in layers for p in layer.parameters()], lr=lr)
    for _ in range(steps):
        transforms = [layer if context is None else layer.condition(context) for layer in layers]
        optimizer.zero_grad()
        loss = -dist.TransformedDistribution(base, transforms).log_prob(data).mean()
        loss.backward()
        optimizer.step()
    return loss.item()


def _negative_definite_flow(dim=4, lipschitz=0.9, **options):
    r"""A residual flow whose Jacobian :math:`J = -c^2\, Q^\top \operatorname{diag}(\phi') Q`
    is symmetric with eigenvalues near :math:`-0.93 c^2` (-0.75 at c = 0.9: the LipSwish
    slopes are near 1 at the large first-layer bias): every term of the series has the same
    sign, so the terms past the first few matter (at c = 0.9 the log-determinant is about
    -1.4 per dimension, the first two terms give about -1.0)."""
    torch.manual_seed(0)
    flow = residual(dim, hidden_dims=(dim,), lipschitz=lipschitz, **options).double()
    rotation = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))[0]
    first, last = flow.net.layers
    with torch.no_grad():
        first.parametrizations.weight.original.copy_(3 * rotation)  # normalised to 0.9 * rotation
        last.parametrizations.weight.original.copy_(-3 * rotation.T)
        first.bias.fill_(5.0)
    return flow.eval()


def _exact_twin(flow):
    """The same flow (same weights and buffers) with logdet="exact"."""
    net = flow.net
    twin = residual(flow.input_dim, net.hidden_dims, lipschitz=net.lipschitz, tolerance=flow.tolerance).double()
    twin.load_state_dict(flow.state_dict())
    return twin.train(flow.training)


def _draws(flow, x, count, copies=8, seed=1):
    """``count`` independent estimates of the log-determinant at each point of ``x``, each
    the mean of one call on ``copies`` copies of it (one N per call, one probe per copy)."""
    torch.manual_seed(seed)
    repeated = x.expand(copies, *x.shape)
    with torch.no_grad():
        return torch.stack([flow.log_abs_det_jacobian(repeated, None).mean(0) for _ in range(count)])


def _z(draws, expected):
    return (draws.mean(0) - expected) / (draws.std(0) / math.sqrt(len(draws)))


# ---------------------------------------------------------------------------
# The Lipschitz bound
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("exact_size", [128, 0], ids=["svd", "power-iteration"])
def test_every_layer_norm_is_at_most_c_after_training(exact_size):
    """In evaluation mode every layer's spectral norm is at most c (to float32 rounding),
    with exact singular vectors in training mode too (the default for small layers);
    with power iteration only, training mode's estimate is a lower bound of the norm."""
    torch.manual_seed(0)
    layers = [residual(2, hidden_dims=(24, 24), lipschitz=0.8)]
    for layer in layers:
        for linear in layer.net.layers:
            linear.normalization.exact_size = exact_size
    _train(layers, _skewed_data(), steps=20)
    slack = 1 + 1e-5
    for layer in layers:
        layer.net.refresh()
        for linear in layer.net.layers:
            raw = linear.parametrizations.weight.original.detach()
            estimate = linear.normalization.sigma(raw).item()
            assert estimate <= torch.linalg.matrix_norm(raw, 2).item() * slack  # u^T W v <= sigma(W)
            if exact_size:
                assert torch.linalg.matrix_norm(linear.weight.detach(), 2).item() <= 0.8 * slack
        layer.eval()
        for linear in layer.net.layers:
            assert torch.linalg.matrix_norm(linear.weight.detach(), 2).item() <= 0.8 * slack


@pytest.mark.parametrize("conditional", [False, True])
def test_g_is_lipschitz_on_random_pairs_after_training(conditional):
    torch.manual_seed(0)
    dim, c = 3, 0.9
    if conditional:
        layer = conditional_residual(dim, 2, hidden_dims=(32, 32), lipschitz=c)
        context = torch.randn(256, 2)
        _train([layer], _skewed_data(dim=dim), steps=10, context=context)
    else:
        layer = residual(dim, hidden_dims=(32, 32), lipschitz=c)
        _train([layer], _skewed_data(dim=dim), steps=10)
    net = layer.net.eval()
    assert net.lipschitz_bound == pytest.approx(c**3)
    a = 3 * torch.randn(2000, dim)
    b = torch.cat([a[:1000] + 1e-2 * torch.randn(1000, dim), 3 * torch.randn(1000, dim)])  # near and far pairs
    shared = torch.randn(2000, 2) if conditional else None  # the same context for both points of a pair
    with torch.no_grad():
        ratio = (net(a, shared) - net(b, shared)).norm(dim=-1) / (a - b).norm(dim=-1)
    assert ratio.max().item() <= net.lipschitz_bound * (1 + 1e-5) <= c


def test_lipswish_is_one_lipschitz_for_every_beta():
    z = torch.linspace(-50, 50, 20001, dtype=torch.float64)
    for beta in [1e-3, 0.3, 1.0, 10.0, 1e3]:
        beta = torch.tensor(beta, dtype=torch.float64)
        slope = lipswish_derivative(z, beta)
        assert slope.max().item() < 1 and slope.min().item() > -0.1
        point = z[::97].clone().requires_grad_()
        (autograd_slope,) = torch.autograd.grad(lipswish(point, beta).sum(), point)
        assert torch.allclose(autograd_slope, lipswish_derivative(point.detach(), beta), atol=1e-14)
    activation = LipSwish(4)
    with torch.no_grad():
        activation.raw_beta.fill_(-100.0)  # beta stays positive however the raw parameter moves
    assert (activation.beta >= 0).all() and torch.isfinite(activation(torch.randn(4))).all()


def test_the_traceable_jacobian_matches_jacrev():
    torch.manual_seed(0)
    net = LipschitzMLP(3, (8, 8), context_dim=2).double()
    g, shift = net.function(), net.shift(torch.randn(5, 2, dtype=torch.float64))
    x = torch.randn(5, 3, dtype=torch.float64)
    value, jacobian = g.value_and_jacobian(x, shift)
    expected = torch.func.vmap(torch.func.jacrev(g))(x, shift)
    assert torch.allclose(value, g(x, shift), atol=1e-14)
    assert torch.allclose(jacobian, expected, atol=1e-14)


# ---------------------------------------------------------------------------
# The inverse
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _trained(lipschitz=0.9):
    """A float64 flow trained a little (shared by the tests that only use it: copy to change it)."""
    torch.manual_seed(0)
    flow = residual(3, hidden_dims=(32, 32), lipschitz=lipschitz).double()
    _train([flow], _skewed_data(dim=3, dtype=torch.float64), steps=10)
    return flow


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("magnitude", [1.0, 1e3, 1e8])
def test_float64_round_trip_at_default_settings(magnitude):
    flow = _trained()
    x = magnitude * torch.randn(500, 3)
    x_back = flow._inverse(flow._call(x))
    error = ((x_back - x).norm(dim=-1) / (1 + x.norm(dim=-1))).max().item()
    assert error <= 1e-8 and (magnitude > 1 or (x_back - x).abs().max().item() <= 1e-8)
    assert flow.last_inverse_iterations > 1


@pytest.mark.usefixtures("float64")
def test_conditional_inverse_with_a_broadcast_context():
    torch.manual_seed(0)
    flow = moved(conditional_residual(4, 3, hidden_dims=(16,)), scale=0.5, seed=None)
    transform = flow.condition(torch.randn(5, 3))
    x = 2 * torch.randn(2, 5, 4)
    assert torch.allclose(transform._inverse(transform._call(x)), x, rtol=0, atol=1e-10)
    y = torch.randn(4)  # a point without batch, against a context batch of 5
    assert transform._inverse(y).shape == (5, 4)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("tolerance", [1e-3, 1e-6, 1e-9])
def test_the_inverse_stops_within_its_stated_tolerance(tolerance):
    """|x - x*| <= tolerance * (1 + |y|) for every point (x* from a tight solve),
    in fewer steps than the contraction bound allows, more steps for a tighter tolerance."""
    flow = _trained(lipschitz=0.97)
    y = 3 * torch.randn(300, 3)
    x_star = flow._inverse(y)
    tight_steps = flow.last_inverse_iterations
    loose = ConditionedResidual(flow.net, tolerance=tolerance)
    with torch.no_grad():
        x = loose._inverse(y)
    error = (x - x_star).norm(dim=-1) / (1 + y.norm(dim=-1))
    assert error.max().item() <= tolerance
    assert 1 <= loose.last_inverse_iterations <= tight_steps


@pytest.mark.usefixtures("float64")
def test_an_inverse_that_does_not_converge_raises_with_the_residual():
    flow = moved(residual(3, hidden_dims=(16,), max_iterations=1), scale=0.5, seed=0)
    with pytest.raises(InverseNotConverged, match=r"1 fixed-point iterations.*residual \|x \+ g\(x\) - y\| of up to"):
        flow.inv(torch.randn(20, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_to_the_inverse_is_a_clear_error(bad):
    flow = residual(3)
    y = torch.randn(4, 3)
    y[2, 1] = bad
    with pytest.raises(ValueError, match="non-finite input.*1 of 12"):
        flow.inv(y)


def test_non_finite_parameters_are_a_clear_error_in_the_inverse():
    flow = residual(3, hidden_dims=(8,))
    with torch.no_grad():
        flow.net.layers[0].bias[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values"):
        flow.inv(torch.randn(2, 3))


# ---------------------------------------------------------------------------
# Gradients through the inverse
# ---------------------------------------------------------------------------


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("logdet", ["exact", "roulette"], ids=["direct-adjoint", "iterative-adjoint"])
def test_gradients_through_the_inverse_wrt_y_and_the_context_pass_gradcheck(logdet):
    """With "exact" the hook solves (I + J)^T w = v with the Jacobian, otherwise by
    fixed-point iteration; both give the implicit-function gradients."""
    torch.manual_seed(0)
    flow = moved(conditional_residual(3, 2, hidden_dims=(8, 8), logdet=logdet), scale=0.5, seed=None)
    y = (2 * torch.randn(4, 3)).requires_grad_()
    context = torch.randn(4, 2, requires_grad=True)

    def inverse(y, context):
        return ConditionedResidual(flow.net, context, logdet=logdet, cache_size=0)._inverse(y)

    assert torch.autograd.gradcheck(inverse, (y, context))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("mode, logdet", [("train", "exact"), ("eval", "exact"), ("train", "series")])
def test_log_prob_of_data_has_the_finite_difference_gradient(mode, logdet):
    """d log p(data) / d parameters, through two residual blocks inverted by fixed-point
    iteration, along random directions in parameter space (each perturbation refreshes
    the exact singular vectors, so the map is a smooth function of the raw parameters).
    The series estimator is differentiated as it is computed: with the probes fixed by a
    seed it is a deterministic function, whose gradient finite differences check too."""
    torch.manual_seed(0)
    layers = [
        moved(residual(2, hidden_dims=(8, 8), logdet=logdet), scale=0.3, seed=k).train(mode == "train")
        for k in range(2)
    ]
    data = 1.5 * torch.randn(20, 2)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    params = [p for layer in layers for p in layer.parameters()]

    def log_prob():
        torch.manual_seed(3)  # the same probes every time
        return dist.TransformedDistribution(base, [layer.with_cache(0) for layer in layers]).log_prob(data).sum()

    gradients = torch.autograd.grad(log_prob(), params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        step = 1e-5
        with torch.no_grad():
            values = []
            for sign in (1, -1):
                for p, d in zip(params, direction):
                    p.add_(sign * step * d)
                values.append(log_prob().item())
                for p, d in zip(params, direction):
                    p.sub_(sign * step * d)
        numerical = (values[0] - values[1]) / (2 * step)
        analytic = sum((g * d).sum() for g, d in zip(gradients, direction)).item()
        assert analytic == pytest.approx(numerical, rel=1e-6, abs=1e-8)


# ---------------------------------------------------------------------------
# The stochastic log-determinants
# ---------------------------------------------------------------------------


def test_the_test_case_has_large_higher_terms():
    flow = _negative_definite_flow()
    x = torch.randn(4, 4, dtype=torch.float64)
    jacobian = flow.net.function().value_and_jacobian(x)[1]
    assert (torch.linalg.eigvalsh(jacobian) < -0.6).all()
    exact = flow.log_abs_det_jacobian(x, None)
    two_terms = _truncated_series(jacobian, 2)
    assert ((two_terms - exact) > 0.3).all()  # nats per point, a quarter of the value


def _truncated_series(jacobian, count):
    power, total = jacobian, 0
    for k in range(1, count + 1):
        total = total + (-1) ** (k + 1) / k * torch.diagonal(power, dim1=-2, dim2=-1).sum(-1)
        power = power @ jacobian
    return total


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_roulette_is_unbiased(probe):
    flow = _negative_definite_flow(logdet="roulette", probe=probe)
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = _exact_twin(flow).log_abs_det_jacobian(x, None).detach()
    draws = _draws(flow, x, count=300)
    assert (_z(draws, exact).abs() < Z_BOUND).all(), (draws.mean(0), exact)


def test_series_with_few_terms_is_biased_where_roulette_is_not():
    """Two terms: the mean is many standard errors off the exact log-determinant, and
    within its error of the exact two-term sum (the Hutchinson estimate is right, the
    truncation is the bias); forty terms: unbiased to within the error."""
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    few = _negative_definite_flow(logdet="series", count_terms=2)
    exact = _exact_twin(few).log_abs_det_jacobian(x, None).detach()
    draws = _draws(few, x, count=200)
    assert (_z(draws, exact) > 20 * Z_BOUND).all()
    two_terms = _truncated_series(few.net.function().value_and_jacobian(x)[1], 2).detach()
    assert (_z(draws, two_terms).abs() < Z_BOUND).all()
    many = _negative_definite_flow(logdet="series", count_terms=40)
    assert (_z(_draws(many, x, count=60), exact).abs() < Z_BOUND).all()


def test_the_roulette_gradient_is_unbiased():
    """The Neumann-series gradient estimator, with respect to every parameter and to
    the point itself, projected on random directions, against the exact log-det's
    gradient."""
    flow = _negative_definite_flow(logdet="roulette")
    exact_flow = _exact_twin(flow)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, dtype=torch.float64, generator=generator)

    def gradient(transform, copies=1):
        point = x.expand(copies, *x.shape).clone().requires_grad_()
        transform.zero_grad()
        transform.log_abs_det_jacobian(point, None).sum().div(copies).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in transform.parameters()]
        return torch.cat([g.flatten() for g in grads] + [point.grad.sum(0).flatten()])

    expected = gradient(exact_flow)
    torch.manual_seed(2)
    draws = torch.stack([gradient(flow, copies=8) for _ in range(200)])
    directions = torch.randn(4, expected.numel(), dtype=torch.float64, generator=generator)
    z = _z(draws @ directions.T, directions @ expected)
    assert (z.abs() < Z_BOUND).all(), z


def test_log_prob_of_data_with_the_roulette_estimator_has_an_unbiased_gradient():
    """The training signal of density estimation with "roulette": through the fixed-point
    inverse (whose hook must act on the gradient of log p, not on the estimator's own
    vector-Jacobian products), against the exact log-det's."""
    flow = _negative_definite_flow(lipschitz=0.7, logdet="roulette")  # a quicker inverse than at 0.9
    exact_flow = _exact_twin(flow)
    base = dist.Normal(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)).to_event(1)
    data = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def gradient(transform, copies=1):
        transform.zero_grad()
        points = data.expand(copies, *data.shape)
        log_prob = dist.TransformedDistribution(base, [transform.with_cache(0)]).log_prob(points)
        log_prob.sum().div(copies).backward()
        return torch.cat([p.grad.flatten() for p in transform.parameters()])

    expected = gradient(exact_flow)
    torch.manual_seed(5)
    draws = torch.stack([gradient(flow, copies=32) for _ in range(60)])
    directions = torch.randn(4, expected.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    z = _z(draws @ directions.T, directions @ expected)
    assert (z.abs() < Z_BOUND).all(), z
    # And the estimate at the inverse's output is the estimate at that point, hook or none.
    x = flow._inverse(data.clone().requires_grad_())
    torch.manual_seed(7)
    at_output = flow.log_abs_det_jacobian(x, data)
    torch.manual_seed(7)
    assert torch.allclose(at_output, flow.log_abs_det_jacobian(x.detach(), data), rtol=0, atol=1e-12)


@pytest.mark.parametrize("logdet", ["series", "roulette"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_log_dets_shapes_dtypes_and_graphs(logdet, dtype):
    torch.manual_seed(0)
    flow = conditional_residual(3, 2, hidden_dims=(8,), logdet=logdet).to(dtype)
    transform = flow.condition(torch.randn(5, 2, dtype=dtype))
    for shape in [(5,), (4, 5), (1,)]:
        x = torch.randn(*shape, 3, dtype=dtype)
        log_det = transform.log_abs_det_jacobian(x, transform(x))
        assert log_det.shape == torch.broadcast_shapes(shape, (5,)) and log_det.dtype == dtype
        (log_det.sum() + transform(x).sum()).backward()  # gradients reach the parameters
        with torch.no_grad():
            assert not transform.log_abs_det_jacobian(x, None).requires_grad
    assert all(p.grad is not None for p in flow.parameters())
    torch.manual_seed(7)
    first = transform.log_abs_det_jacobian(x, None)
    torch.manual_seed(7)
    assert torch.equal(first, transform.log_abs_det_jacobian(x, None))  # draws from torch's generator


def test_training_with_the_roulette_estimator_lowers_the_exact_loss():
    torch.manual_seed(0)
    data = _skewed_data()
    layers = [residual(2, hidden_dims=(32, 32), logdet="roulette") for _ in range(2)]
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)

    def exact_loss():
        exact = [_exact_twin(layer).float() for layer in layers]
        with torch.no_grad():
            return -dist.TransformedDistribution(base, exact).log_prob(data).mean().item()

    before = exact_loss()
    _train(layers, data, steps=25, lr=2e-2)
    assert exact_loss() < before - 0.2


# ---------------------------------------------------------------------------
# The direction: which way is one pass
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction, scoring_solves", [("iaf", True), ("maf", False)])
def test_the_direction_decides_which_way_solves(direction, scoring_solves):
    torch.manual_seed(0)
    flow = residual(2, hidden_dims=(16,), direction=direction)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    density = dist.TransformedDistribution(base, [flow])
    density.log_prob(_skewed_data(8))
    assert (flow.last_inverse_iterations is not None) == scoring_solves
    flow.last_inverse_iterations = None
    density.sample((8,))
    assert (flow.last_inverse_iterations is not None) != scoring_solves


def test_the_two_directions_are_inverses_of_each_other():
    torch.manual_seed(0)
    iaf = residual(3, hidden_dims=(16,)).double()
    maf = residual(3, hidden_dims=(16,), direction="maf").double()
    maf.load_state_dict(iaf.state_dict())
    x = torch.randn(6, 3, dtype=torch.float64)
    y = iaf(x)
    assert torch.equal(maf.inv(x), y) and torch.allclose(maf(y), x, atol=1e-12)
    assert torch.allclose(maf.log_abs_det_jacobian(y, x), -iaf.log_abs_det_jacobian(x, y), atol=1e-12)


def test_fit_scores_data_in_one_pass():
    from pyro_nflows.density import DensityModel

    model = DensityModel(2, flow="residual", num_layers=2)
    directions = [layer.direction for layer in model.layers if isinstance(layer, Residual)]
    assert directions == ["maf", "maf"]


# ---------------------------------------------------------------------------
# The power-iteration buffers: state_dict, pickling, cache
# ---------------------------------------------------------------------------


def _power_iteration_flow():
    """A trained flow whose vectors come from power iteration (not exact), so that
    losing or recomputing them would show."""
    torch.manual_seed(0)
    flow = residual(2, hidden_dims=(16, 16))
    for linear in flow.net.layers:
        linear.normalization.exact_size = 0
    _train([flow], _skewed_data(), steps=5)
    return flow


def test_state_dict_round_trip_keeps_the_power_iteration_buffers():
    flow = _power_iteration_flow()
    state = flow.state_dict()
    vectors = [key for key in state if key.endswith(("weight.0.u", "weight.0.v"))]
    assert len(vectors) == 2 * len(flow.net.layers)
    x = torch.randn(7, 2)
    expected = flow._call(x)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = residual(2, hidden_dims=(16, 16))
    for linear in restored.net.layers:
        linear.normalization.exact_size = 0
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored._call(x), expected)  # training mode: the loaded vectors are used as they are
    assert all(torch.equal(restored.state_dict()[key], state[key]) for key in vectors)
    # Without the vectors the layer refreshes them instead of trusting random ones.
    partial = {key: value for key, value in state.items() if key not in vectors}
    other = residual(2, hidden_dims=(16, 16))
    other.load_state_dict(partial, strict=False)
    raw = other.net.layers[0].parametrizations.weight.original.detach()
    other.net.refresh()
    assert other.net.layers[0].normalization.sigma(raw).item() == pytest.approx(
        torch.linalg.matrix_norm(raw, 2).item(), rel=1e-5
    )


def test_a_whole_flow_pickles_and_copies():
    flow = _power_iteration_flow()
    x = torch.randn(7, 2)
    expected = flow._call(x)
    buffer = io.BytesIO()
    torch.save(flow, buffer)  # as torch.save(guide) does with the flows inside
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded._call(x), expected)
    assert torch.equal(copy.deepcopy(flow)._call(x), expected)  # a copy is the same map
    layer = loaded.net.layers[0]
    assert layer.normalization.n_power_iterations == 1 and layer.normalization.exact_size == 0
    # So is a conversion: the converted vectors are kept, not iterated again.
    vectors = [linear.normalization.u.clone() for linear in flow.net.layers]
    converted = flow.double()
    assert torch.allclose(converted._call(x.double()), expected.double(), atol=1e-6)
    assert all(torch.equal(linear.normalization.u, u.double()) for linear, u in zip(converted.net.layers, vectors))


def test_switching_to_evaluation_refreshes_the_weights_and_the_cache():
    flow = _power_iteration_flow()
    x = torch.randn(7, 2)
    with torch.no_grad():
        y = flow(x)
        assert flow.inv(y) is x
        flow.eval()  # exact singular vectors now: the map changes, so must the cached answer
        x_new = flow.inv(y)
        assert x_new is not x and torch.equal(x_new, flow._inverse(y))


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lipschitz", [0, 1, 1.5, -0.5, float("nan"), True, "0.9"])
def test_a_lipschitz_constant_outside_zero_one_is_refused(lipschitz):
    for build in (
        lambda: residual(3, lipschitz=lipschitz),
        lambda: conditional_residual(3, 2, lipschitz=lipschitz),
        lambda: ConditionedResidual(LipschitzMLP(3, (4,), lipschitz=2.0)),
    ):
        with pytest.raises(ValueError, match="lipschitz must be a number strictly between 0 and 1"):
            build()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tolerance=0.0), "tolerance must be a positive"),
        (dict(tolerance=-1e-6), "tolerance must be a positive"),
        (dict(tolerance=float("nan")), "tolerance must be a positive"),
        (dict(max_iterations=0), "max_iterations must be an integer >= 1"),
        (dict(max_iterations=-3), "max_iterations must be an integer >= 1"),
        (dict(max_iterations=2.5), "max_iterations must be an integer >= 1"),
        (dict(logdet="trace"), "logdet must be one of 'exact', 'series', 'roulette'"),
        (dict(probe="uniform"), "probe must be one of"),
        (dict(count_terms=0), "count_terms must be an integer >= 1"),
        (dict(count_exact_terms=-1), "count_exact_terms must be an integer >= 0"),
        (dict(roulette_p=0.0), "roulette_p must be a number strictly between 0 and 1"),
        (dict(roulette_p=1.0), "roulette_p must be a number strictly between 0 and 1"),
        (dict(n_power_iterations=0), "n_power_iterations must be an integer >= 1"),
        (dict(direction="forward"), "direction must be one of 'iaf', 'maf'"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        residual(3, **options)
    with pytest.raises(ValueError, match=message):
        conditional_residual(3, 2, **options)


def test_a_context_of_the_wrong_kind_is_refused():
    net = LipschitzMLP(3, (4,), context_dim=2)
    with pytest.raises(ValueError, match="reads a context of width 2"):
        net(torch.randn(3))
    with pytest.raises(ValueError, match="takes no context"):
        LipschitzMLP(3, (4,))(torch.randn(3), torch.randn(2))


# ---------------------------------------------------------------------------
# Declarations and docs
# ---------------------------------------------------------------------------


def test_declarations():
    flow = residual(3)
    assert isinstance(flow, Residual) and flow.bijective and not hasattr(flow, "sign")
    assert not getattr(flow, "volume_preserving", False)
    assert [linear.out_features for linear in flow.net.layers[:-1]] == [64, 64]  # the "coupling" widths
    conditioned = conditional_residual(3, 2).condition(torch.zeros(2))
    assert "logdet='exact'" in repr(flow) and "lipschitz=0.9" in repr(conditioned)


@pytest.mark.parametrize("module_name", ["pyro_nflows.transforms.residual_flow", "pyro_nflows.nn.lipschitz"])
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(module, globs={"torch": torch, **vars(module)}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
