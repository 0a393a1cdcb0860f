"""Continuous (neural-ODE) flows: the shared checks, the network's derivatives,
Hutchinson's estimator, the adjoint, regularisation, settings and failures.

The solves are kept small (D = 2 or 3, narrow networks, float64 where a
tolerance is tight), so the file runs in well under a minute.
"""

import doctest
import importlib
import io
import warnings

import pytest
import torch
from checks import check_transform, moved

from pyro_nflows.nn import ODENet
from pyro_nflows.transforms import (
    ConditionedContinuous,
    Continuous,
    ContinuousOptions,
    ODESolveError,
    conditional_continuous,
    continuous,
    exact_trace,
)

# Tight enough for the shared log-det check (<= 1e-6 against the autograd
# Jacobian in float64; the error at 1e-7 is about 1e-8) and a float64 round
# trip well inside 1e-6 (about 3e-8 here); float32 solves are floored at 10
# epsilons (1.2e-6), which its 1e-4 round trip allows.
TIGHT = dict(atol=1e-7, rtol=1e-7)


# ---------------------------------------------------------------------------
# The shared contract
# ---------------------------------------------------------------------------


def test_shared_checks():
    check_transform(lambda: continuous(3, hidden_dims=(16, 16), **TIGHT), 3, round_trip_atol64=1e-6)


def test_shared_checks_conditional():
    check_transform(
        lambda: conditional_continuous(3, 2, hidden_dims=(16, 16), **TIGHT), 3, 2, round_trip_atol64=1e-6
    )


@pytest.mark.parametrize("solver", ["dopri5", "dopri8"])
def test_float64_round_trip_at_tight_tolerances(solver):
    flow = moved(continuous(3, hidden_dims=(16, 16), atol=1e-10, rtol=1e-10, solver=solver).double())
    x = torch.randn(20, 3, dtype=torch.float64)
    y, log_det = flow._call_and_log_det(x)
    x_back, log_det_back = flow._inverse_and_log_det(y)
    assert (x_back - x).abs().max() <= 1e-6  # the bound; it is about 1e-10 here
    assert (log_det_back - log_det).abs().max() <= 1e-6


def test_deep_network_log_det_and_trace_by_jit():
    """Three hidden layers: the exact trace from the Jacobian pushed forward
    (no closed form), against the autograd Jacobian; torch.jit.trace works."""
    flow = moved(continuous(2, hidden_dims=(4, 4, 4), **TIGHT).double())
    assert not flow.net.has_closed_form_trace
    x = torch.randn(2, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(flow._call, x)
    assert (torch.linalg.slogdet(jacobian)[1] - flow._call_and_log_det(x)[1]).abs() <= 1e-6
    holder = _Holder(flow)
    points = torch.randn(4, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(holder, (points,), check_trace=False)
    for got, expected in zip(traced(points), holder(points)):
        assert torch.allclose(got, expected)


class _Holder(torch.nn.Module):
    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        y = self.flow(x)
        return y, self.flow.log_abs_det_jacobian(x, y)


# ---------------------------------------------------------------------------
# The network's derivatives, against autograd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_dims", [(), (7,), (6, 5), (4, 5, 3)])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_network_trace_jacobian_and_vjp_match_autograd(hidden_dims, context_dim):
    torch.manual_seed(0)
    net = moved(ODENet(3, hidden_dims, context_dim=context_dim).double(), scale=0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    context = torch.randn(4, context_dim, dtype=torch.float64) if context_dim else None
    t = torch.tensor(0.7, dtype=torch.float64)
    prepared = net.prepare(context)
    expected = torch.stack([
        torch.func.jacrev(lambda p: net.velocity(t, p, net.prepare(None if c is None else c)))(point)
        for point, c in zip(x, [None] * 4 if context is None else context)
    ])
    velocity, jacobian = net.velocity_and_jacobian(t, x, prepared)
    assert torch.allclose(velocity, net(x, t, context))
    assert torch.allclose(jacobian, expected, atol=1e-12)
    vector = torch.randn(4, 3, dtype=torch.float64)
    _, product = net.velocity_and_vjp(t, x, prepared, vector)
    assert torch.allclose(product, torch.einsum("ni,nij->nj", vector, expected), atol=1e-12)
    if net.has_closed_form_trace:
        _, trace = net.velocity_and_trace(t, x, prepared)
        assert torch.allclose(trace, torch.diagonal(expected, dim1=-2, dim2=-1).sum(-1), atol=1e-12)
    else:
        with pytest.raises(NotImplementedError, match="two hidden layers"):
            net.velocity_and_trace(t, x, prepared)


def test_affine_field_log_det_is_time_times_trace():
    flow = moved(continuous(3, hidden_dims=(), time=2.5, **TIGHT).double())
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = 2.5 * torch.diagonal(flow.net.output.weight).sum()
    assert torch.allclose(flow._call_and_log_det(x)[1], expected.expand(5), atol=1e-9)


# ---------------------------------------------------------------------------
# Hutchinson's estimator
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_dims, probe", [((16, 16), "rademacher"), ((8, 8, 8), "gaussian")])
def test_hutchinson_is_unbiased(hidden_dims, probe):
    """One point repeated 2000 times is 2000 independent probes in one solve:
    their mean log-det is the exact one within 4 standard errors (seeded)."""
    torch.manual_seed(1)
    flow = moved(continuous(3, hidden_dims=hidden_dims, atol=1e-8, rtol=1e-8, probe=probe).double(), scale=0.5)
    x = torch.randn(2, 3, dtype=torch.float64)
    exact = flow._call_and_log_det(x)[1]
    flow.trace = "hutchinson"
    draws = flow._call_and_log_det(x.repeat(2000, 1))[1].reshape(2000, 2)
    error = draws.std(0) / 2000**0.5
    z = (draws.mean(0) - exact) / error
    assert (z.abs() < 4).all(), z
    assert (draws.std(0) > 1e-3).all()  # a real estimate, not the exact trace
    with flow.exact_trace():
        assert torch.allclose(flow._call_and_log_det(x)[1], exact)


def test_the_probe_is_fixed_along_a_solve():
    """For an affine field f = W x + ..., eps^T W eps is constant in time, so with
    one Rademacher probe per solve each estimate is T (tr W +- (W12 + W21)) exactly;
    a probe redrawn along the solve would average between the two."""
    torch.manual_seed(0)
    flow = moved(continuous(2, hidden_dims=(), trace="hutchinson", **TIGHT).double())
    w = flow.net.output.weight
    values = torch.stack([w.trace() + (w[0, 1] + w[1, 0]), w.trace() - (w[0, 1] + w[1, 0])])
    estimates = flow._call_and_log_det(torch.randn(200, 2, dtype=torch.float64))[1]
    nearest = (estimates[:, None] - values).abs().min(-1).values
    assert nearest.max() < 1e-9
    assert {int(i) for i in (estimates[:, None] - values).abs().argmin(-1)} == {0, 1}


# ---------------------------------------------------------------------------
# The adjoint
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("trace, hidden_dims, regularize", [("exact", (8, 8), False), ("hutchinson", (6, 6, 6), True)])
def test_adjoint_gradients_match_backpropagation(trace, hidden_dims, regularize):
    """Both directions, with a context that requires grad. Direct backprop is the
    exact gradient of the computed map and the adjoint solves its own equation to
    the same tolerance, so both are within O(tol) of the true gradient: at
    tol = 1e-8 they agree to about 1e-8 of the gradient's size; 1e-6 leaves room."""
    gradients = []
    for adjoint in (False, True):
        torch.manual_seed(0)
        flow = conditional_continuous(
            3, 2, hidden_dims, atol=1e-8, rtol=1e-8, adjoint=adjoint, trace=trace, regularize=regularize
        )
        flow = moved(flow.double())
        x = torch.randn(6, 3, dtype=torch.float64)
        context = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
        transform = flow.condition(context)
        z, log_det = transform._inverse_and_log_det(x)
        loss = z.square().sum() + log_det.sum()
        if regularize:
            loss = loss + sum(value.sum() for value in flow.last_regularization)
        y, log_det = transform._call_and_log_det(x)
        loss = loss + (y * torch.linspace(0.5, 2.0, 3, dtype=torch.float64)).sum() - log_det.sum()
        grads = torch.autograd.grad(loss, [*flow.parameters(), context])
        gradients.append(torch.cat([g.flatten() for g in grads]))
    direct, adjoint = gradients
    assert (adjoint - direct).abs().max() <= 1e-6 * direct.abs().max()


# ---------------------------------------------------------------------------
# Regularisation
# ---------------------------------------------------------------------------


def _affine_flow(weight, bias, **options):
    """A flow whose field is exactly W x + b (no hidden layer, no time dependence)."""
    flow = continuous(2, hidden_dims=(), regularize=True, **TIGHT, **options).double()
    with torch.no_grad():
        flow.net.output.weight.copy_(weight)
        flow.net.output.bias.copy_(bias)
        flow.net.hyper.weight.zero_()
        flow.net.hyper.bias.zero_()
    return flow


def test_regularization_of_known_fields():
    x = torch.randn(4, 2, dtype=torch.float64)
    bias = torch.tensor([0.3, -1.2], dtype=torch.float64)
    flow = _affine_flow(torch.zeros(2, 2), bias, time=2.0)  # constant field
    y, log_det = flow._call_and_log_det(x)
    assert torch.allclose(y, x + 2.0 * bias) and torch.allclose(log_det, torch.zeros(4, dtype=torch.float64))
    regularization = flow.last_regularization
    assert torch.allclose(regularization.kinetic_energy, 2.0 * bias.square().sum().expand(4))
    assert torch.allclose(regularization.jacobian_norm, torch.zeros(4, dtype=torch.float64))
    # A rotation at speed c: |f|^2 = c^2 |x|^2 along the path, ||J||_F^2 = 2 c^2 (and |eps^T J|^2 for
    # Rademacher probes is exactly that), log|det| = 0. The inverse walks the same path backwards.
    c = 1.5
    rotation = _affine_flow(torch.tensor([[0.0, -c], [c, 0.0]]), torch.zeros(2))
    for call in (rotation._call_and_log_det, rotation._inverse_and_log_det):
        _, log_det = call(x)
        regularization = rotation.last_regularization
        assert torch.allclose(regularization.kinetic_energy, c**2 * x.square().sum(-1), atol=1e-6)
        assert torch.allclose(regularization.jacobian_norm, torch.full((4,), 2 * c**2, dtype=torch.float64))
        assert torch.allclose(log_det, torch.zeros(4, dtype=torch.float64), atol=1e-9)


def test_regularization_leaves_the_map_alone_and_trains():
    plain = moved(conditional_continuous(2, 3, hidden_dims=(8, 8)))
    regularized = conditional_continuous(2, 3, hidden_dims=(8, 8), regularize=True)
    regularized.load_state_dict(plain.state_dict())
    x, context = torch.randn(10, 2), torch.randn(10, 3)
    expected = plain.condition(context)._call_and_log_det(x)
    transform = regularized.condition(context)
    got = transform._call_and_log_det(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert plain.last_regularization is None
    regularization = regularized.last_regularization
    assert regularization is transform.last_regularization and regularization.kinetic_energy.shape == (10,)
    (regularization.kinetic_energy.mean() + regularization.jacobian_norm.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in regularized.parameters())


# ---------------------------------------------------------------------------
# Settings, exact_trace, state_dict, small cases
# ---------------------------------------------------------------------------


def test_exact_trace_reaches_every_flow_in_a_module_and_restores():
    torch.manual_seed(0)
    flows = torch.nn.ModuleList([
        moved(continuous(2, hidden_dims=(8, 8), trace="hutchinson")),
        moved(conditional_continuous(2, 3, hidden_dims=(8, 8), trace="hutchinson")),
    ])
    conditioned = flows[1].condition(torch.randn(3))  # made before: it shares the options
    x = torch.randn(5, 2)
    with exact_trace(flows):
        assert flows[0].trace == flows[1].trace == conditioned.trace == "exact"
        first = conditioned._call_and_log_det(x)[1]
        assert torch.equal(first, conditioned._call_and_log_det(x)[1])  # no probe: deterministic
    assert flows[0].trace == flows[1].trace == conditioned.trace == "hutchinson"
    assert not torch.equal(first, conditioned._call_and_log_det(x)[1])


def test_state_dict_round_trip():
    for build, context in [
        (lambda: continuous(3, hidden_dims=(8, 8)), None),
        (lambda: conditional_continuous(3, 2, hidden_dims=(8, 8)), torch.randn(5, 2)),
    ]:
        trained = moved(build())
        x = torch.randn(5, 3)
        expected = (trained if context is None else trained.condition(context))._call_and_log_det(x)
        buffer = io.BytesIO()
        torch.save(trained.state_dict(), buffer)
        buffer.seek(0)
        restored = build()
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        got = (restored if context is None else restored.condition(context))._call_and_log_det(x)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_defaults_and_options():
    flow = continuous(3)
    assert flow.net.hidden_dims == (64, 64)
    assert flow.options.as_dict() == dict(
        trace="exact", probe="rademacher", solver="dopri5", atol=1e-5, rtol=1e-5, time=1.0, adjoint=False,
        max_steps=1000, step_size=None, regularize=False,
    )
    options = ContinuousOptions(atol=1e-10, rtol=1e-3)
    eps32 = torch.finfo(torch.float32).eps
    assert options.tolerances(torch.float32) == (10 * eps32, 1e-3)
    assert options.tolerances(torch.float64) == (1e-10, 1e-3)
    flow.atol = 1e-6
    assert flow.options.atol == 1e-6
    with pytest.raises(AttributeError, match="no setting"):
        flow.options.tolerance = 1e-3
    assert isinstance(conditional_continuous(3, 2).condition(torch.randn(2)), ConditionedContinuous)
    assert isinstance(flow, Continuous)


def test_fixed_step_solver():
    flow = moved(continuous(2, hidden_dims=(8, 8), solver="rk4", step_size=0.05).double())
    x = torch.randn(6, 2, dtype=torch.float64)
    y, log_det = flow._call_and_log_det(x)
    assert flow.last_solve == (20, 20, 80)  # steps, accepted, evaluations: four per RK4 step
    x_back, log_det_back = flow._inverse_and_log_det(y)
    # RK4 run backwards inverts RK4 only up to its O(h^4) error.
    assert (x_back - x).abs().max() < 1e-5 and (log_det_back - log_det).abs().max() < 1e-5


def test_empty_batch():
    flow = conditional_continuous(3, 2, hidden_dims=(8, 8)).condition(torch.randn(2))
    y, log_det = flow._call_and_log_det(torch.zeros(0, 3))
    assert y.shape == (0, 3) and log_det.shape == (0,)


@pytest.mark.parametrize("module_name", ["pyro_nflows.transforms.continuous_flow", "pyro_nflows.nn.ode"])
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(module, globs={"torch": torch, **vars(module)}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


# ---------------------------------------------------------------------------
# Bad input and failures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        ({"atol": 0.0}, "atol"),
        ({"atol": -1e-5}, "atol"),
        ({"rtol": 0}, "rtol"),
        ({"rtol": float("nan")}, "rtol"),
        ({"time": 0.0}, "time"),
        ({"time": -1.0}, "time"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"solver": "rk45"}, "solver must be one of"),
        ({"trace": "approximate"}, "trace must be one of"),
        ({"probe": "normal"}, "probe must be one of"),
        ({"adjoint": 1}, "adjoint"),
        ({"regularize": "yes"}, "regularize"),
        ({"solver": "rk4"}, "needs a step_size"),
        ({"solver": "rk4", "step_size": 0.0}, "step_size"),
        ({"step_size": 0.1}, "chooses its own steps"),
    ],
)
def test_bad_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        continuous(2, **options)
    with pytest.raises(ValueError, match=match):
        conditional_continuous(2, 3, **options)


def test_bad_settings_and_inputs_raise_value_error():
    flow = continuous(2, hidden_dims=(4, 4))
    with pytest.raises(ValueError, match="trace must be one of"):
        flow.trace = "cheap"
    with pytest.raises(ValueError, match="max_steps"):
        flow.max_steps = -3
    assert flow.trace == "exact" and flow.max_steps == 1000
    transform = conditional_continuous(2, 3, hidden_dims=(4, 4)).condition(torch.randn(3))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 2)
        x[1, 0] = bad
        for call in (flow, flow.inv, transform, transform.inv):
            with pytest.raises(ValueError, match="non-finite"):
                call(x)


def _stiff(flow, scale=3000.0):
    with torch.no_grad():
        flow.net.output.weight.mul_(scale)
    return flow


@pytest.mark.parametrize("inverse", [False, True])
def test_exceeding_the_step_budget_raises(inverse):
    torch.manual_seed(0)
    flow = _stiff(continuous(2, hidden_dims=(8, 8), max_steps=3).double())
    call = flow.inv if inverse else flow
    with pytest.raises(ODESolveError, match=r"max_steps=3 steps: it reached t=[0-9.e-]+ .* after 3 steps") as info:
        call(torch.randn(3, 2, dtype=torch.float64))
    assert info.value.steps == 3
    assert 0.0 <= info.value.time_reached < 1.0 if not inverse else 0.0 < info.value.time_reached <= 1.0


def test_a_failing_solver_raises_a_named_error():
    """torchdiffeq's own assertion (step size underflow, here from an infinite
    field) becomes an ODESolveError; so does a fixed-step solve that goes non-finite."""
    flow = continuous(2, hidden_dims=(8, 8)).double()
    with torch.no_grad():
        flow.net.output.bias.fill_(float("inf"))
    with pytest.raises(ODESolveError, match=r"underflow in dt.*reached t=0 "):
        flow(torch.randn(3, 2, dtype=torch.float64))
    fixed = continuous(2, hidden_dims=(8, 8), solver="euler", step_size=0.25).double()
    with torch.no_grad():
        fixed.net.output.bias.fill_(float("nan"))
    with pytest.raises(ODESolveError, match="non-finite") as info:
        fixed.inv(torch.randn(3, 2, dtype=torch.float64))
    assert info.value.time_reached == 1.0 and info.value.steps == 1


def test_the_adjoint_solve_has_a_budget_too():
    torch.manual_seed(0)
    flow = _stiff(continuous(2, hidden_dims=(8, 8), adjoint=True, atol=1e-6, rtol=1e-6).double(), 300.0)
    with torch.no_grad():
        flow.net.layers[0].weight.mul_(3)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    flow(x)
    flow.max_steps = flow.last_solve.steps  # enough for the forward solve; the adjoint solve takes more
    y = flow(x.clone())
    with pytest.raises(ODESolveError, match="adjoint ODE solve") as info:
        y.sum().backward()
    assert 0.0 <= info.value.time_reached <= 1.0
