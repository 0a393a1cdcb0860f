"""Tests of the rational-quadratic spline function (pyro_nflows/transforms/splines.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_nflows.transforms.splines import _knots, rational_quadratic_spline

BOUND = 3.0
K = 8
D = 4


def random_params(
    batch_shape: tuple[int, ...] = (D,),
    num_bins: int = K,
    scale: float = 2.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised widths, heights and interior derivatives, well off zero."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return scale * torch.randn(*batch_shape, *shape, generator=generator, dtype=dtype)

    return draw(num_bins), draw(num_bins), draw(num_bins - 1)


def spline_points(
    widths: torch.Tensor, heights: torch.Tensor, *, inverse: bool = False
) -> torch.Tensor:
    """Points of shape (N, D) spanning inside and outside [-BOUND, BOUND].

    They include every knot of the spline's input variable (exactly, as the
    function computes them), +-BOUND, and points just inside and outside.
    """
    dtype = widths.dtype
    grid = torch.linspace(-1.5 * BOUND, 1.5 * BOUND, 2001, dtype=dtype)
    edges = torch.tensor([-BOUND, BOUND], dtype=dtype)
    just_inside = torch.nextafter(edges, torch.zeros_like(edges))
    just_outside = torch.nextafter(edges, 2 * edges)
    common = torch.cat([grid, edges, just_inside, just_outside]).unsqueeze(-1).expand(-1, D)
    knots = _knots(heights if inverse else widths, BOUND, 1e-3)  # (D, K + 1)
    return torch.cat([common, knots.transpose(0, 1)], dim=0)


def log_derivative_by_autograd(x: torch.Tensor, *params: torch.Tensor, inverse: bool = False):
    x = x.clone().requires_grad_(True)
    y, _ = rational_quadratic_spline(x, *params, bound=BOUND, inverse=inverse)
    (grad,) = torch.autograd.grad(y.sum(), x)
    return grad.log()


# ---------------------------------------------------------------------------
# identity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_parameters_give_the_identity(dtype: torch.dtype) -> None:
    widths = torch.zeros(D, K, dtype=dtype)
    derivatives = torch.zeros(D, K - 1, dtype=dtype)
    x = torch.linspace(-2 * BOUND, 2 * BOUND, 1001, dtype=dtype).unsqueeze(-1).expand(-1, D)
    # Equal bins, unit slope and unit derivatives: identity up to rounding (a few ulps of BOUND).
    ulps = 4 * torch.finfo(dtype).eps * BOUND
    for inverse in (False, True):
        y, log_det = rational_quadratic_spline(x, widths, widths, derivatives, inverse=inverse)
        assert y.dtype == dtype and log_det.dtype == dtype
        assert y.shape == x.shape and log_det.shape == x.shape
        torch.testing.assert_close(y, x, atol=ulps, rtol=0)
        torch.testing.assert_close(log_det, torch.zeros_like(x), atol=ulps, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_identity_outside_the_bound(inverse: bool) -> None:
    params = random_params()
    x = torch.cat([torch.linspace(-10, -BOUND, 50), torch.linspace(BOUND, 10, 50)])[:, None]
    x = x.to(torch.float64).expand(-1, D)
    outside = x.abs() > BOUND
    x = x.clone().requires_grad_(True)
    y, log_det = rational_quadratic_spline(x, *params, bound=BOUND, inverse=inverse)
    (grad,) = torch.autograd.grad(y.sum(), x)
    # Exactly the identity: no clipping, log-det 0, gradient 1.
    assert torch.equal(y[outside], x.detach()[outside])
    assert torch.equal(log_det[outside], torch.zeros_like(log_det[outside]))
    assert torch.equal(grad[outside], torch.ones_like(grad[outside]))
    # At +-BOUND itself the spline meets the identity with slope 1.
    on_edge = ~outside
    torch.testing.assert_close(y[on_edge], x.detach()[on_edge], atol=1e-14, rtol=0)
    torch.testing.assert_close(log_det[on_edge], torch.zeros_like(log_det[on_edge]), atol=1e-14, rtol=0)


# ---------------------------------------------------------------------------
# round trips
#
# Where the spline is flat (dy/dx as small as 1e-5 for parameters drawn with
# scale 2), an input is recovered only to (rounding of y) * dx/dy: that is the
# conditioning of the map, not an error of the inverse. So the round-trip
# error is measured in units of max(1, dx/dy) (forward then inverse) or
# max(1, dy/dx) (inverse then forward); where the spline is not flat these are
# plain absolute tolerances.


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_round_trip(dtype: torch.dtype, tol: float, seed: int) -> None:
    params = random_params(dtype=dtype, seed=seed)

    x = spline_points(*params[:2])
    y, log_det = rational_quadratic_spline(x, *params, bound=BOUND)
    x_back, _ = rational_quadratic_spline(y, *params, bound=BOUND, inverse=True)
    condition = torch.exp(-log_det).clamp(min=1.0)  # max(1, dx/dy)
    assert ((x_back - x).abs() <= tol * condition).all()

    y = spline_points(*params[:2], inverse=True)
    x, log_det = rational_quadratic_spline(y, *params, bound=BOUND, inverse=True)
    y_back, _ = rational_quadratic_spline(x, *params, bound=BOUND)
    condition = torch.exp(-log_det).clamp(min=1.0)  # max(1, dy/dx) at x
    assert ((y_back - y).abs() <= tol * condition).all()


def test_round_trip_float64_well_conditioned_absolute() -> None:
    # Parameters of moderate size keep dy/dx away from 0: plain absolute error.
    params = random_params(scale=1.0)
    x = spline_points(*params[:2])
    y, _ = rational_quadratic_spline(x, *params, bound=BOUND)
    x_back, _ = rational_quadratic_spline(y, *params, bound=BOUND, inverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)


def test_inverse_solves_the_quadratic_stably() -> None:
    # Large derivatives next to shallow bins make the quadratic's b negative,
    # where 2c / (-b - sqrt(b^2 - 4ac)) alone cancels: in float32 that loses
    # ~1000 ulps; the stable choice of root stays within a few ulps of BOUND
    # (times the conditioning dx/dy, as in the round trips above).
    eps = torch.finfo(torch.float32).eps
    for seed in range(5):
        params = random_params(scale=3.0, dtype=torch.float32, seed=seed)
        x = spline_points(*params[:2])
        y, log_det = rational_quadratic_spline(x, *params, bound=BOUND)
        x_back, _ = rational_quadratic_spline(y, *params, bound=BOUND, inverse=True)
        condition = torch.exp(-log_det).clamp(min=1.0)  # max(1, dx/dy)
        assert ((x_back - x).abs() <= 32 * eps * BOUND * condition).all()


# ---------------------------------------------------------------------------
# log-determinants


@pytest.mark.parametrize("seed", [0, 1])
def test_log_det_matches_autograd(seed: int) -> None:
    params = random_params(seed=seed)
    for inverse in (False, True):
        x = spline_points(*params[:2], inverse=inverse)
        _, log_det = rational_quadratic_spline(x, *params, bound=BOUND, inverse=inverse)
        expected = log_derivative_by_autograd(x, *params, inverse=inverse)
        torch.testing.assert_close(log_det, expected, atol=1e-8, rtol=0)


def test_inverse_log_det_is_minus_forward_log_det() -> None:
    params = random_params()
    x = spline_points(*params[:2])
    y, log_det = rational_quadratic_spline(x, *params, bound=BOUND)
    _, log_det_inverse = rational_quadratic_spline(y, *params, bound=BOUND, inverse=True)
    # Compared at the same point: dx/dy at y is 1 / (dy/dx) at x.
    condition = torch.exp(-log_det).clamp(min=1.0)
    assert ((log_det_inverse + log_det).abs() <= 1e-8 * condition).all()


# ---------------------------------------------------------------------------
# shape of the map


@pytest.mark.parametrize("inverse", [False, True])
def test_monotone_increasing(inverse: bool) -> None:
    params = random_params(scale=3.0)
    x = torch.linspace(-1.2 * BOUND, 1.2 * BOUND, 20001, dtype=torch.float64)
    x = x.unsqueeze(-1).expand(-1, D)
    y, _ = rational_quadratic_spline(x, *params, bound=BOUND, inverse=inverse)
    assert (y.diff(dim=0) > 0).all()


def test_knots_are_interpolated_and_the_map_is_continuous_there() -> None:
    widths, heights, derivatives = params = random_params()
    x_knots = _knots(widths, BOUND, 1e-3).transpose(0, 1)  # (K + 1, D)
    y_knots = _knots(heights, BOUND, 1e-3).transpose(0, 1)
    y, log_det = rational_quadratic_spline(x_knots, *params, bound=BOUND)
    torch.testing.assert_close(y, y_knots, atol=1e-14, rtol=0)

    # One ulp to either side of every knot: value and derivative both continuous.
    below = torch.nextafter(x_knots, torch.full_like(x_knots, -torch.inf))
    above = torch.nextafter(x_knots, torch.full_like(x_knots, torch.inf))
    y_below, log_det_below = rational_quadratic_spline(below, *params, bound=BOUND)
    y_above, log_det_above = rational_quadratic_spline(above, *params, bound=BOUND)
    torch.testing.assert_close(y_below, y, atol=1e-12, rtol=0)
    torch.testing.assert_close(y_above, y, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_det_below, log_det, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_det_above, log_det, atol=1e-10, rtol=0)
    # The derivative at an interior knot is the parameterised one, whichever side.
    shift = math.log(math.expm1(1 - 1e-3))
    expected = 1e-3 + torch.nn.functional.softplus(derivatives + shift)
    torch.testing.assert_close(log_det[1:-1], expected.log().transpose(0, 1), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------
# broadcasting


def elementwise_reference(x: torch.Tensor, params, inverse: bool):
    """The spline applied one scalar at a time, parameters indexed explicitly."""
    batch_shape = torch.broadcast_shapes(x.shape, *(p.shape[:-1] for p in params))
    x = x.expand(batch_shape)
    params = [p.expand(batch_shape + p.shape[-1:]) for p in params]
    flat_x = x.reshape(-1)
    flat_params = [p.reshape(-1, p.shape[-1]) for p in params]
    outputs = [
        rational_quadratic_spline(
            flat_x[i], *(p[i] for p in flat_params), bound=BOUND, inverse=inverse
        )
        for i in range(flat_x.numel())
    ]
    y = torch.stack([o[0] for o in outputs]).reshape(batch_shape)
    log_det = torch.stack([o[1] for o in outputs]).reshape(batch_shape)
    return y, log_det


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize(
    "x_shape, param_batch_shape",
    [
        ((3, 4, D), (D,)),  # shared parameters
        ((5, D), (5, D)),  # one set of parameters per sample (conditional flows)
        ((2, 5, D), (5, D)),  # ... with extra sample dimensions in front
    ],
)
def test_broadcasting(x_shape, param_batch_shape, inverse: bool) -> None:
    params = random_params(batch_shape=param_batch_shape)
    generator = torch.Generator().manual_seed(1)
    x = 1.2 * BOUND * (2 * torch.rand(x_shape, dtype=torch.float64, generator=generator) - 1)
    y, log_det = rational_quadratic_spline(x, *params, bound=BOUND, inverse=inverse)
    assert y.shape == x_shape and log_det.shape == x_shape
    y_ref, log_det_ref = elementwise_reference(x, params, inverse)
    torch.testing.assert_close(y, y_ref, atol=1e-14, rtol=0)
    atol = torch.full_like(log_det_ref, 1e-14)
    if inverse:
        # The inverse's log-determinant is -log f'(x) at the root x it solved
        # for; a root that batched and one-at-a-time kernels round an ulp
        # apart moves it by |d log f'/dx| ulps, which next to a narrow bin is
        # hundreds (measured over 300 random draws: within 11 eps (1 + |x|)
        # times that slope). Hold each point to rounding at its own slope.
        root = y_ref.clone().requires_grad_(True)
        slope = torch.autograd.grad(rational_quadratic_spline(root, *params, bound=BOUND)[1].sum(), root)[0]
        eps = torch.finfo(torch.float64).eps
        atol = atol + 16 * eps * (1 + y_ref.abs()) * slope.abs()
    assert ((log_det - log_det_ref).abs() <= atol).all(), (log_det - log_det_ref).abs().max()


# ---------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_reach_every_parameter(inverse: bool, dtype: torch.dtype) -> None:
    params = [p.requires_grad_(True) for p in random_params(dtype=dtype)]
    x = spline_points(*params[:2], inverse=inverse).detach().requires_grad_(True)
    y, log_det = rational_quadratic_spline(x, *params, bound=BOUND, inverse=inverse)
    grads = torch.autograd.grad((y.square() + log_det).sum(), [x, *params])
    for grad in grads:
        assert torch.isfinite(grad).all()
    for grad in grads[1:]:
        assert (grad != 0).any(dim=-1).all()  # every parameter set gets a signal


def test_gradcheck_float64() -> None:
    params = [p.requires_grad_(True) for p in random_params(batch_shape=(3,), scale=1.0)]
    x = torch.tensor([-3.5, -1.0, 0.3, 2.0, 2.9, 3.2], dtype=torch.float64)[:, None].expand(-1, 3)
    x = x.clone().requires_grad_(True)
    for inverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda *args: rational_quadratic_spline(*args, bound=BOUND, inverse=inverse),
            (x, *params),
        )


def test_bad_shapes_are_rejected() -> None:
    widths, heights, derivatives = random_params()
    x = torch.zeros(D, dtype=torch.float64)
    with pytest.raises(ValueError):
        rational_quadratic_spline(x, widths, heights[..., :-1], derivatives)
    with pytest.raises(ValueError):
        rational_quadratic_spline(x, widths, heights, widths)
    with pytest.raises(ValueError):
        rational_quadratic_spline(x, widths, heights, derivatives, min_bin_width=1.0 / K)
