"""What every transform of the package shares: input validation and a cache that
knows about parameter updates.

Torch's :class:`~torch.distributions.transforms.Transform` caches the last
``(x, y)`` pair and returns the cached ``y`` whenever it is called again with
the *same tensor object* ``x``. For a :class:`~pyro.distributions.TransformModule`
that is a trap twice over: after an optimiser step the parameters have changed
but the cache still answers with the output of the old parameters; and a
repeated call hands back a tensor whose autograd graph may already have been
freed by ``backward()`` (or was built under ``no_grad``).

:class:`FlowTransform` caches for the one purpose that matters, scoring a
transform's own samples: after ``y = t(x)``, ``t.inv(y)`` returns ``x`` itself
(and after ``x = t.inv(y)``, ``t(x)`` returns ``y``), which also makes that
round trip exact for inverses that are only numerical. It keeps the latest
pairs, not only the last (:class:`~pyro_nflows.transforms.cache.PairCache`),
so a transform reused before its samples are scored (a deep Markov model's
guide) inverts none of them; each pair is forgotten with its output. A call
in the same direction as a cached one is recomputed, so every returned
tensor is either fresh or the caller's own input. The cache is keyed on the
identity of the tensor *and* on the in-place version counter of every
parameter, so an update (an optimiser step, ``load_state_dict``, a
data-dependent initialisation) invalidates it.

A transform returned by a conditional flow's ``condition(context)`` keeps no
tensor the context network computed: like Pyro's, it recomputes them when
asked, so that it stays right across optimiser steps and repeated backward
passes. :class:`ContextParameters` computes them once and reuses them until
they could be wrong or spent (a parameter or the context changed in place,
or a backward pass went through them), and the conditioned transform's cache
is keyed on the version counters of the conditional flow's parameters and of
the context.

It also checks the event shape of every input, so that a wrong size gets a
``ValueError`` that names what was expected rather than a shape error from deep
inside torch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import nn
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from pyro_nflows.nn.dense import ContextNet
from pyro_nflows.nn.widths import default_hidden_dims
from pyro_nflows.transforms.cache import PairCache, compiling
from pyro_nflows.validation import check_count, check_event, check_input_dim

__all__ = [
    "ConditionalFlow",
    "ContextParameters",
    "FlowTransform",
    "ParameterFn",
    "condition_on",
    "parameter_versions",
    "resolve",
]


# A parameter given as a callable that returns its tensor (Pyro's convention for
# conditioned transforms, whose parameters a context network recomputes).
ParameterFn = Callable[[], torch.Tensor]


def resolve(value):
    """A parameter given as a tensor or as a callable returning one (Pyro's convention)."""
    return value() if callable(value) else value


def parameter_versions(module: nn.Module | None) -> tuple:
    """The version counters of the parameters of ``module`` and its submodules
    (none for ``None``); an in-place update of any parameter changes the
    tuple. It walks the modules' own dictionaries: ``nn.Module.parameters()``
    (name prefixes, a set to drop repeats) is slower, and this runs at every
    call (measured: benchmarks/README.md#parameter-versions)."""
    if module is None:
        return ()
    versions, modules = [], [module]
    while modules:
        module = modules.pop()
        versions.extend(p._version for p in module._parameters.values() if p is not None)
        modules.extend(m for m in module._modules.values() if m is not None)
    return tuple(versions)


class ContextParameters:
    """The parameters a network computes from one context, for a conditioned
    transform: ``net(context)``, a tensor or a tuple of them.

    Pyro's conditional transforms keep ``partial(net, context)`` and run the
    network at every call. This computes it once and reuses the result until
    it could be wrong or spent: a parameter of ``net`` or the context changed
    in place (their version counters), or a backward pass went through it (a
    hook on each output forgets it). :meth:`parts` gives one callable per
    output, the form the ``Conditioned<X>`` classes take their parameters in.
    """

    def __init__(self, net: Callable[[torch.Tensor], Any], context: torch.Tensor, module: nn.Module | None = None):
        self.net, self.context = net, context
        self.module = net if module is None and isinstance(net, nn.Module) else module
        self._value = None
        self._key = None

    def __call__(self) -> Any:
        if compiling():  # no memo in a traced graph, as no cache (see pyro_nflows.transforms.cache)
            return self.net(self.context)
        key = (parameter_versions(self.module), self.context._version, torch.is_grad_enabled())
        if self._value is None or key != self._key:
            value = self.net(self.context)
            for output in value if isinstance(value, (tuple, list)) else (value,):
                if output.requires_grad:
                    output.register_hook(self._forget)
            self._value, self._key = value, key
        return self._value

    def _forget(self, grad: torch.Tensor) -> None:
        self._value = None

    def part(self, index: int) -> torch.Tensor:
        return self()[index]

    def parts(self, count: int) -> tuple[ParameterFn, ...]:
        """One callable per output (the first ``count``)."""
        return tuple(functools.partial(self.part, index) for index in range(count))

    def __getstate__(self) -> dict:
        # Copies and pickles recompute: the cached outputs belong to a graph.
        return {**self.__dict__, "_value": None, "_key": None}


def _parameter_dtype(module: nn.Module | None) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point parameter (``None`` without one)."""
    modules = [] if module is None else [module]
    while modules:
        module = modules.pop()
        for parameter in module._parameters.values():
            if parameter is not None and parameter.is_floating_point():
                return parameter.dtype
        modules.extend(m for m in module._modules.values() if m is not None)
    return None


def check_dtype(value: torch.Tensor, module: nn.Module | None, who: str, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` has the dtype of ``module``'s
    parameters (under autocast, which converts as it goes, anything passes)."""
    dtype = _parameter_dtype(module)
    if dtype is None or value.dtype == dtype or torch.is_autocast_enabled():
        return
    raise ValueError(
        f"{who} has {dtype} parameters but got a {value.dtype} {what}: convert one to the other "
        f"(flow.to({value.dtype}) or tensor.to({dtype}))"
    )


def condition_on(transform: "FlowTransform", module: nn.Module, context: torch.Tensor) -> "FlowTransform":
    """Mark ``transform`` as conditioned by ``module`` on ``context``: its cache
    is then keyed on the version counters of ``module``'s parameters and of the
    context, so an optimiser step (or an in-place change of the context) never
    gets a stale cached value. Returns ``transform``."""
    transform.__dict__.update(_owner=module, _context=context)
    return transform


class FlowTransform(Transform):
    r"""Base class of the package's vector transforms (``event_dim = 1``).

    Subclasses implement ``_call``, ``_inverse`` and ``log_abs_det_jacobian`` and
    set ``self.input_dim``. This class validates the event size of every input
    and keeps a cache that is invalidated by any in-place change of a parameter.

    A transform whose log-determinant falls out of a direction's own
    computation (a coupling layer, a MAF scoring data) may also define
    ``_call_and_log_det(x) -> (y, log_det)`` and/or
    ``_inverse_and_log_det(y) -> (x, log_det)``, ``log_det`` being
    :math:`\log|\det \partial y / \partial x|`. The public calls then use
    it and hand the log-determinant over, once, to the next
    ``log_abs_det_jacobian(x, y)`` for exactly that pair, so that
    ``TransformedDistribution.log_prob`` runs the network once instead of
    twice. Such a transform need not write ``_call`` / ``_inverse`` /
    ``log_abs_det_jacobian``: this class derives them from the joint methods
    (a subclass that overrides ``log_abs_det_jacobian`` asks
    :meth:`_take_log_det` first). The hand-over is keyed like the
    cache (tensor identity and parameter versions) and used at most once, so
    it never returns a stale value, nor one whose graph a ``backward`` freed.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    _call_and_log_det = None
    _inverse_and_log_det = None
    #: The most ``(x, y)`` pairs the cache keeps, and the most numbers their inputs may hold
    #: in all (:class:`~pyro_nflows.transforms.cache.PairCache`); set them on a transform (or
    #: a subclass) to change them.
    max_cached_pairs = 128
    max_cached_elements = 2**22

    def __init__(self, *args, cache_size: int = 1, **kwargs):
        # Extra arguments go on along the MRO (see PermuteModule, which mixes
        # this class into Pyro's Permute).
        super().__init__(*args, cache_size=cache_size, **kwargs)
        self.__dict__["_pairs"] = PairCache()

    def _parameter_versions(self) -> tuple:
        """What the transform's outputs depend on besides its input: the
        version counters of its parameters (a module's own; a conditioned
        transform's are those of the conditional flow that made it, and the
        context's, see :func:`condition_on`)."""
        if isinstance(self, nn.Module):
            return parameter_versions(self)
        owner = self.__dict__.get("_owner")
        if owner is None:
            return ()
        return (*parameter_versions(owner), self.__dict__["_context"]._version)

    @property
    def sign(self):
        # torch's Transform.sign raises NotImplementedError, which hasattr()
        # does not catch (torch.jit.trace asks every attribute); a flow whose
        # sign is defined sets it as a class attribute.
        raise AttributeError(
            f"{type(self).__name__} has no sign: it is not increasing coordinate by coordinate"
        )

    # The trailing dimensions of an input that are not batch dimensions: 1 for
    # vectors (and for the element-wise flows, whose parameters have one entry
    # per coordinate), 3 for images.
    _event_dims = 1

    def _check(self, x: torch.Tensor, what: str) -> None:
        """The input's event (:meth:`_check_event`), its dtype against the
        parameters', and its batch shape against the context's: a
        ``ValueError`` naming both, not a shape or dtype error from deep inside torch."""
        who = type(self).__name__
        self._check_event(x, what)
        owner = self if isinstance(self, nn.Module) else self.__dict__.get("_owner")
        check_dtype(x, owner, who, what)
        context = self.__dict__.get("_context")
        if context is not None:
            batch = x.shape[: x.dim() - self._event_dims]
            try:
                torch.broadcast_shapes(batch, context.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"{who} was conditioned on a context of batch shape {tuple(context.shape[:-1])}, which does "
                    f"not broadcast against the {what}'s batch shape {tuple(batch)}"
                ) from None

    def _check_event(self, x: torch.Tensor, what: str) -> None:
        """``ValueError`` unless ``x`` is a tensor of vectors of size ``input_dim``."""
        check_event(x, self.input_dim, type(self).__name__, what)

    def cached_input(self, value: torch.Tensor, forward: bool) -> torch.Tensor | None:
        """What the cache answers for ``value``: the input of a kept call in the other
        direction that returned ``value`` (``forward=False``: the ``x`` of a ``value = t(x)``),
        or ``None`` (then the call computes)."""
        if not self._cache_size or compiling():
            return None
        return self.__dict__["_pairs"].input_of(value, forward, self._parameter_versions())

    def _cached(self, value: torch.Tensor, forward: bool) -> torch.Tensor:
        if compiling():  # no cache in a traced graph (see pyro_nflows.transforms.cache)
            return (self._call if forward else self._inverse)(value)
        versions, pairs = self._parameter_versions(), self.__dict__["_pairs"]
        if self._cache_size:
            hit = pairs.input_of(value, forward, versions)
            if hit is not None:
                return hit
        joint = self._call_and_log_det if forward else self._inverse_and_log_det
        if joint is None:
            result, log_det = (self._call if forward else self._inverse)(value), None
        else:
            result, log_det = joint(value)
        # Without a cache the last call is still kept, for its log-determinant's hand-over.
        bound = self.max_cached_pairs if self._cache_size else 1
        pairs.add(value, result, forward, log_det, versions, bound, self.max_cached_elements)
        return result

    def _take_log_det(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The log-determinant computed by a kept call that produced ``(x, y)``
        (the same tensors), if no parameter has changed since; once."""
        if compiling():
            return None
        return self.__dict__["_pairs"].take_log_det(x, y, self._parameter_versions())

    # A transform that defines _call_and_log_det (or _inverse_and_log_det)
    # gets the plain direction and log_abs_det_jacobian from it; others
    # (or those that override these) are untouched: the calls go on along
    # the MRO, e.g. to Pyro's Permute.

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self._call_and_log_det is None:
            return super()._call(x)
        return self._call_and_log_det(x)[0]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self._inverse_and_log_det is None:
            return super()._inverse(y)
        return self._inverse_and_log_det(y)[0]

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The log-determinant the call that made ``(x, y)`` handed over, else
        one forward pass of ``_call_and_log_det``."""
        log_det = self._take_log_det(x, y)
        if log_det is not None:
            return log_det
        if self._call_and_log_det is None:
            return super().log_abs_det_jacobian(x, y)
        return self._call_and_log_det(x)[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, "input")
        return self._cached(x, forward=True)

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, "output")
        return self._cached(y, forward=False)

    def with_cache(self, cache_size: int = 1) -> "FlowTransform":
        """Switch caching on (1) or off (0) in place and return ``self``.

        Unlike torch's default, which rebuilds the transform, this keeps the
        parameters (and so works for modules).
        """
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        self._cache_size = cache_size
        self.__dict__["_pairs"].clear()
        return self

    def __getstate__(self):
        # Copies and pickles start with an empty cache: the cached tensors are
        # part of an autograd graph (which deepcopy refuses) and of no use there,
        # and weak references cannot be copied.
        state = super().__getstate__()
        if self._cache_size:
            state["_cached_x_y"] = None, None
        state["_pairs"] = PairCache()
        return state

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"

    def __repr__(self) -> str:
        # In a TransformModule's MRO torch's Transform.__repr__ comes before
        # nn.Module's and prints the class name alone; show the options (and
        # a module's networks) instead.
        if isinstance(self, nn.Module):
            return nn.Module.__repr__(self)
        return f"{type(self).__name__}({self.extra_repr()})"


class ConditionalFlow(ConditionalTransformModule):
    """Base class of the package's conditional transforms.

    With ``param_shapes``, it owns a :class:`~pyro_nflows.nn.ContextNet`
    mapping a context to tensors of those shapes, and subclasses implement
    ``_condition(*params)``, returning the ``Conditioned<X>`` transform for
    those parameters (each a callable returning a tensor). Without (flows whose own network reads the context, such
    as a MADE), ``_condition(context)`` receives the context itself.
    ``condition(context)`` checks the context's width first, so a wrong one
    gets an error that names this flow.
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        param_shapes: Sequence[tuple[int, ...]] | None = None,
        hidden_dims: Sequence[int] | None = None,
    ):
        super().__init__()
        self.input_dim = check_input_dim(input_dim)
        self.context_dim = check_count("context_dim", context_dim)
        self._reads_context = param_shapes is None
        if not self._reads_context:
            if hidden_dims is None:
                hidden_dims = default_hidden_dims(input_dim, context_dim)
            self.net = ContextNet(context_dim, hidden_dims, param_shapes)

    def condition(self, context: torch.Tensor) -> FlowTransform:
        """The ``Conditioned<X>`` transform for ``context``, whose parameters
        are recomputed from it whenever they could be stale (see
        :class:`ContextParameters`)."""
        check_event(context, self.context_dim, type(self).__name__, "context")
        check_dtype(context, self, type(self).__name__, "context")
        if self._reads_context:
            transform = self._condition(context)
        else:
            transform = self._condition(*ContextParameters(self.net, context).parts(len(self.net.param_shapes)))
        return condition_on(transform, self, context)

    def _condition(self, *params: ParameterFn) -> FlowTransform:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, context_dim={self.context_dim}"
