"""The checks every transform of the package passes (see DESIGN.md).

:func:`check_transform` takes a zero-argument function that builds the
transform (a :class:`~pyro.distributions.TransformModule`, or a
:class:`~pyro.distributions.ConditionalTransformModule` when ``context_dim``
is given). :func:`_check_declaration` first asserts that the module has
parameters exactly when ``has_parameters`` says so and is conditional exactly
when ``context_dim`` is given; then one helper a step asserts, in order:

1. :func:`_check_vector_transform`: the transform is a bijective transform of
   vectors (``event_dim == 1``) or of their coordinates (``event_dim == 0``,
   the element-wise flows, as Pyro's) whose ``repr`` names it;
2. :func:`_warm_up_and_move`: every parameter is moved well off its
   initialisation (after one batch has passed, so data-dependent
   initialisations have happened);
3. :func:`_check_round_trips`: shapes and uncached round trips
   ``inverse(forward(x)) == x`` in float64 (absolute tolerance) and float32
   (the same scaled by the inverse's conditioning, at least 1), for batch
   shapes ``()``, ``(3,)``, ``(3, 4)`` and, for conditional transforms,
   contexts with batches of 1 and 5 that broadcast;
4. :func:`_check_log_det`: ``log_abs_det_jacobian`` against ``slogdet`` of the
   autograd Jacobian, in float64, at the moved parameters, also right after the
   public forward and inverse calls (which may hand a log-det over), and the
   determinant's sign against the transform's ``sign`` where it declares one;
5. :func:`_check_training`: gradients of ``log_prob`` reach every parameter;
6. :func:`_check_training`: a few Adam steps on ``-log_prob`` lower it (the
   base is anisotropic, so volume-preserving flows can learn too);
7. :func:`_check_state_dict`: ``state_dict`` round trips (directly and through
   ``torch.save`` / ``torch.load(weights_only=True)``) give the same outputs;
8. :func:`_check_cache`: the cache inverts the transform's own output exactly
   and never returns a stale value after an in-place parameter update (a
   conditioned transform's neither);
   :func:`_check_conditioned_stays_fresh`: a transform returned by
   ``condition(context)`` stays right across optimiser steps and repeated
   backward passes, as Pyro's do;
   :func:`_check_traces`: ``torch.jit.trace`` of a module holding the flow
   works and gives the eager outputs;
9. :func:`_check_wrong_widths`: an input or context of the wrong width raises
   ``ValueError``; :func:`_check_wrong_dtypes_and_batches`: so do an input or
   context of another dtype than the parameters' and a context batch that does
   not broadcast against the input's;
10. :func:`_check_param_store`: ``pyro.module`` registers every parameter
    itself, not a copy (Pyro's param store keeps a contiguous copy of a
    non-contiguous tensor, which an optimiser would then update while the
    transform computes with the original).

Steps 5 and 6 are left out for a transform without parameters. All random
inputs come from one generator, in this order.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import ConditionalTransformModule
from torch.distributions.transforms import Transform
from torch.distributions.utils import _sum_rightmost

BATCH_SHAPES = [(), (3,), (3, 4)]
# (batch shape of x, batch shape of the context): equal, and broadcasting.
CONTEXT_BATCH_SHAPES = [
    ((), ()), ((3,), (3,)), ((3, 4), (3, 4)), ((5,), (1,)), ((5,), (5,)), ((3, 5), (5,)), ((3, 5), (1,))
]


def _draw(batch, event_shape, dtype, generator):
    """Standard normal draws of shape ``batch + event_shape`` (an ``int`` event: a vector of that size)."""
    event_shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
    return torch.randn(*batch, *event_shape, dtype=dtype, generator=generator)


def _points(shape, input_dim, dtype, generator):
    return _draw(shape, input_dim, dtype, generator)


def _context(shape, context_dim, dtype, generator):
    return torch.randn(*shape, context_dim, dtype=dtype, generator=generator)


def _cases(event_shape, context_dim, dtype, generator, batch_shapes=BATCH_SHAPES,
           context_batch_shapes=CONTEXT_BATCH_SHAPES):
    """Yield ``(x, context or None)`` pairs covering every batch-shape case (``event_shape``: the
    input size of a vector flow, or the ``(C, H, W)`` of an image flow, with its own batch shapes)."""
    if context_dim is None:
        for shape in batch_shapes:
            yield _draw(shape, event_shape, dtype, generator), None
    else:
        for x_shape, c_shape in context_batch_shapes:
            yield _draw(x_shape, event_shape, dtype, generator), _context(c_shape, context_dim, dtype, generator)


def _plain(module, context) -> Transform:
    return module.condition(context) if context is not None else module


def _is_conditional(module) -> bool:
    return isinstance(module, ConditionalTransformModule)


def _base(input_dim, dtype):
    """An anisotropic Gaussian, so that rotations change the likelihood."""
    scale = torch.linspace(0.5, 2.0, input_dim, dtype=dtype)
    return dist.Normal(torch.zeros(input_dim, dtype=dtype), scale).to_event(1)


def _flow_dist(module, context, input_dim, dtype):
    base = _base(input_dim, dtype)
    if context is None:
        return dist.TransformedDistribution(base, [module])
    return dist.ConditionalTransformedDistribution(base, [module]).condition(context)


def _training_data(input_dim, context_dim, generator, count=256):
    mixing = torch.randn(input_dim, input_dim, generator=generator) / input_dim**0.5 + torch.eye(input_dim)
    data = torch.randn(count, input_dim, generator=generator) @ mixing.T + 0.5
    context = None if context_dim is None else torch.randn(count, context_dim, generator=generator)
    return data, context


def moved(module, scale: float = 0.3, seed: int | None = 0):
    """``module`` after :func:`move_parameters`, drawing from a generator seeded
    by ``seed``, or from torch's global one with ``seed=None``."""
    move_parameters(module, scale, None if seed is None else torch.Generator().manual_seed(seed))
    return module


def move_parameters(module, scale: float, generator) -> None:
    """Add Gaussian noise of standard deviation ``scale`` to every parameter."""
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(scale * noise)


def check_transform(
    build: Callable[[], torch.nn.Module],
    input_dim: int,
    context_dim: int | None = None,
    *,
    perturbation: float = 0.3,
    round_trip_atol32: float = 1e-4,
    round_trip_atol64: float = 1e-10,
    log_det_atol: float = 1e-6,
    seed: int = 0,
    has_parameters: bool = True,
) -> None:
    """Run every shared check on the transform that ``build()`` makes.

    ``has_parameters=False`` declares a transform without learnable
    parameters (a fixed permutation): the check then asserts it has none and
    leaves out the training steps, which have nothing to act on.

    Every random input is drawn from one generator seeded by ``seed``, step
    after step, so the steps must run in this order.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    module = build()
    _check_declaration(module, context_dim, has_parameters)
    _check_vector_transform(module, input_dim, context_dim, generator)
    _warm_up_and_move(module, input_dim, context_dim, perturbation, generator)
    _check_round_trips(module, input_dim, context_dim, round_trip_atol32, round_trip_atol64, generator)
    _check_log_det(module, input_dim, context_dim, log_det_atol, generator)
    data, data_context = _training_data(input_dim, context_dim, generator)
    trained = copy.deepcopy(module)
    if has_parameters:
        _check_training(trained, data, data_context, input_dim)
    x = _points((7,), input_dim, torch.float32, generator)  # steps 7 and 8 use the same points
    context = _context((7,), context_dim, torch.float32, generator) if context_dim is not None else None
    _check_state_dict(build, trained, x, context)
    _check_cache(trained, x, context, has_parameters, perturbation, generator)
    if context is not None and has_parameters:
        _check_conditioned_stays_fresh(trained, x, context)
    _check_traces(trained, x, context)
    _check_wrong_widths(trained, input_dim, context_dim, generator)
    _check_wrong_dtypes_and_batches(trained, input_dim, context_dim, generator)
    _check_param_store(build())


def _check_declaration(module, context_dim, has_parameters) -> None:
    """The module has parameters exactly when ``has_parameters`` says so, and is
    conditional exactly when a ``context_dim`` is given."""
    count = sum(p.numel() for p in module.parameters())
    assert (count > 0) == has_parameters, f"expected has_parameters={has_parameters}, found {count} parameters"
    assert _is_conditional(module) == (context_dim is not None), "pass context_dim exactly for conditional transforms"


def _event_dim(transform) -> int:
    return transform.domain.event_dim


def _total_log_det(transform, x, y) -> torch.Tensor:
    """``log_abs_det_jacobian`` summed over the event (an element-wise flow gives one term per coordinate)."""
    return _sum_rightmost(transform.log_abs_det_jacobian(x, y), 1 - _event_dim(transform))


def _check_vector_transform(module, input_dim, context_dim, generator) -> None:
    """Step 1: a bijective transform of vectors (``event_dim == 1`` both ways)
    or of each of their coordinates (``event_dim == 0``, as Pyro's element-wise
    ones), whose ``repr``, and that of its conditioned form, names its class
    and ``input_dim``."""
    conditional = _is_conditional(module)
    probe = _plain(module, _context((2,), context_dim, torch.float32, generator) if conditional else None)
    assert probe.domain.event_dim in (0, 1) and probe.codomain.event_dim == probe.domain.event_dim
    assert probe.bijective
    for shown in (module, probe):  # printing a flow shows what it is, not just its class name
        assert repr(shown).startswith(type(shown).__name__ + "(") and f"input_dim={input_dim}" in repr(shown)


def _warm_up_and_move(module, input_dim, context_dim, perturbation, generator) -> None:
    """Step 2 (no assertion): one batch through the module, so that data-dependent
    initialisations have happened, then every parameter moved by ``perturbation``."""
    warm_x = _points((64,), input_dim, torch.float32, generator)
    warm_c = _context((64,), context_dim, torch.float32, generator) if _is_conditional(module) else None
    _plain(module, warm_c)(warm_x)
    move_parameters(module, perturbation, generator)


def _check_round_trips(module, input_dim, context_dim, atol32, atol64, generator) -> None:
    """Step 3: for every batch-shape case, in float32 and float64, the forward
    keeps shape and dtype and is finite, the uncached ``_inverse`` undoes it, and
    ``log_abs_det_jacobian`` has shape ``x.shape[:-1]`` (``x.shape`` for an
    element-wise flow), x's dtype, and is 0 for a volume-preserving transform.

    float64 is held to an absolute tolerance. In float32 the rounding of y alone
    moves the inverse by up to |dx/dy| times as much, whatever the implementation,
    so each point is held to atol32 * max(1, ||dx/dy||_inf), the Jacobian of the
    inverse taken in float64: a well-conditioned map gets atol32 itself.
    """
    module64 = copy.deepcopy(module).double()
    for dtype, atol in [(torch.float32, atol32), (torch.float64, atol64)]:
        typed = copy.deepcopy(module).to(dtype)
        for x, context in _cases(input_dim, context_dim, dtype, generator):
            transform = _plain(typed, context)
            y = transform._call(x)
            assert y.shape == x.shape and y.dtype == dtype, (y.shape, x.shape, y.dtype)
            assert torch.isfinite(y).all()
            x_back = transform._inverse(y)
            error = (x_back - x).abs().amax(-1)
            bound = torch.full_like(error, atol)
            if dtype == torch.float32:
                bound = atol * _inverse_condition(module64, y, context, input_dim)
            worst = torch.argmax(error - bound)
            assert (error <= bound).all(), (
                f"round trip error {error.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g} "
                f"in {dtype} for x of shape {tuple(x.shape)}"
            )
            log_det = transform.log_abs_det_jacobian(x, y)
            assert log_det.shape == x.shape[: x.dim() - _event_dim(transform)], (log_det.shape, x.shape)
            assert log_det.dtype == dtype
            if getattr(transform, "volume_preserving", False):
                assert (log_det == 0).all()


def _check_log_det(module, input_dim, context_dim, log_det_atol, generator) -> None:
    """Step 4: in float64, at the moved parameters, ``log_abs_det_jacobian`` is
    within ``log_det_atol`` of ``slogdet`` of the autograd Jacobian, also right
    after the public forward and inverse calls (which may hand a log-det over);
    and the determinant's sign is the transform's ``sign`` where it has one."""
    module64 = copy.deepcopy(module).double()
    points = _points((4,), input_dim, torch.float64, generator)
    contexts = _context((4,), context_dim, torch.float64, generator) if _is_conditional(module) else [None] * 4
    for x, context in zip(points, contexts):
        transform = _plain(module64, context)
        jacobian = torch.autograd.functional.jacobian(transform._call, x)
        sign, expected = torch.linalg.slogdet(jacobian)
        if hasattr(transform, "sign"):  # declared where the map increases coordinate by coordinate
            assert sign.item() == transform.sign, f"{type(transform).__name__}.sign is wrong"
        actual = _total_log_det(transform, x, transform._call(x))
        error = (actual - expected).abs().item()
        assert error <= log_det_atol, f"log-det error {error:.3g} > {log_det_atol}"
        # Through the public calls, which may hand a log-det over from the pass itself.
        y = transform(x)
        error = (_total_log_det(transform, x, y) - expected).abs().item()
        assert error <= log_det_atol, f"log-det after the forward call off by {error:.3g}"
        y = y.detach().clone()  # a new tensor: the inverse is computed, not looked up
        x_back = transform.inv(y)
        error = (_total_log_det(transform, x_back, y) - expected).abs().item()
        assert error <= log_det_atol, f"log-det after the inverse call off by {error:.3g}"


def _check_state_dict(build, trained, x, context) -> None:
    """Step 7: a fresh ``build()`` loaded with ``trained``'s ``state_dict``, directly
    and through ``torch.save`` / ``torch.load(weights_only=True)``, gives exactly
    ``trained``'s outputs at ``x``."""
    expected = _plain(trained, context)._call(x)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    for state in [trained.state_dict(), torch.load(buffer, weights_only=True)]:
        restored = build()
        restored.load_state_dict(state)
        assert torch.equal(_plain(restored, context)._call(x), expected), "state_dict round trip changed outputs"


def _check_cache(trained, x, context, has_parameters, perturbation, generator) -> None:
    """Step 8: on a copy of ``trained``, the cache inverts the transform's own
    output exactly (returns ``x`` itself) and, for a transform with parameters,
    never returns a stale value after an in-place parameter update (by
    ``perturbation``); a conditioned transform answers as one conditioned
    afresh."""
    cached = copy.deepcopy(trained)
    transform = _plain(cached, context)
    with torch.no_grad():
        y = transform(x)
        assert transform.inv(y) is x, "the cache should return the input of the last forward call"
        if has_parameters:
            move_parameters(cached, perturbation, generator)
            x_new = transform.inv(y)
            expected = _plain(cached, context)._inverse(y)
            stale = "the cache returned a stale value after a parameter update"
            assert torch.equal(x_new, expected), stale
            assert not torch.equal(x_new, x)


def _check_conditioned_stays_fresh(trained, x, context) -> None:
    """Step 8b, conditional transforms: one conditioned transform, used across
    optimiser steps and repeated backward passes (as Pyro's are), always
    computes what a transform conditioned afresh computes, and never
    backpropagates through a graph a backward pass has freed."""
    module = copy.deepcopy(trained)
    transform = module.condition(context)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)

    weights = torch.linspace(0.5, 2.0, x.shape[-1])  # anisotropic: rotations change the loss too

    def loss():
        y = transform(x.clone())
        return ((y - 0.5) * weights).square().sum() - transform.log_abs_det_jacobian(x, y).sum()

    before = transform(x.clone()).detach()
    for _ in range(2):  # two backward passes through the same conditioned transform
        optimizer.zero_grad()
        loss().backward()
    optimizer.step()
    after = transform(x.clone())
    expected = module.condition(context.clone())(x.clone())
    assert torch.equal(after, expected), "a conditioned transform went stale after a step"
    assert not torch.allclose(after, before), "an optimiser step did not change the conditioned transform"
    loss().backward()


class _Traced(torch.nn.Module):
    """A module that holds a flow and applies it, as a user's model or guide would."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x, context=None):
        transform = _plain(self.flow, context)
        y = transform(x)
        return y, transform.log_abs_det_jacobian(x, y)


def _check_traces(trained, x, context) -> None:
    """Step 8c: ``torch.jit.trace`` of a module holding the flow works (it asks
    every attribute, ``sign`` included) and the traced forward pass and
    log-determinant equal the eager ones."""
    holder = _Traced(copy.deepcopy(trained)).eval()
    inputs = (x,) if context is None else (x, context)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # data-dependent loops are traced as run
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+ points to torch.export; Pyro uses trace
        traced = torch.jit.trace(holder, inputs, check_trace=False)
    for got, expected in zip(traced(*inputs), holder(*inputs)):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), "the traced flow differs from the flow"
    assert hasattr(trained, "sign") in (True, False)  # never raises


def _check_wrong_widths(trained, input_dim, context_dim, generator) -> None:
    """Step 9: an input of the wrong width, forward or inverse, and a context of
    the wrong width raise ``ValueError`` naming the expected width."""
    conditional = _is_conditional(trained)
    wrong = _points((3,), input_dim + 1, torch.float32, generator)
    transform = _plain(trained, _context((3,), context_dim, torch.float32, generator) if conditional else None)
    for call in (transform, transform.inv):
        try:
            call(wrong)
        except ValueError as error:
            assert str(input_dim) in str(error)
        else:
            raise AssertionError("an input of the wrong width did not raise ValueError")
    if not conditional:
        return
    try:
        trained.condition(_context((3,), context_dim + 1, torch.float32, generator))
    except ValueError as error:
        assert str(context_dim) in str(error)
    else:
        raise AssertionError("a context of the wrong width did not raise ValueError")


def _check_wrong_dtypes_and_batches(trained, input_dim, context_dim, generator) -> None:
    """Step 9b: a float64 input into the float32 flow (and a float64 context),
    and a context batch that does not broadcast against the input's, raise
    ``ValueError`` naming what was wrong, not a dtype or shape error from
    deep inside torch."""
    conditional = _is_conditional(trained)
    context = _context((3,), context_dim, torch.float32, generator) if conditional else None
    transform = _plain(trained, context)
    if any(p.is_floating_point() for p in trained.parameters()):
        for call in (transform, transform.inv):
            with pytest.raises(ValueError, match="float64"):
                call(_points((3,), input_dim, torch.float64, generator))
        if conditional:
            with pytest.raises(ValueError, match="float64"):
                trained.condition(context.double())
    if conditional:
        for call in (transform, transform.inv):
            with pytest.raises(ValueError, match="does not broadcast"):
                call(_points((4,), input_dim, torch.float32, generator))


def _check_param_store(fresh) -> None:
    """Step 10: ``pyro.module`` registers every parameter of ``fresh`` itself, not
    a copy (Pyro's param store keeps a contiguous copy of a non-contiguous tensor,
    which an optimiser would then update while the transform computes with the
    original). The param store is left empty."""
    pyro.clear_param_store()
    try:
        pyro.module("checked", fresh)
        store = pyro.get_param_store()
        for name, parameter in fresh.named_parameters():
            assert store[f"checked$$${name}"] is parameter, f"pyro.module registered a copy of {name!r}"
    finally:
        pyro.clear_param_store()


def _inverse_condition(module64, y, context, input_dim) -> torch.Tensor:
    """max(1, ||dx/dy||_inf) at each point of ``y``, in float64, shape ``y.shape[:-1]``."""
    points = y.detach().double().reshape(-1, input_dim)
    contexts = [None] * len(points)
    if context is not None:
        contexts = context.double().expand(y.shape[:-1] + context.shape[-1:]).reshape(len(points), -1)
    norms = []
    for point, point_context in zip(points, contexts):
        jacobian = torch.autograd.functional.jacobian(_plain(module64, point_context)._inverse, point)
        norms.append(max(1.0, jacobian.abs().sum(-1).max().item()))
    return torch.tensor(norms, dtype=y.dtype).reshape(y.shape[:-1])


def _check_training(trained, data, data_context, input_dim) -> None:
    """Steps 5 and 6 on vector data: see :func:`check_gradients_and_training`."""

    def loss():
        return -_flow_dist(trained, data_context, input_dim, torch.float32).log_prob(data).mean()

    check_gradients_and_training(trained, loss, steps=30)


def check_gradients_and_training(trained, loss: Callable[[], torch.Tensor], steps: int) -> None:
    """Steps 5 and 6: gradients of ``loss()`` (``-log_prob`` of some data)
    reach every parameter, finite and not all zero; ``steps`` Adam steps
    lower it."""
    trained.zero_grad()
    loss().backward()
    for name, parameter in trained.named_parameters():
        if parameter.numel() == 0:
            continue
        assert parameter.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(parameter.grad).all(), f"non-finite gradient for {name}"
        assert parameter.grad.abs().sum() > 0, f"zero gradient for {name}"
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
    with torch.no_grad():
        before = loss().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < before - 1e-3, f"-log_prob did not decrease: {before:.4f} -> {after:.4f}"
