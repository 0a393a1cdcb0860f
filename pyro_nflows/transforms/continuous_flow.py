r"""Continuous normalizing flows: the map of an ordinary differential equation
(Neural ODEs [1], FFJORD [2]).

.. math:: \frac{dx}{dt} = f(x(t), t), \qquad y = x(T) \text{ for } x(0) = x,

with :math:`f` the network :class:`~pyro_nflows.nn.ODENet` (or :math:`f(x, t, c)`
for a conditional flow). The map is a bijection for any Lipschitz :math:`f`:
its inverse integrates the same equation from :math:`T` back to :math:`0`.
By the instantaneous change of variables [1, theorem 1],

.. math:: \log\Bigl|\det \frac{\partial y}{\partial x}\Bigr|
          = \int_0^T \operatorname{tr} \frac{\partial f}{\partial x}(x(t), t)\, dt,

which is integrated *jointly* with :math:`x` in one solve (the state is
:math:`(x, a)` with :math:`da/dt = \operatorname{tr}\, \partial f/\partial x`):
one adaptive solve gives both :math:`y` and its log-determinant, and
``TransformedDistribution.log_prob`` gets it without a second solve (see
:class:`~pyro_nflows.transforms.base.FlowTransform`). The inverse integrates
:math:`(x, a)` backwards, from :math:`T` to :math:`0`, and returns
:math:`-a(0)`, the forward map's log-determinant (a density is scored as
:math:`\log p(y) = \log p_0(x) - \log|\det|`).

**The trace.** ``trace="exact"`` computes
:math:`\operatorname{tr}\,\partial f/\partial x` exactly. For the package's
network with at most two hidden layers (the default) it has a closed form
costing about one extra matrix-vector product per point, whatever :math:`D`
(:meth:`ODENet.velocity_and_trace <pyro_nflows.nn.ODENet.velocity_and_trace>`),
where a per-dimension autograd loop (or autograd batched over the basis
vectors, ``vmap`` of ``vjp``) costs :math:`D` backward passes. Deeper
networks push the :math:`D` columns of the Jacobian forward through the
layers together (batched matrix products: ``jacfwd`` under ``vmap`` written
out, so that ``torch.jit.trace``, which cannot trace ``torch.func``, still
works). ``trace="hutchinson"`` uses Hutchinson's estimator [2, 3],
:math:`\operatorname{tr} J \approx \varepsilon^\top J \varepsilon` with
:math:`E[\varepsilon \varepsilon^\top] = I`: one vector-Jacobian product (a
backward sweep through the layers) whatever the depth and :math:`D`. The
probe :math:`\varepsilon` (``probe="rademacher"``, entries :math:`\pm 1`, or
``"gaussian"``) is drawn once per solve, one per point, and kept along the
solve, so the estimate of the integral is unbiased [2] and the field the
solver sees stays smooth. It is for training deep dynamics in high
dimensions; for evaluation set ``flow.trace = "exact"`` or use
``with exact_trace(model): ...`` (:func:`exact_trace`).

**Cost of each direction.** The same in both: one adaptive solve of
:math:`D + 1` states (``dopri5``: six network evaluations per step, the
number of steps set by the tolerances and by how hard :math:`f` bends). Each
evaluation is one network pass plus the trace: about one more matrix-vector
product (closed form, at most two hidden layers), :math:`D` Jacobian columns
pushed forward (exact, deeper networks) or one backward sweep (Hutchinson).
Backpropagation goes through the solver's steps (exact gradients of the
computed map); ``adjoint=True`` instead solves the adjoint equation
backwards [1], with memory independent of the number of steps, at the cost
of a third solve (and of recomputing the context's share of the gates at
each evaluation, which it differentiates).

**Accuracy and failures.** The error control is per coordinate: each step
keeps the local error of every coordinate of :math:`x` and of the
log-determinant below ``atol + rtol * |value|`` (the max norm, where
torchdiffeq's default, a root mean square over the whole batch, would let
one point's error grow with the size of its batch), so a point's accuracy
does not depend on the rest of its batch; the last step ends exactly at
:math:`T`. Tolerances finer than the dtype can
resolve are raised to its floor, 10 machine epsilons (about ``1.2e-6`` in
float32, ``2.2e-15`` in float64): below it the solver's error estimate
measures rounding, not truncation, and the steps would shrink without end
(:meth:`ContinuousOptions.tolerances` says what a solve uses). A solve that
takes more than ``max_steps`` steps (the adjoint's backward solve too), whose
step size underflows or whose state turns non-finite raises
:class:`ODESolveError` with the time reached and the steps taken; a
non-finite input raises ``ValueError``.

**Regularisation** (``regularize=True``, Finlay et al. [4]): the solve also
integrates the kinetic energy :math:`\int_0^T \|f\|^2 dt` and the Jacobian's
Frobenius norm :math:`\int_0^T \|\partial f/\partial x\|_F^2 dt` (exactly
where the whole Jacobian is computed, otherwise estimated by
:math:`\|\varepsilon^\top \partial f/\partial x\|^2` with the solve's probe),
per point. The last solve's values are kept in ``last_regularization`` (a
:class:`Regularization`) of the transform that solved, and of the conditional
flow that made it, for a trainer to add to its loss, e.g.
``loss + 0.01 * (r.kinetic_energy + r.jacobian_norm).mean()``. They are not
part of the error control, so switching them on does not change the map.

References:

[1] Ricky T. Q. Chen, Yulia Rubanova, Jesse Bettencourt, David Duvenaud.
    Neural Ordinary Differential Equations. NeurIPS 2018. arXiv:1806.07366
[2] Will Grathwohl, Ricky T. Q. Chen, Jesse Bettencourt, Ilya Sutskever,
    David Duvenaud. FFJORD: Free-form Continuous Dynamics for Scalable
    Reversible Generative Models. ICLR 2019. arXiv:1810.01367
[3] Michael F. Hutchinson. A stochastic estimator of the trace of the
    influence matrix for Laplacian smoothing splines. Communications in
    Statistics - Simulation and Computation, 1990.
[4] Chris Finlay, Jörn-Henrik Jacobsen, Levon Nurbekyan, Adam M. Oberman.
    How to train your neural ODE: the world of Jacobian and kinetic
    regularization. ICML 2020. arXiv:2002.02798
[5] Patrick Kidger, Ricky T. Q. Chen, Terry Lyons. "Hey, that's not an ODE":
    Faster ODE Adjoints via Seminorms. ICML 2021. arXiv:2009.09457
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from pyro_nflows.nn.ode import ODENet
from pyro_nflows.nn.widths import default_hidden_dims
from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform
from pyro_nflows.validation import check_bool, check_choice, check_count, check_finite, check_positive

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_STEP_SOLVERS",
    "PROBES",
    "TRACES",
    "ConditionalContinuous",
    "ConditionedContinuous",
    "Continuous",
    "ContinuousOptions",
    "ODESolveError",
    "Regularization",
    "SolveStats",
    "conditional_continuous",
    "continuous",
    "exact_trace",
]

ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STEP_SOLVERS = ("rk4", "midpoint", "euler")
TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")

# Tolerances below this many machine epsilons of the solve's dtype are raised to it.
TOLERANCE_FLOOR_EPS = 10


class ODESolveError(ArithmeticError):
    """An ODE solve failed: its step budget ran out, its step size underflowed
    or its state turned non-finite.

    :attr:`time_reached` is the time of the last accepted step (the start
    time if none was accepted), :attr:`steps` the steps attempted.
    """

    def __init__(self, message: str, time_reached: float, steps: int):
        super().__init__(message)
        self.time_reached = time_reached
        self.steps = steps


class Regularization(NamedTuple):
    r"""The regularisers of Finlay et al. along the last solve, one value per
    point (the batch shape): ``kinetic_energy`` :math:`\int_0^T \|f\|^2 dt`
    and ``jacobian_norm`` :math:`\int_0^T \|\partial f/\partial x\|_F^2 dt`."""

    kinetic_energy: torch.Tensor
    jacobian_norm: torch.Tensor


class SolveStats(NamedTuple):
    """What the last solve took: steps attempted and accepted, network evaluations."""

    steps: int
    accepted: int
    evaluations: int


# How each setting of ContinuousOptions is checked, given (name, value); each raises ValueError.
_OPTION_CHECKS = {
    "trace": lambda name, value: check_choice(name, value, TRACES),
    "probe": lambda name, value: check_choice(name, value, PROBES),
    "solver": lambda name, value: check_choice(name, value, ADAPTIVE_SOLVERS + FIXED_STEP_SOLVERS),
    "atol": check_positive,
    "rtol": check_positive,
    "time": check_positive,
    "adjoint": check_bool,
    "max_steps": check_count,
    "step_size": lambda name, value: None if value is None else check_positive(name, value),
    "regularize": check_bool,
}


class ContinuousOptions:
    r"""The settings of a continuous flow, validated on every assignment.

    A :class:`ConditionalContinuous` shares one with every transform its
    ``condition`` returns, so that changing a setting on the module (say
    ``flow.trace = "exact"``) reaches them all.

    :param trace: ``"exact"`` (default: exact log-determinants, which the
        default network gives in about one extra pass per evaluation) or
        ``"hutchinson"`` (one vector-Jacobian product, for deep dynamics in
        high dimensions).
    :param probe: Hutchinson's probe, ``"rademacher"`` (default: for the same
        cost its variance lacks the diagonal terms of the Gaussian's) or ``"gaussian"``.
    :param solver: one of :data:`ADAPTIVE_SOLVERS` or :data:`FIXED_STEP_SOLVERS`;
        default ``"dopri5"``, the 5th-order adaptive Dormand-Prince method with
        an embedded error estimate and six evaluations per step (FFJORD's).
    :param atol: absolute tolerance per coordinate and step; default ``1e-5``,
        FFJORD's, about 100 float32 epsilons.
    :param rtol: relative tolerance; default ``1e-5``, as ``atol``.
    :param time: the end time :math:`T`; default ``1.0`` (any :math:`T` can be
        absorbed into the scale of :math:`f`; 1 is the convention).
    :param adjoint: backpropagate by the adjoint method (memory independent of
        the number of steps) instead of through the steps; default ``False``:
        direct backpropagation is exact for the computed map and, at these
        sizes, faster. The adjoint solve ignores the parameters' adjoints in its
        error control (seminorms [5]).
    :param max_steps: the most steps one solve may take (an adaptive solver's
        rejected steps count); default ``1000``, far beyond what a smooth flow
        needs and small enough that a stiff solve fails in seconds, not hours.
    :param step_size: the step of a fixed-step solver (required for them;
        refused for the adaptive ones).
    :param regularize: also integrate Finlay et al.'s regularisers (see
        :mod:`~pyro_nflows.transforms.continuous_flow`); default ``False``.
    """

    _FIELDS = ("trace", "probe", "solver", "atol", "rtol", "time", "adjoint", "max_steps", "step_size", "regularize")

    def __init__(
        self,
        trace: str = "exact",
        probe: str = "rademacher",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        time: float = 1.0,
        adjoint: bool = False,
        max_steps: int = 1000,
        step_size: float | None = None,
        regularize: bool = False,
    ):
        values = dict(locals())
        for name in self._FIELDS:
            setattr(self, name, values[name])
        self.check_step_size()

    def __setattr__(self, name: str, value) -> None:
        if name not in _OPTION_CHECKS:
            raise AttributeError(f"ContinuousOptions has no setting {name!r}; the settings are {self._FIELDS}")
        object.__setattr__(self, name, _OPTION_CHECKS[name](name, value))

    def check_step_size(self) -> None:
        """Raise ``ValueError`` unless a fixed-step solver has a ``step_size`` and an adaptive one has none."""
        fixed = self.solver in FIXED_STEP_SOLVERS
        if fixed and self.step_size is None:
            raise ValueError(f"the fixed-step solver {self.solver!r} needs a step_size (e.g. step_size=0.1)")
        if not fixed and self.step_size is not None:
            raise ValueError(
                f"step_size={self.step_size} is for the fixed-step solvers {FIXED_STEP_SOLVERS}; the adaptive "
                f"solver {self.solver!r} chooses its own steps from atol and rtol: drop step_size"
            )

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(atol, rtol)`` as a solve in ``dtype`` uses them: each at least 10 machine epsilons."""
        floor = TOLERANCE_FLOOR_EPS * torch.finfo(dtype).eps
        return max(self.atol, floor), max(self.rtol, floor)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._FIELDS}

    def __repr__(self) -> str:
        return "ContinuousOptions(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


def _draw_probe(like: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn_like(like)
    return torch.randint_like(like, 0, 2).mul_(2).sub_(1)


class _Dynamics:
    """The augmented field (f, trace[, |f|^2, |eps^T J|^2]) on flat states
    ``(N, W)``, with the step counters and the budget the solver's callbacks keep."""

    def __init__(self, net: ODENet, context, options: ContinuousOptions, input_dim, probe, sign, start):
        self.net, self.context, self.input_dim, self.probe = net, context, input_dim, probe
        # The adjoint differentiates each evaluation with respect to the network's parameters and the
        # context: there the evaluations prepare their own tensors (a tensor prepared once, outside, would
        # be reached both directly and through its graph, and its gradient counted twice).
        self.adjoint = options.adjoint and torch.is_grad_enabled()
        self.prepared = None if self.adjoint else net.prepare(context)
        self.regularize = options.regularize
        self.max_steps = options.max_steps
        if options.trace == "hutchinson":
            self.mode = "hutchinson"
        else:
            self.mode = "closed" if net.has_closed_form_trace else "jacobian"
        self.sign, self.start, self.end = sign, start, options.time - start
        self.steps = self.accepted = self.evaluations = self.adjoint_steps = 0
        self._start_callbacks(options.solver in FIXED_STEP_SOLVERS)

    def __call__(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        net = self.net
        prepared = net.prepare(self.context) if self.adjoint else self.prepared
        x = state[..., : self.input_dim]
        jacobian = probe_jacobian = None
        if self.mode == "closed":
            velocity, trace = net.velocity_and_trace(t, x, prepared)
        elif self.mode == "jacobian":
            velocity, jacobian = net.velocity_and_jacobian(t, x, prepared)
            trace = torch.diagonal(jacobian, dim1=-2, dim2=-1).sum(-1)
        else:
            velocity, probe_jacobian = net.velocity_and_vjp(t, x, prepared, self.probe)
            trace = torch.linalg.vecdot(probe_jacobian, self.probe)
        if not self.regularize:
            return torch.cat([velocity, trace.unsqueeze(-1)], -1)
        if jacobian is not None:
            frobenius = jacobian.square().sum((-2, -1))
        else:
            if probe_jacobian is None:
                probe_jacobian = net.velocity_and_vjp(t, x, prepared, self.probe)[1]
            frobenius = probe_jacobian.square().sum(-1)
        kinetic = velocity.square().sum(-1)
        return torch.cat([velocity, trace.unsqueeze(-1), kinetic.unsqueeze(-1), frobenius.unsqueeze(-1)], -1)

    def error_norm(self, scaled_error: torch.Tensor) -> torch.Tensor:
        """The max norm over the coordinates of x and the log-determinant (not the regularisers)."""
        return scaled_error[..., : self.input_dim + 1].abs().max()

    # The solver's callbacks: count the steps, enforce the budget, remember how far the solve got. An
    # adaptive solver reports its accepted steps; on a fixed grid every step is taken, and the state at
    # the start of each is checked (an adaptive solver checks it itself).

    def _start_callbacks(self, fixed: bool) -> None:
        self.fixed = fixed
        self.reached = self.adjoint_reached = None
        if not fixed:
            self.callback_accept_step = self._accept
            self.callback_accept_step_adjoint = self._accept_adjoint

    def callback_step(self, t0, y0, dt) -> None:
        if self.steps >= self.max_steps:
            raise self.failure(f"exceeded its budget of max_steps={self.max_steps} steps")
        if self.fixed:
            if not bool(torch.isfinite(y0[..., : self.input_dim + 1]).all()):
                raise self.failure("produced non-finite values (inf or NaN)")
            self.reached, self.accepted = t0, self.steps
        self.steps += 1

    def _accept(self, t0, y0, dt) -> None:
        self.accepted += 1
        self.reached = t0 + self.sign * dt

    def callback_step_adjoint(self, t0, y0, dt) -> None:
        if self.adjoint_steps >= self.max_steps:
            reached = self.end if self.adjoint_reached is None else self.adjoint_reached
            raise ODESolveError(
                f"the adjoint ODE solve (the backward pass of adjoint=True) exceeded its budget of max_steps="
                f"{self.max_steps} steps: it reached t={reached:.6g} (integrating back from t={self.end:g}) after "
                f"{self.adjoint_steps} steps. Loosen atol/rtol, raise max_steps, or use adjoint=False",
                reached,
                self.adjoint_steps,
            )
        self.adjoint_steps += 1

    def _accept_adjoint(self, t0, y0, dt) -> None:
        # The adjoint solver sees the forward solve's increasing time (negated for an inverse) and runs back;
        # its last step may overshoot the start (it interpolates there).
        reached = float((self.sign * (t0 - dt)).detach())
        self.adjoint_reached = min(max(reached, min(self.start, self.end)), max(self.start, self.end))

    def time_reached(self) -> float:
        return self.start if self.reached is None else float(torch.as_tensor(self.reached).detach())

    def failure(self, reason: str) -> ODESolveError:
        reached = self.time_reached()
        return ODESolveError(
            f"the ODE solve {reason}: it reached t={reached:.6g} (integrating from t={self.start:g} to "
            f"t={self.end:g}) after {self.steps} steps ({self.accepted} accepted, {self.evaluations} evaluations). "
            "The dynamics are stiff or diverge there, or the network's parameters are not finite: loosen "
            "atol/rtol, raise max_steps, or regularise the flow (regularize=True, adding its last_regularization "
            "to the loss)",
            reached,
            self.steps,
        )


def _flat_batch(value: torch.Tensor, context: torch.Tensor | None):
    """``value`` and ``context`` broadcast to one batch shape and flattened to rows."""
    batch = value.shape[:-1]
    if context is not None:
        batch = torch.broadcast_shapes(batch, context.shape[:-1])
        context = context.expand(batch + context.shape[-1:]).reshape(-1, context.shape[-1])
    return batch, value.expand(batch + value.shape[-1:]).reshape(-1, value.shape[-1]), context


class _Settings:
    """The settings of a continuous flow as attributes (``flow.trace = "exact"``
    sets its :class:`ContinuousOptions`, shared with the transforms a conditional
    flow makes), and what every continuous flow keeps of its last solve."""

    def __getattr__(self, name: str):
        options = self.__dict__.get("options")
        if options is not None and name in ContinuousOptions._FIELDS:
            return getattr(options, name)
        parent = getattr(super(), "__getattr__", None)
        if parent is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return parent(name)

    def __setattr__(self, name: str, value) -> None:
        if name in ContinuousOptions._FIELDS:
            setattr(self.options, name, value)
        else:
            super().__setattr__(name, value)

    def exact_trace(self) -> contextlib.AbstractContextManager:
        """A context in which this flow (and the transforms it conditions) uses the exact trace
        (see :func:`exact_trace`)."""
        return exact_trace(self)

    def __getstate__(self) -> dict:
        # The kept regularisers belong to an autograd graph (which deepcopy refuses).
        return {**super().__getstate__(), "last_regularization": None}


class ConditionedContinuous(_Settings, FlowTransform):
    r"""The map of :math:`dx/dt = f(x, t)` (or :math:`f(x, t, c)` for a given
    context :math:`c`) from :math:`t = 0` to :math:`T`, with its
    log-determinant :math:`\int_0^T \operatorname{tr}\,\partial f/\partial x\,dt`
    from the same solve; the inverse integrates back from :math:`T` to 0 (see
    :mod:`pyro_nflows.transforms.continuous_flow` for the maths and costs).

    :param net: the :class:`~pyro_nflows.nn.ODENet` giving :math:`f`.
    :param context: the context the network reads, if it takes one; its batch
        shape broadcasts against the inputs'.
    :param options: a :class:`ContinuousOptions` (default: its defaults).

    The settings are reachable as attributes (``trace``, ``atol``, ...), which
    set the shared options.

    .. attribute:: last_regularization

        The :class:`Regularization` of the last solve (with ``regularize=True``;
        ``None`` before one).

    .. attribute:: last_solve

        The :class:`SolveStats` of the last solve (``None`` before one): a
        diagnostic for benchmarks, nothing depends on it.
    """

    def __init__(
        self,
        net: ODENet,
        context: torch.Tensor | None = None,
        options: ContinuousOptions | None = None,
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        self.input_dim = net.input_dim
        self.net = net
        self.context = context
        self.__dict__.update(options=options or ContinuousOptions(), last_regularization=None, last_solve=None)

    def _call_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._solve(x, forward=True)

    def _inverse_and_log_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._solve(y, forward=False)

    def _solve(self, value: torch.Tensor, forward: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``(x, log-det[, regularisers])`` from 0 to T (``forward``) or from T to 0."""
        who = f"{type(self).__name__} ({'forward' if forward else 'inverse'})"
        check_finite(value, who)
        options = self.options
        options.check_step_size()
        batch, points, context = _flat_batch(value, self.context)
        dim, count = self.input_dim, points.shape[0]
        extra = 3 if options.regularize else 1
        if count == 0:
            result, log_det = points.reshape(batch + (dim,)), points.new_zeros(batch)
            self._record(None, None, batch)
            return result, log_det
        probe = None
        if options.trace == "hutchinson" or options.regularize:
            probe = _draw_probe(points, options.probe)
        start, end = (0.0, options.time) if forward else (options.time, 0.0)
        dynamics = _Dynamics(self.net, context, options, dim, probe, 1.0 if forward else -1.0, start)
        state = torch.cat([points, points.new_zeros(count, extra)], -1)
        final = _integrate(dynamics, state, start, end, options)
        if not bool(torch.isfinite(final[:, :dim + 1]).all()):
            raise dynamics.failure("produced non-finite values (inf or NaN)")
        sign = 1.0 if forward else -1.0
        result = final[:, :dim].reshape(batch + (dim,))
        log_det = (sign * final[:, dim]).reshape(batch)
        self._record(final[:, dim + 1:] * sign if options.regularize else None, dynamics, batch)
        return result, log_det

    def _record(self, regularizers, dynamics, batch) -> None:
        """Keep the last solve's regularisers and counts here and on the conditional flow that made this one."""
        regularization = None
        if regularizers is not None:
            regularization = Regularization(regularizers[:, 0].reshape(batch), regularizers[:, 1].reshape(batch))
        stats = None if dynamics is None else SolveStats(dynamics.steps, dynamics.accepted, dynamics.evaluations)
        for holder in (self, self.__dict__.get("_owner")):
            if holder is not None:
                holder.__dict__.update(last_solve=stats)
                if self.options.regularize:
                    holder.__dict__.update(last_regularization=regularization)

    def extra_repr(self) -> str:
        context = "" if self.net.context_dim == 0 else f", context_dim={self.net.context_dim}"
        return f"input_dim={self.input_dim}{context}, trace={self.options.trace!r}, solver={self.options.solver!r}"


def _integrate(dynamics: _Dynamics, state, start, end, options: ContinuousOptions) -> torch.Tensor:
    """One solve of ``dynamics`` from ``start`` to ``end``; torchdiffeq's failures become :class:`ODESolveError`."""
    times = torch.tensor([start, end], dtype=state.dtype, device=state.device)
    atol, rtol = options.tolerances(state.dtype)
    if options.solver in FIXED_STEP_SOLVERS:
        solver_options = {"step_size": options.step_size}
    else:
        # step_t: the last step ends exactly at `end` (no interpolation of the result).
        solver_options = {"norm": dynamics.error_norm, "step_t": times[1:]}
    kwargs = dict(rtol=rtol, atol=atol, method=options.solver, options=solver_options)
    try:
        if dynamics.adjoint:
            params = [p for p in dynamics.net.parameters() if p.requires_grad]
            if dynamics.context is not None and dynamics.context.requires_grad:
                params.append(dynamics.context)
            adjoint_options = {"norm": "seminorm"}
            if options.solver in FIXED_STEP_SOLVERS:
                adjoint_options["step_size"] = options.step_size
            solution = odeint_adjoint(
                dynamics, state, times, adjoint_params=tuple(params), adjoint_options=adjoint_options, **kwargs
            )
        else:
            solution = odeint(dynamics, state, times, **kwargs)
    except AssertionError as error:  # torchdiffeq's own checks: step-size underflow, non-finite state
        raise dynamics.failure(f"failed ({error})") from None
    if dynamics.fixed:
        dynamics.accepted = dynamics.steps
    return solution[-1]


class Continuous(ConditionedContinuous, TransformModule):
    r"""A learnable continuous normalizing flow (FFJORD [2]): the map of
    :math:`dx/dt = f(x, t)` from 0 to :math:`T`, :math:`f` an
    :class:`~pyro_nflows.nn.ODENet` it owns, log-determinant from the same
    solve (exact by default), inverse by integrating backwards.

    :param input_dim: the event size :math:`D`.
    :param hidden_dims: the network's hidden widths; default two layers of
        :func:`~pyro_nflows.nn.default_hidden_dims` ``(D, network="ode")``.

    The keyword-only ``trace``, ``probe``, ``solver``, ``atol``, ``rtol``,
    ``time``, ``adjoint``, ``max_steps``, ``step_size`` and ``regularize``
    are the settings of :class:`ContinuousOptions` (each default's reason is
    given there); they stay settable as attributes (``flow.trace = "exact"``).

    Example::

        >>> import pyro.distributions as dist
        >>> flow = Continuous(2, hidden_dims=(16, 16))
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> model = dist.TransformedDistribution(base, [flow])
        >>> model.log_prob(torch.randn(5, 2)).shape  # one backward solve gives x and log|det|
        torch.Size([5])
        >>> x = torch.randn(4, 2)
        >>> bool((flow.inv(flow._call(x)) - x).abs().max() < 1e-4)
        True

    Reference: [2] in :mod:`pyro_nflows.transforms.continuous_flow` (arXiv:1810.01367).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        *,
        trace: str = "exact",
        probe: str = "rademacher",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        time: float = 1.0,
        adjoint: bool = False,
        max_steps: int = 1000,
        step_size: float | None = None,
        regularize: bool = False,
        cache_size: int = 1,
    ):
        if hidden_dims is None:
            hidden_dims = default_hidden_dims(input_dim, network="ode")
        options = ContinuousOptions(
            trace=trace, probe=probe, solver=solver, atol=atol, rtol=rtol, time=time, adjoint=adjoint,
            max_steps=max_steps, step_size=step_size, regularize=regularize,
        )
        super().__init__(ODENet(input_dim, hidden_dims), None, options, cache_size=cache_size)


class ConditionalContinuous(_Settings, ConditionalFlow):
    r"""A continuous flow whose velocity field reads a context,
    :math:`dx/dt = f(x, t, c)` (the context gates and shifts every hidden
    layer, see :mod:`pyro_nflows.nn.ode`): an amortized posterior, as FFJORD's
    VAE [2]. ``condition(c)`` returns a :class:`ConditionedContinuous` sharing
    this flow's network and options; contexts of batch shape ``c.shape[:-1]``
    broadcast against the inputs'.

    :param input_dim: the event size :math:`D`.
    :param context_dim: the context's width :math:`C`.
    :param hidden_dims: default two layers of :func:`~pyro_nflows.nn.default_hidden_dims` ``(D, C, "ode")``.

    The keyword-only settings are those of :class:`Continuous` (see
    :class:`ContinuousOptions`).

    ``last_regularization`` and ``last_solve`` hold those of the last solve of
    any transform it conditioned.

    Example::

        >>> flow = ConditionalContinuous(2, 3, hidden_dims=(8, 8))
        >>> flow.condition(torch.randn(5, 3))(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        *,
        trace: str = "exact",
        probe: str = "rademacher",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        time: float = 1.0,
        adjoint: bool = False,
        max_steps: int = 1000,
        step_size: float | None = None,
        regularize: bool = False,
    ):
        options = ContinuousOptions(
            trace=trace, probe=probe, solver=solver, atol=atol, rtol=rtol, time=time, adjoint=adjoint,
            max_steps=max_steps, step_size=step_size, regularize=regularize,
        )
        super().__init__(input_dim, context_dim)
        if hidden_dims is None:
            hidden_dims = default_hidden_dims(input_dim, context_dim, network="ode")
        self.net = ODENet(input_dim, hidden_dims, context_dim=context_dim)
        self.__dict__.update(options=options, last_regularization=None, last_solve=None)

    def _condition(self, context: torch.Tensor) -> ConditionedContinuous:
        return ConditionedContinuous(self.net, context, self.options)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, trace={self.options.trace!r}, solver={self.options.solver!r}"


def _options_in(objects) -> list[ContinuousOptions]:
    """The distinct :class:`ContinuousOptions` of the continuous flows in ``objects``
    (flows, modules holding them anywhere, or sequences of either)."""
    found, stack = {}, list(objects)
    while stack:
        item = stack.pop()
        options = item.__dict__.get("options") if hasattr(item, "__dict__") else None
        if isinstance(options, ContinuousOptions):
            found[id(options)] = options
        if isinstance(item, nn.Module):
            stack.extend(module for module in item.modules() if module is not item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "parts"):  # a ComposeTransform
            stack.extend(item.parts)
    return list(found.values())


@contextlib.contextmanager
def exact_trace(*flows) -> Iterator[None]:
    """Within the block, every continuous flow in ``flows`` (flows, modules
    that hold them, e.g. a density model or a guide, or lists of transforms)
    uses ``trace="exact"``; the previous settings come back after it.

    >>> flow = Continuous(2, hidden_dims=(8, 8), trace="hutchinson")
    >>> with exact_trace(flow):
    ...     flow.trace
    'exact'
    >>> flow.trace
    'hutchinson'
    """
    options = _options_in(flows)
    previous = [o.trace for o in options]
    for o in options:
        o.trace = "exact"
    try:
        yield
    finally:
        for o, trace in zip(options, previous):
            o.trace = trace


def continuous(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    trace: str = "exact",
    probe: str = "rademacher",
    solver: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    time: float = 1.0,
    adjoint: bool = False,
    max_steps: int = 1000,
    step_size: float | None = None,
    regularize: bool = False,
) -> Continuous:
    """A learnable continuous normalizing flow on vectors of size ``input_dim``
    (see :class:`Continuous`; the keyword-only options are those of
    :class:`ContinuousOptions`, with their defaults' reasons)."""
    return Continuous(
        input_dim,
        hidden_dims,
        trace=trace, probe=probe, solver=solver, atol=atol, rtol=rtol, time=time, adjoint=adjoint,
        max_steps=max_steps, step_size=step_size, regularize=regularize,
    )


def conditional_continuous(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    trace: str = "exact",
    probe: str = "rademacher",
    solver: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    time: float = 1.0,
    adjoint: bool = False,
    max_steps: int = 1000,
    step_size: float | None = None,
    regularize: bool = False,
) -> ConditionalContinuous:
    """A continuous flow whose velocity field reads a context of width
    ``context_dim`` (see :class:`ConditionalContinuous`; the options are those
    of :class:`ContinuousOptions`)."""
    return ConditionalContinuous(
        input_dim,
        context_dim,
        hidden_dims,
        trace=trace, probe=probe, solver=solver, atol=atol, rtol=rtol, time=time, adjoint=adjoint,
        max_steps=max_steps, step_size=step_size, regularize=regularize,
    )
