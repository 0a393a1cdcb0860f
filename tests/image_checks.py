"""The checks every image transform passes (events of shape ``(C, H, W)``,
``event_dim = 3``): the counterpart of :func:`checks.check_transform`.

:func:`check_image_transform` takes a zero-argument function that builds the
transform (a :class:`~pyro.distributions.TransformModule`, or a
:class:`~pyro.distributions.ConditionalTransformModule` when ``context_dim``
is given) and the event shape it takes. A stack of image transforms (such as
``glow(...)``) is checked as one :class:`ImageStack`, which runs each layer
through its public calls, as a ``TransformedDistribution`` does. After
:func:`checks._check_declaration` (parameters exactly when
``has_parameters``, conditional exactly when ``context_dim``), one helper a
step asserts, in order:

1. :func:`_check_image_transform`: a bijective transform of images
   (``event_dim == 3`` both ways) whose ``repr`` names it;
2. :func:`_warm_up_and_move`: one batch through it (data-dependent
   initialisations happen), then every parameter moved well off its start;
3. :func:`_check_round_trips`: for batch shapes ``()``, ``(3,)``, ``(2, 3)``
   (conditional: contexts of batch 1 and 5 that broadcast) in float32 and
   float64, shapes and dtypes, and the uncached round trip
   ``inverse(forward(x)) == x`` (float64 to an absolute tolerance, float32 to
   that scaled by the inverse's conditioning); ``log_abs_det_jacobian`` of
   shape ``x.shape[:-3]`` and x's dtype, 0 where volume preserving;
4. :func:`_check_log_det`: against ``slogdet`` of the autograd Jacobian of
   the flattened map on a small image, in float64 at the moved parameters,
   also right after the public forward and inverse calls (which may hand a
   log-det over);
5. and 6. :func:`_check_training`: gradients of ``log_prob`` reach every
   parameter, and a few Adam steps on ``-log_prob`` lower it;
7. :func:`checks._check_state_dict`: ``state_dict`` round trips, directly and
   through ``torch.save`` / ``torch.load(weights_only=True)``;
8. :func:`checks._check_cache` (never stale after a parameter update),
   :func:`checks._check_conditioned_stays_fresh` (conditional flows, across
   optimiser steps and repeated backward passes) and
   :func:`checks._check_traces` (``torch.jit.trace``);
9. :func:`_check_wrong_shapes`: an image with the wrong channel count (and
   the caller's ``bad_shapes``, such as an odd height), forward and inverse,
   raises ``ValueError`` naming the shape expected; so do a context of the
   wrong width, float64 inputs and contexts into a float32 flow, and a
   context batch that does not broadcast;
10. :func:`checks._check_param_store`: ``pyro.module`` registers every
    parameter itself.

All random inputs come from one generator seeded by ``seed``, in this order.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import pyro.distributions as dist
import pytest
import torch
from checks import (
    _cases,
    _check_cache,
    _check_conditioned_stays_fresh,
    _check_declaration,
    _check_param_store,
    _check_state_dict,
    _check_traces,
    _context,
    _draw,
    _is_conditional,
    _plain,
    check_gradients_and_training,
    move_parameters,
)
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from pyro_nflows.transforms.image import ImageTransform

IMAGE_BATCH_SHAPES = [(), (3,), (2, 3)]
# (batch shape of the images, batch shape of the context): equal, and broadcasting.
IMAGE_CONTEXT_BATCH_SHAPES = [
    ((), ()), ((3,), (3,)), ((2, 3), (2, 3)), ((5,), (1,)), ((5,), (5,)), ((2, 5), (5,)), ((2, 5), (1,))
]


class ImageStack(ImageTransform, TransformModule):
    """Image transforms applied one after the other, as one module: each
    through its public calls (its checks, cache and log-det hand-over), as a
    ``TransformedDistribution`` chains them. It takes any channel count
    itself, so a wrong shape is refused by the layer it reaches."""

    def __init__(self, parts: Sequence[ImageTransform]):
        super().__init__(None)
        self.parts = nn.ModuleList(parts)

    def _call_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = 0
        for part in self.parts:
            y = part(x)
            log_det = log_det + part.log_abs_det_jacobian(x, y)
            x = y
        return x, log_det

    def _inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = 0
        for part in reversed(self.parts):
            x = part.inv(y)
            log_det = log_det + part.log_abs_det_jacobian(x, y)
            y = x
        return y, log_det

    def forward_shape(self, shape):
        for part in self.parts:
            shape = part.forward_shape(shape)
        return shape

    def inverse_shape(self, shape):
        for part in reversed(self.parts):
            shape = part.inverse_shape(shape)
        return shape


def _images(batch, shape, dtype, generator):
    return _draw(batch, shape, dtype, generator)


def check_image_transform(
    build: Callable[[], nn.Module],
    shape: tuple[int, int, int],
    context_dim: int | None = None,
    *,
    out_shape: tuple[int, int, int] | None = None,
    perturbation: float = 0.3,
    round_trip_atol32: float = 1e-4,
    round_trip_atol64: float = 1e-10,
    log_det_atol: float = 1e-6,
    seed: int = 0,
    has_parameters: bool = True,
    bad_shapes: Sequence[tuple[tuple[int, ...], str, str]] = (),
) -> None:
    """Run every shared image check on the transform that ``build()`` makes,
    for events of shape ``shape`` (``out_shape`` on the output side, where it
    differs). ``bad_shapes`` adds ``(event shape, "forward" or "inverse", text
    the error must hold)`` to the wrong-shape checks; a transform that takes
    a fixed channel count is also fed one channel too many each way."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    out_shape = tuple(shape if out_shape is None else out_shape)
    module = build()
    _check_declaration(module, context_dim, has_parameters)
    _check_image_transform(module, context_dim, generator)
    _warm_up_and_move(module, shape, context_dim, perturbation, generator)
    _check_round_trips(module, shape, out_shape, context_dim, round_trip_atol32, round_trip_atol64, generator)
    _check_log_det(module, shape, context_dim, log_det_atol, generator)
    trained = copy.deepcopy(module)
    if has_parameters:
        _check_training(trained, shape, out_shape, context_dim, generator)
    x = _images((7,), shape, torch.float32, generator)
    context = None if context_dim is None else _context((7,), context_dim, torch.float32, generator)
    _check_state_dict(build, trained, x, context)
    _check_cache(trained, x, context, has_parameters, perturbation, generator)
    if context is not None and has_parameters:
        _check_conditioned_stays_fresh(trained, x, context)
    _check_traces(trained, x, context)
    _check_wrong_shapes(trained, shape, out_shape, context_dim, bad_shapes, generator)
    _check_param_store(build())


def _check_image_transform(module, context_dim, generator) -> None:
    """Step 1: a bijective image transform (``event_dim == 3`` both ways)
    whose ``repr``, and that of its conditioned form, names its class."""
    conditional = _is_conditional(module)
    probe = _plain(module, _context((2,), context_dim, torch.float32, generator) if conditional else None)
    assert probe.domain.event_dim == 3 and probe.codomain.event_dim == 3
    assert probe.bijective
    for shown in (module, probe):
        assert repr(shown).startswith(type(shown).__name__ + "("), repr(shown)


def _warm_up_and_move(module, shape, context_dim, perturbation, generator) -> None:
    """Step 2 (no assertion): 64 images through the module, then every parameter moved."""
    warm_c = _context((64,), context_dim, torch.float32, generator) if _is_conditional(module) else None
    _plain(module, warm_c)(_images((64,), shape, torch.float32, generator))
    move_parameters(module, perturbation, generator)


def _per_image(value: torch.Tensor) -> torch.Tensor:
    return value.abs().amax((-3, -2, -1))


def _check_round_trips(module, shape, out_shape, context_dim, atol32, atol64, generator) -> None:
    """Step 3: shapes, dtypes, finiteness and uncached round trips for every
    batch-shape case, in float32 and float64 (float32 held to ``atol32``
    times ``max(1, ||dx/dy||_inf)``, the inverse's Jacobian in float64)."""
    module64 = copy.deepcopy(module).double()
    for dtype, atol in [(torch.float32, atol32), (torch.float64, atol64)]:
        typed = copy.deepcopy(module).to(dtype)
        for x, context in _cases(shape, context_dim, dtype, generator, IMAGE_BATCH_SHAPES,
                                 IMAGE_CONTEXT_BATCH_SHAPES):
            transform = _plain(typed, context)
            y = transform._call(x)
            assert y.shape == x.shape[:-3] + out_shape and y.dtype == dtype, (y.shape, x.shape, y.dtype)
            assert torch.isfinite(y).all()
            x_back = transform._inverse(y.clone())  # a new tensor: computed, not looked up in a cache
            error = _per_image(x_back - x)
            bound = torch.full_like(error, atol)
            if dtype == torch.float32 and (error > atol).any():  # the bound is at least atol: scale it only then
                bound = atol * _inverse_condition(module64, y, context)
            worst = torch.argmax(error - bound)
            assert (error <= bound).all(), (
                f"round trip error {error.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g} "
                f"in {dtype} for x of shape {tuple(x.shape)}"
            )
            log_det = transform.log_abs_det_jacobian(x, y)
            assert log_det.shape == x.shape[:-3] and log_det.dtype == dtype, (log_det.shape, x.shape)
            if getattr(transform, "volume_preserving", False):
                assert (log_det == 0).all()


def _inverse_condition(module64, y, context) -> torch.Tensor:
    """max(1, ||dx/dy||_inf) at each image of ``y``, in float64, shape ``y.shape[:-3]``."""
    event = y.shape[-3:]
    points = y.detach().double().reshape((-1,) + event)
    contexts = [None] * len(points)
    if context is not None:
        contexts = context.double().expand(y.shape[:-3] + context.shape[-1:]).reshape(len(points), -1)
    norms = []
    for point, point_context in zip(points, contexts):
        inverse = _plain(module64, point_context)._inverse
        jacobian = torch.autograd.functional.jacobian(lambda v: inverse(v.reshape(event)).flatten(), point.flatten())
        norms.append(max(1.0, jacobian.abs().sum(-1).max().item()))
    return torch.tensor(norms, dtype=y.dtype).reshape(y.shape[:-3])


def _check_log_det(module, shape, context_dim, log_det_atol, generator) -> None:
    """Step 4: in float64, at the moved parameters, ``log_abs_det_jacobian``
    within ``log_det_atol`` of ``slogdet`` of the autograd Jacobian of the
    flattened map, also after the public forward and inverse calls."""
    module64 = copy.deepcopy(module).double()
    points = _images((3,), shape, torch.float64, generator)
    contexts = _context((3,), context_dim, torch.float64, generator) if _is_conditional(module) else [None] * 3
    for x, context in zip(points, contexts):
        transform = _plain(module64, context)
        flat_call = lambda v: transform._call(v.reshape(shape)).flatten()  # noqa: E731
        jacobian = torch.autograd.functional.jacobian(flat_call, x.flatten())
        expected = torch.linalg.slogdet(jacobian).logabsdet
        error = (transform.log_abs_det_jacobian(x, transform._call(x)) - expected).abs().item()
        assert error <= log_det_atol, f"log-det error {error:.3g} > {log_det_atol}"
        y = transform(x)
        error = (transform.log_abs_det_jacobian(x, y) - expected).abs().item()
        assert error <= log_det_atol, f"log-det after the forward call off by {error:.3g}"
        y = y.detach().clone()
        x_back = transform.inv(y)
        error = (transform.log_abs_det_jacobian(x_back, y) - expected).abs().item()
        assert error <= log_det_atol, f"log-det after the inverse call off by {error:.3g}"


def _flow_dist(module, context, shape):
    """The flow over images with an anisotropic Gaussian base on ``shape`` (so rotations change the likelihood)."""
    scale = torch.linspace(0.5, 2.0, math.prod(shape)).reshape(shape)
    base = dist.Normal(torch.zeros(shape), scale).to_event(3)
    if context is None:
        return dist.TransformedDistribution(base, [module])
    return dist.ConditionalTransformedDistribution(base, [module]).condition(context)


def _check_training(trained, shape, out_shape, context_dim, generator) -> None:
    """Steps 5 and 6: gradients of ``log_prob`` reach every parameter, and 15
    Adam steps on ``-log_prob`` of correlated images lower it."""
    size = math.prod(out_shape)
    mixing = torch.randn(size, size, generator=generator) / size**0.5 + torch.eye(size)
    data = (torch.randn(64, size, generator=generator) @ mixing.T + 0.5).reshape((64,) + out_shape)
    context = None if context_dim is None else torch.randn(64, context_dim, generator=generator)

    def loss():
        return -_flow_dist(trained, context, shape).log_prob(data).mean()

    check_gradients_and_training(trained, loss, steps=15)


def _expected_text(event_shape) -> str:
    return f"(..., {event_shape[0]}, H, W)"


def _check_wrong_shapes(trained, shape, out_shape, context_dim, bad_shapes, generator) -> None:
    """Step 9: wrong event shapes (one channel too many where the channel
    count is fixed, a tensor of fewer than 3 dimensions, ``bad_shapes``),
    wrong context widths, other dtypes and non-broadcasting context batches
    raise ``ValueError`` saying what was expected."""
    conditional = _is_conditional(trained)
    context = _context((3,), context_dim, torch.float32, generator) if conditional else None
    transform = _plain(trained, context)
    cases = [((shape[-1],), "forward", "(..., "), ((out_shape[-1],), "inverse", "(..., ")] + list(bad_shapes)
    if getattr(transform, "channels", None) is not None:
        cases.append(((shape[0] + 1,) + shape[1:], "forward", _expected_text(shape)))
    if getattr(transform, "out_channels", None) is not None:
        cases.append(((out_shape[0] + 1,) + out_shape[1:], "inverse", _expected_text(out_shape)))
    for event_shape, direction, text in cases:
        call = transform if direction == "forward" else transform.inv
        with pytest.raises(ValueError, match="expects") as error:
            call(_images((3,), event_shape, torch.float32, generator))
        assert text in str(error.value), (text, str(error.value))
    if conditional:
        with pytest.raises(ValueError, match=str(context_dim)):
            trained.condition(_context((3,), context_dim + 1, torch.float32, generator))
    if any(p.is_floating_point() for p in trained.parameters()):
        for call, event_shape in ((transform, shape), (transform.inv, out_shape)):
            with pytest.raises(ValueError, match="float64"):
                call(_images((3,), event_shape, torch.float64, generator))
        if conditional:
            with pytest.raises(ValueError, match="float64"):
                trained.condition(context.double())
    if conditional:
        for call, event_shape in ((transform, shape), (transform.inv, out_shape)):
            with pytest.raises(ValueError, match="does not broadcast"):
                call(_images((4,), event_shape, torch.float32, generator))
