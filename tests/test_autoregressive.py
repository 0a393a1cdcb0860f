"""MADE and the autoregressive flows beyond the shared checks: the masks
are autoregressive, the one-pass inversion agrees with the naive loop, the
cheap directions really are single passes, float64 works."""

import copy
import pickle

import pytest
import torch
from checks import moved

from pyro_nflows.nn import MADE
from pyro_nflows.nn import made as made_module
from pyro_nflows.transforms import (
    conditional_iaf,
    conditional_maf,
    conditional_spline_autoregressive,
    iaf,
    maf,
    spline_autoregressive,
)
from pyro_nflows.transforms.maps import AffineMap, GatedAffineMap, SplineMap, data_affine_map, soft_clamp
from pyro_nflows.transforms.splines import rational_quadratic_spline


@pytest.mark.parametrize("ordering", ["natural", "reversed", torch.tensor([3, 0, 5, 1, 4, 2])])
@pytest.mark.parametrize("context_dim", [None, 3])
def test_made_outputs_depend_only_on_earlier_coordinates(ordering, context_dim):
    torch.manual_seed(0)
    made = moved(MADE(6, [20, 17], 2, context_dim=context_dim, ordering=ordering).double())
    position = torch.argsort(made.order)  # position[i]: when coordinate i is generated
    allowed = position[None, :] < position[:, None]
    reach = torch.zeros(6, 6, dtype=torch.float64)
    for _ in range(10):  # several points, so that no dependence hides behind inactive ReLUs
        x = torch.randn(6, dtype=torch.float64)
        context = None if context_dim is None else torch.randn(3, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(lambda v: made(v, context).sum(-1), x)
        assert (jacobian[~allowed] == 0).all()
        reach += jacobian.abs()
    assert (reach[allowed] > 0).all()  # and on every earlier one


def test_made_context_reaches_the_first_coordinate():
    made = moved(MADE(4, [16, 16], 2, context_dim=3).double())
    x = torch.randn(4, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda c: made(x, c)[0], torch.randn(3, dtype=torch.float64))
    assert jacobian.abs().sum() > 0


@pytest.mark.parametrize(
    "elementwise",
    [
        AffineMap(),
        data_affine_map(),
        AffineMap(shift_on="x", clamp="softsign"),
        AffineMap(shift_on="z", clamp="tanh"),
        GatedAffineMap(),
        SplineMap(5),
        SplineMap(5, spline_from="x"),
    ],
    ids=["affine-iaf", "affine-maf", "affine-x-softsign", "affine-z-tanh", "gated", "spline-iaf", "spline-maf"],
)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("context_dim", [None, 2])
def test_one_pass_inversion_matches_the_naive_loop(elementwise, direction, context_dim):
    torch.manual_seed(0)
    made = moved(MADE(7, [30, 25], elementwise.param_dim, context_dim=context_dim, ordering="reversed"), 0.1)
    w = torch.randn(11, 7)
    context = None if context_dim is None else torch.randn(11, 2)
    map_ = getattr(elementwise, direction)

    def step(w_i, theta_i):
        return map_(w_i, theta_i)[0]

    reference = made.invert_reference(w, step, context)
    with torch.no_grad():
        fast = made.invert(w, step, context)
        # the maps' in-place steps (affine and gated) give the same result
        step_into = getattr(elementwise, f"{direction}_into", None)
        fast_in_place = made.invert(w, step, context, step_into)
    assert (fast - reference).abs().max() <= 1e-5
    assert (fast_in_place - reference).abs().max() <= 1e-5
    with_graph = made.invert(w, step, context)  # the differentiable path agrees too
    assert with_graph.requires_grad and (with_graph - reference).abs().max() <= 1e-5


def test_gradients_through_the_sequential_direction_match_the_naive_loop():
    torch.manual_seed(0)
    flow = moved(iaf(5).double(), 0.1)
    y = torch.randn(8, 5, dtype=torch.float64)

    def gradients(invert):
        flow.zero_grad()
        invert(y, lambda y_i, theta_i: flow.elementwise.inverse(y_i, theta_i)[0]).square().sum().backward()
        return [p.grad.clone() for p in flow.parameters()]

    for fast, naive in zip(gradients(flow.made.invert), gradients(flow.made.invert_reference)):
        assert torch.allclose(fast, naive, atol=1e-10)


def test_a_flow_that_has_sampled_can_be_copied_after_an_update():
    # The one-pass sampler keeps views of the parameters; copies must not carry them.
    torch.manual_seed(0)
    flow = maf(5).double()
    z = torch.randn(7, 5, dtype=torch.float64)
    with torch.no_grad():
        flow(z)
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    for copied in (copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        with torch.no_grad():
            assert torch.equal(copied(z), flow(z))


def test_maf_scores_and_iaf_samples_in_one_network_pass(monkeypatch):
    calls = []
    forward = MADE.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MADE, "forward", counting)
    x = torch.randn(10, 6)
    maf(6)._inverse(x)
    iaf(6)._call(x)
    assert len(calls) == 2


def test_float64_both_directions():
    # Pyro's AffineAutoregressive cannot invert in float64; ours can.
    for flow in (maf(4), iaf(4, stable=True), spline_autoregressive(4)):
        flow = moved(flow.double(), 0.1)
        x = torch.randn(3, 4, dtype=torch.float64)
        assert (flow._inverse(flow._call(x)) - x).abs().max() < 1e-12
        assert flow._call(x).dtype == torch.float64


def test_stable_iaf_starts_with_open_gates():
    flow = iaf(5, stable=True)
    gates = torch.sigmoid(flow.made(torch.zeros(5))[:, 1])
    assert torch.allclose(gates, torch.full((5,), torch.sigmoid(torch.tensor(1.5)).item()), atol=1e-3)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_maf_identity_init_sets_the_output_layers_start(conditional):
    """MADE's output layer starts at torch's initialisation times
    output_init_scale (biases zero); MAF's identity_init picks 1e-2 (near the
    identity, the default) or 1/sqrt(D) (a mild random start)."""

    def built(make):
        torch.manual_seed(0)
        return make()

    context = dict(context_dim=2) if conditional else {}
    reference = built(lambda: MADE(4, [16, 16], 2, output_init_scale=1.0, **context))
    for identity_init, scale in [(True, 1e-2), (False, 0.5)]:
        if conditional:
            flow = built(lambda: conditional_maf(4, 2, hidden_dims=[16, 16], identity_init=identity_init))
        else:
            flow = built(lambda: maf(4, hidden_dims=[16, 16], identity_init=identity_init))
        assert torch.equal(flow.made.weights[-1], reference.weights[-1] * scale)
        assert torch.equal(flow.made.biases[-1], torch.zeros(8))
        for weight, expected in zip(flow.made.weights[:-1], reference.weights[:-1]):
            assert torch.equal(weight, expected)
    assert torch.equal(built(lambda: maf(4, hidden_dims=[16, 16])).made.weights[-1], reference.weights[-1] * 1e-2)


def test_conditional_flows_use_the_context_in_every_direction():
    for make in (conditional_maf, conditional_iaf):
        flow = moved(make(3, 2), 0.3)
        x = torch.randn(3)
        a, b = flow.condition(torch.zeros(2)), flow.condition(torch.ones(2))
        assert not torch.allclose(a._call(x), b._call(x))
        assert not torch.allclose(a._inverse(x), b._inverse(x))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: maf(0), "input_dim"),
        (lambda: maf(3, hidden_dims=(8, 0)), "hidden_dims"),
        (lambda: maf(3, hidden_dims=()), "at least one hidden layer"),
        (lambda: maf(3, ordering="sideways"), "ordering"),
        (lambda: maf(3, ordering=torch.tensor([0, 0, 1])), "ordering"),
        (lambda: spline_autoregressive(3, count_bins=1), "count_bins"),
        (lambda: spline_autoregressive(3, direction="up"), "direction"),
        (lambda: conditional_iaf(3, 0), "context_dim"),
        (lambda: maf(3, identity_init="no"), "identity_init must be True or False"),
        (lambda: conditional_maf(3, 2, identity_init=1), "identity_init must be True or False"),
        (lambda: MADE(3, [8], 2, output_init_scale=0.0), "output_init_scale must be a positive"),
    ],
)
def test_bad_hyper_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_affine_maps_of_iaf_and_maf_have_their_forms_and_bounds():
    """IAF's form x = z e^s + m with s = 3 tanh(s~ / 3), and MAF's (and
    RealNVP's) z = x e^{-s} + m with s = s~ / (1 + |s~| / 3); each is the other
    direction's exact inverse (checks.py)."""
    theta = 4 * torch.randn(5, 3, 2, dtype=torch.float64)
    shift, raw = theta[..., 0], theta[..., 1]
    z, x = torch.randn(2, 5, 3, dtype=torch.float64)
    iaf_x, iaf_log_det = iaf(3).elementwise.forward(z, theta)
    maf_z, maf_log_det = maf(3).elementwise.inverse(x, theta)
    iaf_log_scale, maf_log_scale = 3 * torch.tanh(raw / 3), raw / (1 + raw.abs() / 3)
    assert torch.allclose(iaf_x, z * iaf_log_scale.exp() + shift, rtol=0, atol=1e-12)
    assert torch.allclose(maf_z, x * torch.exp(-maf_log_scale) + shift, rtol=0, atol=1e-12)
    assert torch.allclose(iaf_log_det, iaf_log_scale, rtol=0, atol=1e-12)
    assert torch.allclose(maf_log_det, maf_log_scale, rtol=0, atol=1e-12)
    assert (iaf_log_scale.abs() < 3.0).all() and (maf_log_scale.abs() < 3.0).all()
    with pytest.raises(ValueError, match="shift_on must be 'x'"):
        AffineMap(shift_on="data")
    with pytest.raises(ValueError, match="clamp must be one of"):
        AffineMap(clamp="sigmoid")
    with pytest.raises(ValueError, match="shape must be one of"):
        soft_clamp(raw, 3.0, "hard")


@pytest.mark.parametrize("direction", ["maf", "iaf"])
@pytest.mark.parametrize("conditional", [False, True])
def test_spline_flows_evaluate_the_spline_in_their_trained_direction(direction, conditional):
    """NSF (``direction="maf"``) scores data as z = r(x), r the rational-quadratic
    spline; the IAF-direction flow samples as x = r(z)."""
    torch.manual_seed(0)
    if conditional:
        flow = conditional_spline_autoregressive(3, 2, count_bins=4, direction=direction).condition(torch.randn(2))
    else:
        flow = spline_autoregressive(3, count_bins=4, direction=direction)
    theta = torch.randn(6, 3, flow.elementwise.param_dim, dtype=torch.float64)
    value = 2 * torch.randn(6, 3, dtype=torch.float64)
    k = 4
    spline = rational_quadratic_spline(value, theta[..., :k], theta[..., k : 2 * k], theta[..., 2 * k :], bound=3.0)
    if direction == "maf":
        evaluated, log_det = flow.elementwise.inverse(value, theta)  # data -> noise
        assert torch.allclose(log_det, -spline[1], rtol=0, atol=1e-12)
    else:
        evaluated, log_det = flow.elementwise.forward(value, theta)  # noise -> data
        assert torch.allclose(log_det, spline[1], rtol=0, atol=1e-12)
    assert torch.allclose(evaluated, spline[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="spline_from must be 'z'"):
        SplineMap(4, spline_from="data")


def test_the_sequential_path_runs_small_batches_on_one_thread_and_restores_the_count():
    torch.manual_seed(0)
    made = MADE(4, [16, 16], 2)
    seen = []

    def step(w_i, theta_i):
        seen.append(torch.get_num_threads())
        return w_i

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            made.invert(torch.randn(8, 4), step)  # small: one thread
            assert seen == [1] * 4 and torch.get_num_threads() == 2
            seen.clear()
            made.invert(torch.randn(made_module.SINGLE_THREAD_MAX_POINTS + 1, 4), step)  # large: left alone
            assert seen == [2] * 4 and torch.get_num_threads() == 2

            def failing(w_i, theta_i):
                raise RuntimeError("a step failed")

            with pytest.raises(RuntimeError, match="a step failed"):
                made.invert(torch.randn(8, 4), failing)
            assert torch.get_num_threads() == 2  # restored after an error too
    finally:
        torch.set_num_threads(previous)


def test_the_sequential_direction_raises_where_its_result_overflows():
    """Far in the tails, each coordinate rescales the next and the true result
    leaves the dtype's range: FloatingPointError, never a silent inf or NaN."""
    torch.manual_seed(0)
    flow = moved(iaf(3, stable=True), 0.3, seed=0).with_cache(0)
    with torch.no_grad():
        x = flow.inv(torch.randn(200, 3))  # ordinary points: finite
        assert torch.isfinite(x).all()
        with pytest.raises(FloatingPointError, match="overflows torch.float32 at"):
            flow.inv(100 * torch.randn(200, 3))
        with pytest.raises(ValueError, match="non-finite input"):
            flow.inv(torch.tensor([[0.0, float("nan"), 1.0]]))


def test_stable_must_be_a_bool():
    for make in (lambda: iaf(3, stable="no"), lambda: conditional_iaf(3, 2, stable=1)):
        with pytest.raises(ValueError, match="stable must be True or False"):
            make()
