"""Sylvester flows beyond the shared checks: orthonormality of Q, agreement with
the explicit formula, Pyro's wrong log-determinant, inversion of arbitrary
points (far away ones included), gradients through the numerical inverse, and
errors."""

import doctest
import functools

import pytest
import torch
from checks import moved
from pyro.distributions.transforms import Sylvester as PyroSylvester

from pyro_nflows.transforms import (
    ConditionalSylvester,
    ConditionedSylvester,
    Sylvester,
    conditional_sylvester,
    sylvester,
)
from pyro_nflows.transforms import sylvester_flow as MODULE
from pyro_nflows.transforms.roots import InverseNotConverged, monotone_root
from pyro_nflows.transforms.sylvester_flow import KINDS, OrthogonalisationNotConverged, orthogonalise

pytestmark = pytest.mark.usefixtures("float64")

KIND_OPTIONS = [
    {"kind": "orthogonal"},
    {"kind": "orthogonal", "count_ortho_vectors": 1},
    {"kind": "orthogonal", "count_ortho_vectors": 6},
    {"kind": "householder"},
    {"kind": "householder", "count_transforms": 2},
    {"kind": "triangular"},
    {"kind": "triangular", "reverse": True},
]


def _explicit(flow, x):
    """y = x + Q R tanh(R~ Q^T x + b) with dense matrices."""
    q = flow.orthonormal_matrix()
    r, r_tilde = flow.upper_factors()
    return x + q @ r @ torch.tanh(r_tilde @ q.T @ x + flow.bias)


# ---------------------------------------------------------------------------
# Q
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 3), (6, 6), (64, 32), (4, 40, 20)])
def test_orthogonalise_reaches_rounding_level_and_the_polar_factor(dtype, shape):
    matrix = torch.randn(shape, dtype=dtype)
    q = orthogonalise(matrix)
    eps = torch.finfo(dtype).eps
    defect = (q.mT @ q - torch.eye(shape[-1], dtype=dtype)).abs().max().item()
    assert defect <= 8 * shape[-2] ** 0.5 * eps
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert torch.allclose(q.double(), u @ vh, atol=1e3 * eps)  # the nearest orthonormal matrix


def test_orthogonalise_keeps_an_orthonormal_matrix():
    q = torch.linalg.qr(torch.randn(7, 4)).Q
    assert torch.allclose(orthogonalise(q), q, atol=1e-15)


@pytest.mark.parametrize("options", KIND_OPTIONS)
def test_q_has_orthonormal_columns(options):
    flow = moved(sylvester(6, **options), scale=0.5, seed=None)
    q = flow.orthonormal_matrix()
    assert q.shape == (6, flow.num_hidden)
    assert (q.T @ q - torch.eye(flow.num_hidden)).abs().max() <= 1e-14
    batched = conditional_sylvester(6, 3, **options).condition(torch.randn(4, 3)).orthonormal_matrix()
    assert (batched.mT @ batched - torch.eye(flow.num_hidden)).abs().max() <= 1e-14


def test_dependent_columns_raise_instead_of_a_wrong_q():
    matrix = torch.randn(5, 3)
    matrix[:, 2] = matrix[:, 0]
    with pytest.raises(OrthogonalisationNotConverged, match="linearly dependent"):
        orthogonalise(matrix)
    flow = sylvester(5)
    with torch.no_grad():
        flow.q.copy_(matrix)
    with pytest.raises(OrthogonalisationNotConverged):
        flow(torch.randn(5))
    with pytest.raises(ValueError, match="non-finite"):
        orthogonalise(torch.full((3, 2), float("nan")))


# ---------------------------------------------------------------------------
# Forward and log-determinant
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", KIND_OPTIONS)
def test_forward_matches_the_explicit_formula_and_log_det_matches_autograd(options):
    flow = moved(sylvester(6, **options), scale=1.0, seed=None)
    for _ in range(3):
        x = 2 * torch.randn(6)
        assert torch.allclose(flow(x), _explicit(flow, x), atol=1e-13)
        jacobian = torch.autograd.functional.jacobian(flow._call, x)
        expected = torch.linalg.slogdet(jacobian).logabsdet
        assert abs(flow.log_abs_det_jacobian(x, flow(x)) - expected) <= 1e-12


def test_log_det_is_accurate_near_the_limits():
    # R_ii R~_ii close to -1 (nearly singular) and saturated pre-activations.
    flow = sylvester(4, kind="householder", count_transforms=3)
    with torch.no_grad():
        flow.r_diagonal.fill_(5.0)
        flow.r_tilde_diagonal.fill_(-5.0)
        flow.bias.copy_(torch.tensor([0.0, 30.0, -40.0, 400.0]))
    x = torch.randn(4)
    jacobian = torch.autograd.functional.jacobian(flow._call, x)
    expected = torch.linalg.slogdet(jacobian).logabsdet
    actual = flow.log_abs_det_jacobian(x, flow(x))
    assert torch.isfinite(actual) and abs(actual - expected) <= 1e-9


@pytest.mark.parametrize("reverse", [False, True])
def test_triangular_kind_has_a_triangular_jacobian(reverse):
    flow = moved(sylvester(5, kind="triangular", reverse=reverse), scale=0.5, seed=None)
    jacobian = torch.autograd.functional.jacobian(flow._call, torch.randn(5))
    triangle = torch.tril(jacobian, -1) if not reverse else torch.triu(jacobian, 1)
    assert torch.equal(triangle, torch.zeros(5, 5))


def _pyro_and_ours(dim, count):
    """Pyro's Sylvester with moved parameters, and ours with the same parameters.

    Pyro builds Q = H(u_1) H(u_2) ... H(u_K) (its rows of u_unnormed in order);
    ``reflect`` applies H(v_K) ... H(v_1), so our vectors are Pyro's reversed.
    Pyro's R and S are R_dense, S_dense masked to the strict upper triangle
    plus diag(tanh(R_diag)), diag(tanh(S_diag)): ours exactly.
    """
    pyro_flow = PyroSylvester(dim, count_transforms=count)
    with torch.no_grad():
        for parameter in pyro_flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    rows, cols = torch.triu_indices(dim, dim, 1)
    ours = ConditionedSylvester(
        dim,
        "householder",
        q=pyro_flow.u_unnormed.flip(0),
        r_entries=pyro_flow.R_dense[rows, cols],
        r_diagonal=pyro_flow.R_diag,
        r_tilde_entries=pyro_flow.S_dense[rows, cols],
        r_tilde_diagonal=pyro_flow.S_diag,
        bias=pyro_flow.b,
    )
    return pyro_flow, ours


def test_pyro_log_det_is_wrong_once_parameters_move_and_ours_is_right():
    dim = 5
    pyro_errors, our_errors = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        pyro_flow, ours = _pyro_and_ours(dim, count=3)
        x = torch.randn(dim)
        assert torch.allclose(ours.orthonormal_matrix(), pyro_flow.Q(x), atol=1e-14)
        r, r_tilde = ours.upper_factors()
        assert torch.equal(r, pyro_flow.R()) and torch.equal(r_tilde, pyro_flow.S())

        pyro_jacobian = torch.autograd.functional.jacobian(pyro_flow._call, x)
        pyro_log_det = pyro_flow.log_abs_det_jacobian(x, pyro_flow(x))
        pyro_errors.append((pyro_log_det - torch.linalg.slogdet(pyro_jacobian).logabsdet).abs().item())
        our_jacobian = torch.autograd.functional.jacobian(ours._call, x)
        our_log_det = ours.log_abs_det_jacobian(x, ours(x))
        our_errors.append((our_log_det - torch.linalg.slogdet(our_jacobian).logabsdet).abs().item())

        # What Pyro returns is the log-det of *our* map (the paper's), at the
        # point x' whose pre-activation R~ Q^T x' + b equals Pyro's x S Q^T + b
        # (up to the 1e-8 Pyro adds inside log1p).
        q = ours.orthonormal_matrix()
        pyro_pre = x @ pyro_flow.S() @ q.T + pyro_flow.b
        x_matched = q @ torch.linalg.solve(r_tilde, pyro_pre - pyro_flow.b)
        assert abs(pyro_log_det - ours.log_abs_det_jacobian(x_matched, None)) <= 1e-7
    assert max(our_errors) <= 1e-12
    # About 1e-2 at a 0.3 perturbation (0.002 to 0.14 over these seeds).
    assert sum(pyro_errors) / len(pyro_errors) >= 1e-2
    assert min(pyro_errors) >= 1e-3


def test_pyro_cannot_invert_a_point_it_did_not_produce_and_we_can():
    pyro_flow, ours = _pyro_and_ours(4, count=2)
    y = torch.randn(4)
    with pytest.raises(KeyError):
        pyro_flow.inv(y)
    assert torch.allclose(ours(ours.inv(y)), y, atol=1e-14)


# ---------------------------------------------------------------------------
# Inverse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", KIND_OPTIONS)
@pytest.mark.parametrize("scale", [1.0, 10.0, 1e3, 1e8])
def test_inverts_points_the_flow_did_not_produce(options, scale):
    flow = moved(sylvester(6, **options), scale=1.0, seed=None)
    y = scale * torch.randn(50, 6)
    x = flow._inverse(y)
    # forward(inverse(y)) == y to rounding, relative to the size of y.
    assert (flow._call(x) - y).abs().max() <= 1e-14 * scale
    # and inverse(forward(x)) == x for points the flow did produce.
    assert (flow._inverse(flow._call(x)) - x).abs().max() <= 1e-14 * scale


@pytest.mark.parametrize("options", KIND_OPTIONS)
def test_float32_round_trip(options):
    flow = moved(sylvester(6, **options), scale=1.0, seed=None).float()
    x = torch.randn(200, 6, dtype=torch.float32)
    assert (flow._inverse(flow._call(x)) - x).abs().max() <= 1e-5
    y = 1e3 * torch.randn(200, 6, dtype=torch.float32)
    assert ((flow._call(flow._inverse(y)) - y).abs() / y.abs().max()).max() <= 1e-6


def test_inverse_of_a_nearly_singular_flow():
    # R_ii R~_ii = tanh(5) tanh(-5) ~ -0.9998: slopes down to ~2e-4.
    flow = moved(sylvester(5, kind="householder"), scale=0.3, seed=None)
    with torch.no_grad():
        flow.r_diagonal.fill_(5.0)
        flow.r_tilde_diagonal.fill_(-5.0)
    x = torch.randn(100, 5)
    y = flow._call(x)
    x_back = flow._inverse(y)
    # Backward error at rounding level; the forward error is what the
    # conditioning of the map allows (cond(J) reaches ~1e8 here).
    assert (flow._call(x_back) - y).abs().max() <= 1e-14
    errors = (x_back - x).abs().max(-1).values
    worst = errors.argmax()
    condition = torch.linalg.cond(torch.autograd.functional.jacobian(flow._call, x[worst]))
    assert errors[worst] <= 10 * torch.finfo(torch.float64).eps * condition


def test_the_orthogonal_complement_is_left_alone():
    flow = moved(sylvester(6, count_ortho_vectors=2), scale=0.5, seed=None)
    q = flow.orthonormal_matrix()
    y = torch.randn(20, 6)
    x = flow._inverse(y)
    projector = torch.eye(6) - q @ q.T
    assert torch.allclose(x @ projector, y @ projector, atol=1e-14)


def test_inverse_cost_is_a_few_newton_iterations_per_coordinate(monkeypatch):
    evaluations = []

    def counting_root(function, lower, upper, **kwargs):
        count = [0]

        def counted(t):
            count[0] += 1
            return function(t)

        root = monotone_root(counted, lower, upper, **kwargs)
        evaluations.append(count[0])
        return root

    monkeypatch.setattr(MODULE, "monotone_root", counting_root)
    flow = moved(sylvester(8, kind="householder"), scale=0.5, seed=None)
    flow._inverse(torch.randn(500, 8))
    assert len(evaluations) == 8  # one vectorised scalar solve per coordinate
    assert max(evaluations) <= 8


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_through_the_inverse_match_finite_differences(kind):
    dim = 4
    flow = moved(sylvester(dim, kind=kind, count_transforms=3 if kind == "householder" else None), scale=0.5, seed=None)
    names = ["r_entries", "r_diagonal", "r_tilde_entries", "r_tilde_diagonal", "bias"]
    if kind != "triangular":
        names.insert(0, "q")
    values = [getattr(flow, name).detach().clone().requires_grad_() for name in names]
    y = torch.randn(3, dim, requires_grad=True)

    def inverse(y, *params):
        return ConditionedSylvester(dim, kind, **dict(zip(names, params)))._inverse(y)

    assert torch.autograd.gradcheck(inverse, (y, *values), atol=1e-7, rtol=1e-6)


def test_jacobian_of_the_inverse_is_the_inverse_jacobian():
    flow = moved(sylvester(5, count_ortho_vectors=5), scale=0.5, seed=None)
    y = torch.randn(5)
    x = flow._inverse(y)
    inverse_jacobian = torch.autograd.functional.jacobian(flow._inverse, y)
    forward_jacobian = torch.autograd.functional.jacobian(flow._call, x)
    assert torch.allclose(inverse_jacobian @ forward_jacobian, torch.eye(5), atol=1e-12)


def test_gradients_through_the_inverse_reach_a_conditional_flow():
    flow = conditional_sylvester(4, 3, kind="householder", hidden_dims=(8,))
    context = torch.randn(5, 3)
    y = torch.randn(2, 5, 4)
    flow.condition(context)._inverse(y).square().sum().backward()
    for name, parameter in flow.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("options", KIND_OPTIONS)
def test_a_context_batch_broadcasts_like_separate_flows(options):
    flow = conditional_sylvester(6, 3, hidden_dims=(16,), **options)
    context = torch.randn(5, 3)
    x = torch.randn(2, 5, 6)
    batched = flow.condition(context)
    y = batched(x)
    log_det = batched.log_abs_det_jacobian(x, y)
    x_back = batched._inverse(y)
    for j in range(5):
        single = flow.condition(context[j])
        assert torch.allclose(y[:, j], single(x[:, j]), atol=1e-14)
        assert torch.allclose(log_det[:, j], single.log_abs_det_jacobian(x[:, j], y[:, j]), atol=1e-14)
    assert torch.allclose(x_back, x, atol=1e-12)


def test_stacks_from_the_registry_invert():
    from pyro_nflows import build_flow

    layers = build_flow("sylvester:2+sylvester:2(kind=householder)+sylvester:3(kind=triangular)", 5)
    assert [layer.reverse for layer in layers[4:]] == [False, True, False]
    x = torch.randn(10, 5)
    y = x
    for layer in layers:
        y = moved(layer.double(), scale=0.5, seed=None)._call(y)
    for layer in reversed(layers):
        y = layer._inverse(y)
    assert (y - x).abs().max() <= 1e-12


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: sylvester(4, kind="planar"),
            r"unknown Sylvester kind 'planar'; known kinds: 'orthogonal', 'householder', 'triangular'",
        ),
        (
            lambda: sylvester(4, count_ortho_vectors=0),
            r"count_ortho_vectors must be an integer in 1..input_dim = 1..4, got 0",
        ),
        (lambda: sylvester(4, count_ortho_vectors=5), r"count_ortho_vectors .* got 5"),
        (lambda: sylvester(4, count_ortho_vectors=2.0), r"count_ortho_vectors .* got 2.0"),
        (lambda: sylvester(4, kind="householder", reverse=True), r"reverse=True applies only to kind='triangular'"),
        (lambda: sylvester(4, reverse=True), r"reverse=True applies only to kind='triangular'.*'orthogonal'"),
        (lambda: sylvester(4, kind="triangular", reverse="yes"), r"reverse must be True or False"),
        (lambda: sylvester(4, kind="householder", count_transforms=0), r"count_transforms"),
        (
            lambda: sylvester(4, kind="triangular", count_ortho_vectors=2),
            r"count_ortho_vectors applies only to kind='orthogonal'",
        ),
        (
            lambda: sylvester(4, count_transforms=2, kind="orthogonal"),
            r"count_transforms applies only to kind='householder'",
        ),
        (lambda: sylvester(0), r"input_dim"),
        (lambda: conditional_sylvester(4, 2, kind="Householder"), r"unknown Sylvester kind 'Householder'"),
        (lambda: conditional_sylvester(4, 2, count_ortho_vectors=7), r"count_ortho_vectors"),
        (lambda: conditional_sylvester(4, 0), r"context_dim"),
        (lambda: ConditionedSylvester(4, "orthogonal", reverse=True), r"reverse=True"),
    ],
)
def test_bad_hyper_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_to_the_inverse_raises(bad):
    flow = sylvester(4)
    y = torch.randn(3, 4)
    y[1, 2] = bad
    with pytest.raises(ValueError, match="Sylvester inverse got a non-finite input"):
        flow.inv(y)


def test_non_convergence_raises(monkeypatch):
    monkeypatch.setattr(MODULE, "monotone_root", functools.partial(monotone_root, max_iterations=1))
    flow = moved(sylvester(4, kind="triangular"), scale=0.5, seed=None)
    with pytest.raises(InverseNotConverged, match=r"the inverse of Sylvester \(coordinate 4 of 4\) did not converge"):
        flow._inverse(torch.randn(10, 4))


def test_docstring_examples_run():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for cls in (Sylvester, ConditionalSylvester):
        for test in finder.find(cls, globs={"torch": torch, cls.__name__: cls}):
            runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_a_sample_and_its_log_q_take_one_orthogonalisation(monkeypatch):
    """Sampling then scoring the sample (a guide's or a VAE posterior's step)
    forms Q once: the log-determinant comes from the forward pass."""
    import pyro.distributions as dist

    calls = []

    def counting(matrix, *args, **kwargs):
        calls.append(matrix.shape)
        return orthogonalise(matrix, *args, **kwargs)

    monkeypatch.setattr(MODULE, "orthogonalise", counting)
    flow = moved(sylvester(4))
    base = dist.Normal(torch.zeros(4), torch.ones(4)).to_event(1)
    posterior = dist.TransformedDistribution(base, [flow])
    x = posterior.rsample((6,))
    log_q = posterior.log_prob(x)
    assert len(calls) == 1
    assert torch.allclose(log_q, base.log_prob(flow.inv(x)) - flow.log_abs_det_jacobian(flow.inv(x), x))


def test_a_number_of_reflections_alone_selects_the_householder_kind_as_in_pyro():
    """Pyro's sylvester(D, K) is a Householder Sylvester flow with K reflections; so is ours."""
    flow = sylvester(5, 3)
    assert flow.kind == "householder" and flow.q.shape == (3, 5)
    assert sylvester(5).kind == "orthogonal"
    assert conditional_sylvester(5, 2, None, 3).kind == "householder"
