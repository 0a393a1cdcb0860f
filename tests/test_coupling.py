"""Properties of the coupling family beyond the shared checks: the kept part
passes through exactly, the Jacobian's block structure, the identity at
initialisation, exact float64 inverses, the split options, argument errors,
context broadcasting, and agreement with independent references (autograd
log-determinants for D up to 8 at every kind of split, Pyro's AffineCoupling,
the element-wise spline)."""

import itertools

import pyro.distributions as dist
import pytest
import torch
from checks import move_parameters, moved
from pyro.distributions.transforms import AffineCoupling as PyroAffineCoupling

from pyro_nflows.nn.dense import ContextNet
from pyro_nflows.registry import build_flow
from pyro_nflows.transforms import (
    ConditionedAdditiveCoupling,
    ConditionedAffineCoupling,
    ConditionedSplineCoupling,
    ElementwiseSpline,
    additive_coupling,
    affine_coupling,
    conditional_additive_coupling,
    conditional_affine_coupling,
    conditional_spline_coupling,
    spline_coupling,
)
from pyro_nflows.transforms.splines import rational_quadratic_spline

pytestmark = pytest.mark.usefixtures("float64")

KINDS = {
    "affine": (affine_coupling, conditional_affine_coupling),
    "additive": (additive_coupling, conditional_additive_coupling),
    "spline": (spline_coupling, conditional_spline_coupling),
}
CONTEXT_DIM = 3


def _build(kind, input_dim, conditional=False, **options):
    plain, conditional_helper = KINDS[kind]
    if conditional:
        return moved(conditional_helper(input_dim, CONTEXT_DIM, hidden_dims=(16, 16), **options))
    return moved(plain(input_dim, hidden_dims=(16, 16), **options))


def _transform(module, context=None):
    return module.condition(context) if context is not None else module


def _kept_and_transformed(input_dim, split_dim, reverse):
    first, second = list(range(split_dim)), list(range(split_dim, input_dim))
    return (second, first) if reverse else (first, second)


def _inside(*shape):
    """Standard normal points clipped to the splines' interval, where they are not the identity."""
    return torch.randn(*shape).clamp(-2.5, 2.5)


def _splits(input_dim):
    return sorted({1, input_dim // 2, input_dim - 1})


# ---------------------------------------------------------------------------
# Structure: y_a = x_a, block-triangular Jacobian, exact log-determinant
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("split_dim", [1, 3, 5])
def test_the_kept_part_passes_through_exactly(kind, conditional, reverse, split_dim):
    module = _build(kind, 6, conditional, split_dim=split_dim, reverse=reverse)
    context = torch.randn(10, CONTEXT_DIM) if conditional else None
    transform = _transform(module, context)
    kept, transformed = _kept_and_transformed(6, split_dim, reverse)
    x = _inside(10, 6)
    y = transform._call(x)
    assert torch.equal(y[:, kept], x[:, kept])
    assert (y[:, transformed] != x[:, transformed]).all()
    x_back = transform._inverse(y)
    assert torch.equal(x_back[:, kept], y[:, kept])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("split_dim", [1, 2, 4])
def test_the_jacobian_is_block_triangular_with_a_diagonal_block(kind, reverse, split_dim):
    module = _build(kind, 5, split_dim=split_dim, reverse=reverse)
    kept, transformed = _kept_and_transformed(5, split_dim, reverse)
    x = _inside(5)
    jacobian = torch.autograd.functional.jacobian(module._call, x)
    assert torch.equal(jacobian[kept][:, kept], torch.eye(len(kept)))
    assert (jacobian[kept][:, transformed] == 0).all()
    block = jacobian[transformed][:, transformed]
    assert torch.equal(block, torch.diag_embed(block.diagonal()))
    assert (block.diagonal() > 0).all()  # every element-wise map is increasing
    assert (jacobian[transformed][:, kept] != 0).any()  # and does depend on the kept part


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("input_dim", [2, 3, 5, 8])
def test_log_det_matches_autograd_at_every_split(kind, input_dim):
    """log|det J| against slogdet of the autograd Jacobian, float64, moved parameters."""
    for split_dim, reverse in itertools.product(_splits(input_dim), [False, True]):
        module = _build(kind, input_dim, split_dim=split_dim, reverse=reverse)
        for x in torch.randn(3, input_dim) * 2:
            jacobian = torch.autograd.functional.jacobian(module._call, x)
            expected = torch.linalg.slogdet(jacobian).logabsdet
            actual = module.log_abs_det_jacobian(x, module._call(x))
            assert abs(actual - expected) < 1e-10, (split_dim, reverse, actual, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_conditional_log_det_matches_autograd(kind):
    module = _build(kind, 4, conditional=True, reverse=True)
    for x, context in zip(torch.randn(3, 4), torch.randn(3, CONTEXT_DIM)):
        transform = module.condition(context)
        jacobian = torch.autograd.functional.jacobian(transform._call, x)
        expected = torch.linalg.slogdet(jacobian).logabsdet
        assert abs(transform.log_abs_det_jacobian(x, transform._call(x)) - expected) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_log_det_is_computed_from_x_alone(kind):
    """No state between calls: the log-determinant depends on x only, not on y
    or on which point went through last."""
    module = _build(kind, 5)
    x, other = torch.randn(2, 4, 5)
    expected = module.log_abs_det_jacobian(x, module._call(x))
    module._call(other)
    assert torch.equal(module.log_abs_det_jacobian(x, torch.randn(4, 5)), expected)


# ---------------------------------------------------------------------------
# Identity at initialisation, volume preservation, exact inverses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_starts_at_the_identity(kind, conditional):
    plain, conditional_helper = KINDS[kind]
    module = (conditional_helper(5, CONTEXT_DIM) if conditional else plain(5)).double()
    transform = _transform(module, torch.randn(7, CONTEXT_DIM) if conditional else None)
    x = 3 * torch.randn(7, 5)  # some points beyond the spline's bound too
    y = transform._call(x)
    log_det = transform.log_abs_det_jacobian(x, y)
    if kind == "spline":
        assert torch.allclose(y, x, rtol=0, atol=1e-12)
        assert torch.allclose(log_det, torch.zeros(7), rtol=0, atol=1e-12)
    else:
        assert torch.equal(y, x)
        assert torch.equal(log_det, torch.zeros(7))


@pytest.mark.parametrize("kind", ["affine", "additive"])
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_identity_init_false_starts_from_torchs_initialisation_over_sqrt_t(kind, conditional):
    """``identity_init=False`` starts the last layer at torch's initialisation
    divided by sqrt(t), t = 3 transformed coordinates: not the identity from
    the start, and every output unit already differs. (Spline couplings have
    no such option: they always start at the identity.)"""
    plain, conditional_helper = KINDS[kind]
    options = dict(hidden_dims=(16, 16), identity_init=False)
    torch.manual_seed(0)
    module = (conditional_helper(5, CONTEXT_DIM, **options) if conditional else plain(5, **options)).double()
    torch.manual_seed(0)
    param_shapes = [(3,)] * (2 if kind == "affine" else 1)
    torch_init = ContextNet(2 + (CONTEXT_DIM if conditional else 0), (16, 16), param_shapes).net.layers[-1]
    last = module.net.net.layers[-1]
    assert torch.equal(last.weight, (torch_init.weight * 3**-0.5).double())
    assert torch.equal(last.bias, (torch_init.bias * 3**-0.5).double())
    assert (last.weight != 0).all() and (last.bias != 0).all()
    transform = _transform(module, torch.randn(7, CONTEXT_DIM) if conditional else None)
    x = _inside(7, 5)
    y = transform._call(x)
    kept, transformed = _kept_and_transformed(5, 2, False)
    assert torch.equal(y[:, kept], x[:, kept])
    assert (y[:, transformed] != x[:, transformed]).all()
    if kind == "affine":
        assert (transform.log_abs_det_jacobian(x, y) != 0).all()
    with pytest.raises(ValueError, match="identity_init must be True or False"):
        plain(5, identity_init="no")
    with pytest.raises(ValueError, match="identity_init must be True or False"):
        conditional_helper(5, CONTEXT_DIM, identity_init=0)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_additive_coupling_is_volume_preserving(conditional):
    module = _build("additive", 6, conditional)
    transform = _transform(module, torch.randn(CONTEXT_DIM) if conditional else None)
    assert transform.volume_preserving
    x = torch.randn(6)
    jacobian = torch.autograd.functional.jacobian(transform._call, x)
    assert abs(torch.linalg.slogdet(jacobian).logabsdet) < 1e-12
    assert torch.equal(transform.log_abs_det_jacobian(x, transform._call(x)), torch.zeros(()))
    for kind in ("affine", "spline"):
        assert not getattr(_build(kind, 6), "volume_preserving", False)


@pytest.mark.parametrize("kind", ["affine", "additive"])
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("reverse", [False, True])
def test_float64_round_trip_is_exact(kind, conditional, reverse):
    module = _build(kind, 7, conditional, reverse=reverse)
    context = torch.randn(200, CONTEXT_DIM) if conditional else None
    transform = _transform(module, context)
    x = 3 * torch.randn(200, 7)
    y = transform._call(x)
    assert (transform._inverse(y) - x).abs().max() <= 1e-12
    assert (transform._call(transform._inverse(x)) - x).abs().max() <= 1e-12


def test_spline_round_trip_float64():
    module = _build("spline", 7, count_bins=12)
    x = 2 * torch.randn(200, 7)
    assert (module._inverse(module._call(x)) - x).abs().max() <= 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_each_direction_costs_one_network_pass(kind):
    module = _build(kind, 6)
    calls = []
    module.net.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(4, 6)
    y = module._call(x)
    assert len(calls) == 1
    module._inverse(y)
    assert len(calls) == 2
    module.log_abs_det_jacobian(x, y)
    assert len(calls) == (2 if kind == "additive" else 3)  # NICE's log-det needs no network


# ---------------------------------------------------------------------------
# Options and errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("input_dim", [2, 3, 4, 5, 7])
def test_default_split_is_half_and_reverse_swaps_the_roles(input_dim):
    for reverse in (False, True):
        module = affine_coupling(input_dim, reverse=reverse)
        assert module.split_dim == input_dim // 2
        first, second = input_dim // 2, input_dim - input_dim // 2
        assert (module.kept_dim, module.transformed_dim) == ((second, first) if reverse else (first, second))
        assert module.net.net.layers[0].in_features == module.kept_dim
    conditional = conditional_spline_coupling(input_dim, CONTEXT_DIM, split_dim=1, reverse=True)
    assert conditional.net.net.layers[0].in_features == input_dim - 1 + CONTEXT_DIM


def test_default_network_size():
    assert affine_coupling(5).net.net.hidden_dims == [64, 64]
    assert affine_coupling(20).net.net.hidden_dims == [200, 200]
    assert affine_coupling(1000).net.net.hidden_dims == [512, 512]
    assert conditional_affine_coupling(4, 30).net.net.hidden_dims == [300, 300]
    assert affine_coupling(5, hidden_dims=(8, 9, 10)).net.net.hidden_dims == [8, 9, 10]


def test_spline_output_scale_follows_the_last_hidden_layer():
    assert spline_coupling(5, hidden_dims=(32, 16)).output_scale == 0.25
    module = conditional_spline_coupling(5, CONTEXT_DIM, hidden_dims=(8, 64))
    assert module.condition(torch.randn(CONTEXT_DIM)).output_scale == 0.125


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: affine_coupling(1), "input_dim >= 2"),
        (lambda: spline_coupling(1), "input_dim >= 2"),
        (lambda: conditional_additive_coupling(1, 2), "input_dim >= 2"),
        (lambda: affine_coupling(0), "input_dim"),
        (lambda: affine_coupling(5, split_dim=0), "split_dim"),
        (lambda: affine_coupling(5, split_dim=5), "split_dim"),
        (lambda: affine_coupling(5, split_dim=-1), "split_dim"),
        (lambda: additive_coupling(5, split_dim=2.0), "split_dim"),
        (lambda: additive_coupling(5, split_dim=True), "split_dim"),
        (lambda: conditional_affine_coupling(5, 2, split_dim=7), "split_dim"),
        (lambda: affine_coupling(5, reverse="yes"), "reverse"),
        (lambda: affine_coupling(5, log_scale_bound=0.0), "log_scale_bound"),
        (lambda: affine_coupling(5, log_scale_bound=float("inf")), "log_scale_bound"),
        (lambda: spline_coupling(5, count_bins=1), "count_bins"),
        (lambda: spline_coupling(5, bound=-1.0), "bound"),
        (lambda: conditional_spline_coupling(5, 2, bound=0), "bound"),
        (lambda: affine_coupling(5, hidden_dims=()), "hidden_dims"),
        (lambda: affine_coupling(5, hidden_dims=(16, 0)), "hidden_dims"),
        (lambda: conditional_affine_coupling(5, 0), "context_dim"),
    ],
)
def test_bad_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_wrong_widths_name_expected_and_given():
    module = conditional_affine_coupling(5, CONTEXT_DIM)
    with pytest.raises(ValueError, match=r"last dimension is 3, got a tensor of shape \(2, 4\)"):
        module.condition(torch.randn(2, 4))
    transform = module.condition(torch.randn(2, CONTEXT_DIM))
    with pytest.raises(ValueError, match=r"last dimension is 5, got a tensor of shape \(2, 6\)"):
        transform(torch.randn(2, 6))
    with pytest.raises(ValueError, match="last dimension is 5"):
        spline_coupling(5).inv(torch.randn(4))


# ---------------------------------------------------------------------------
# Contexts broadcast against the points
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_context_batches_broadcast(kind):
    module = _build(kind, 4, conditional=True)
    x = torch.randn(3, 5, 4)
    for context in (torch.randn(5, CONTEXT_DIM), torch.randn(1, CONTEXT_DIM)):
        transform = module.condition(context)
        y = transform._call(x)
        log_det = transform.log_abs_det_jacobian(x, y)
        assert y.shape == x.shape and log_det.shape == (3, 5)
        expanded = module.condition(context.expand(3, 5, CONTEXT_DIM))
        assert torch.allclose(y, expanded._call(x), rtol=0, atol=1e-13)
        assert torch.allclose(log_det, expanded.log_abs_det_jacobian(x, y), rtol=0, atol=1e-13)
        assert torch.allclose(transform._inverse(y), x, rtol=0, atol=1e-10)
        for i, j in itertools.product(range(3), range(5)):
            one = module.condition(context[j % len(context)])
            assert torch.allclose(one._call(x[i, j]), y[i, j], rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
def test_a_context_batch_larger_than_the_points_broadcasts_too(kind):
    module = _build(kind, 4, conditional=True)
    transform = module.condition(torch.randn(6, CONTEXT_DIM))
    x = torch.randn(4)
    y = transform._call(x)
    assert y.shape == (6, 4)
    assert transform.log_abs_det_jacobian(x, y).shape == (6,)
    assert torch.allclose(transform._inverse(y), x.expand(6, 4), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------


def test_affine_coupling_matches_pyro():
    """Pyro's AffineCoupling, y = x e^s + t, given the same map: ours receives
    the raw log-scale that our soft clamp maps onto Pyro's (unclamped) one,
    and the shift -t e^{-s} of its form y = (x - shift) e^s."""
    bound = 3.0
    weight = torch.randn(2, 4)

    def pyro_net(x_a):
        shift = x_a @ weight
        log_scale = 2.5 * torch.tanh(x_a @ weight.flip(0))
        return shift, log_scale

    def our_net(x_a):
        shift, log_scale = pyro_net(x_a)
        return log_scale / (1 - log_scale.abs() / bound), -shift * torch.exp(-log_scale)

    ours = ConditionedAffineCoupling(6, our_net, split_dim=2, log_scale_bound=bound)
    pyro = PyroAffineCoupling(2, pyro_net)
    x = torch.randn(10, 6)
    y = pyro(x)
    assert torch.allclose(ours._call(x), y, rtol=0, atol=1e-12)
    assert torch.allclose(ours._inverse(y), pyro._inverse(y), rtol=0, atol=1e-12)
    assert torch.allclose(ours.log_abs_det_jacobian(x, y), pyro.log_abs_det_jacobian(x, y), rtol=0, atol=1e-12)


def test_affine_log_scale_is_softly_bounded():
    transform = ConditionedAffineCoupling(
        4, lambda x_a: (1e3 * x_a.flip(-1), torch.zeros_like(x_a)), split_dim=2, log_scale_bound=2.0
    )
    x = torch.randn(50, 4)
    y = transform._call(x)
    per_coordinate = torch.log(y[:, 2:] / x[:, 2:])
    assert (per_coordinate.abs() < 2.0 + 1e-12).all() and (per_coordinate.abs() > 1.9).any()
    assert torch.allclose(transform._inverse(y), x, rtol=0, atol=1e-12)


def test_additive_coupling_is_a_shift_by_the_network_output():
    weight = torch.randn(3, 2)
    transform = ConditionedAdditiveCoupling(5, lambda x_a: torch.sin(x_a @ weight), split_dim=3)
    x = torch.randn(8, 5)
    expected = torch.cat((x[:, :3], x[:, 3:] + torch.sin(x[:, :3] @ weight)), -1)
    assert torch.equal(transform._call(x), expected)


@pytest.mark.parametrize("reverse", [False, True])
def test_spline_coupling_with_constant_parameters_is_the_elementwise_spline(reverse):
    """A network that ignores x_a turns the coupling into ElementwiseSpline on x_b."""
    spline = ElementwiseSpline(3, count_bins=5, bound=2.0).double()
    move_parameters(spline, 1.0, torch.Generator().manual_seed(1))
    params = (spline.widths, spline.heights, spline.derivatives)

    def net(x_a):
        return tuple(p.expand(x_a.shape[:-1] + p.shape) for p in params)

    split_dim = 3 if reverse else 2
    coupling = ConditionedSplineCoupling(5, net, split_dim, reverse, count_bins=5, bound=2.0)
    x = 1.5 * torch.randn(20, 5)
    part = slice(0, 3) if reverse else slice(2, 5)
    y = coupling._call(x)

    def close(a, b):  # equal up to rounding (memory layouts differ)
        return torch.allclose(a, b, rtol=0, atol=1e-12)

    assert close(y[:, part], spline._call(x[:, part]))
    assert close(coupling.log_abs_det_jacobian(x, y), spline.log_abs_det_jacobian(x[:, part], None).sum(-1))
    assert close(coupling._inverse(y)[:, part], spline._inverse(y[:, part]))


@pytest.mark.parametrize("spline_from", ["z", "x"])
@pytest.mark.parametrize("conditional", [False, True])
def test_spline_coupling_evaluates_the_spline_on_the_side_it_is_told(spline_from, conditional):
    """``spline_from="z"``: the forward map (noise to data) is the spline;
    ``"x"``: the inverse (data to noise) is, and the forward solves its quadratic."""
    torch.manual_seed(0)
    if conditional:
        module = conditional_spline_coupling(5, CONTEXT_DIM, count_bins=4, spline_from=spline_from)
    else:
        module = spline_coupling(5, count_bins=4, spline_from=spline_from)
    move_parameters(module, 1.0, torch.Generator().manual_seed(2))  # away from the identity start
    module.double()
    coupling = module.condition(torch.randn(CONTEXT_DIM, dtype=torch.float64)) if conditional else module
    value = 2 * torch.randn(7, 5, dtype=torch.float64)
    kept, transformed = coupling.split(value)
    widths, heights, derivatives = (coupling.output_scale * p for p in coupling.params(kept))
    spline, spline_log_det = rational_quadratic_spline(transformed, widths, heights, derivatives, bound=3.0)
    if spline_from == "z":
        evaluated, log_det = coupling._call_and_log_det(value)  # log|det| of the forward, at value
        assert torch.allclose(log_det, spline_log_det.sum(-1), rtol=0, atol=1e-12)
    else:
        evaluated, log_det = coupling._inverse_and_log_det(value)  # log|det| of the forward, at evaluated
        assert torch.allclose(log_det, -spline_log_det.sum(-1), rtol=0, atol=1e-12)
    assert torch.equal(coupling.split(evaluated)[0], kept)
    assert torch.allclose(coupling.split(evaluated)[1], spline, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="spline_from must be 'z'"):
        spline_coupling(5, spline_from="data")


# ---------------------------------------------------------------------------
# Stacks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["affine_coupling", "additive_coupling", "spline_coupling"])
def test_registry_stacks_alternate_the_kept_part(name):
    assert [t.reverse for t in build_flow(f"{name}:4", 5)] == [False, True, False, True]
    assert [t.reverse for t in build_flow(f"{name}:3(reverse=True, split_dim=1)", 5)] == [True, False, True]
    conditional = build_flow(f"{name}:2", 5, context_dim=CONTEXT_DIM)
    assert [t.reverse for t in conditional] == [False, True]
    assert [t.condition(torch.randn(CONTEXT_DIM)).reverse for t in conditional] == [False, True]


@pytest.mark.parametrize("name", ["affine_coupling", "additive_coupling", "spline_coupling"])
def test_three_alternating_layers_give_a_dense_jacobian(name):
    """Two layers leave each output of the first layer's transformed part
    depending on one coordinate of that part only; a third mixes everything."""
    layers = [moved(t, seed=i) for i, t in enumerate(build_flow(f"{name}:3", 5))]

    def flow(x):
        for layer in layers:
            x = layer._call(x)
        return x

    jacobian = torch.autograd.functional.jacobian(flow, _inside(5))
    assert (jacobian != 0).all()


def test_two_affine_couplings_learn_a_correlated_gaussian():
    """Two alternating layers can represent any 2-D Gaussian; they reach its entropy."""
    torch.manual_seed(0)
    covariance = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    target = dist.MultivariateNormal(torch.tensor([1.0, -1.0]), covariance)
    data = target.sample((256,))
    layers = [layer.double() for layer in build_flow("affine_coupling:2", 2)]
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    flow = dist.TransformedDistribution(base, layers)
    optimizer = torch.optim.Adam([p for layer in layers for p in layer.parameters()], lr=2e-2)
    with torch.no_grad():
        start = -flow.log_prob(data).mean()
    for _ in range(150):
        optimizer.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nll = -flow.log_prob(data).mean()
        best = -target.log_prob(data).mean()
    assert nll - best < 0.05 < start - best, (start.item(), nll.item(), best.item())
