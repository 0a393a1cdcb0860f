r"""Invertible residual flows: :math:`y = x + g(x)` with a contractive :math:`g`
(i-ResNet, Behrmann et al. [1]; Residual Flows, Chen et al. [2]).

:math:`g` is a :class:`~pyro_nflows.nn.LipschitzMLP`: every linear layer has spectral norm
at most :math:`c` = ``lipschitz`` (induced spectral normalisation) and the LipSwish
activation is 1-Lipschitz, so :math:`\operatorname{Lip}(g) \le q = c^K < 1` with :math:`K`
linear layers. Then :math:`x \mapsto x + g(x)` is a bijection of :math:`\mathbb{R}^D`
(Banach's fixed-point theorem), and :math:`\det(I + J_g) > 0` since every eigenvalue of
:math:`J_g` has modulus below 1. The conditional flow feeds a context into :math:`g`
(shifting every layer's pre-activations), which leaves the bound in :math:`x` intact.

**Direction.** The block is one network pass; solving it takes several. ``direction="iaf"``
(the default) makes the block the forward map, noise to data, so that sampling, and scoring
one's own samples as guides and VAE posteriors do, is one pass; ``direction="maf"`` makes it
the inverse, data to noise, so that scoring data is one pass, as a density model trains (the
form of Residual Flows' density models [2]; ``fit`` uses it). Below, the block is
:math:`y = x + g(x)` whichever way it points.

**Inverse.** :math:`x^*` is the fixed point of :math:`T(x) = y - g(x)`, a contraction with
constant :math:`q`. From :math:`x_0 = y`, :math:`x_{k+1} = y - g(x_k)` (one network pass
each), and the error obeys

.. math:: |x_k - x^*| \le \frac{q}{1-q} |x_k - x_{k-1}| \le \frac{q^k}{1-q} |x_1 - x_0|,

the step :math:`|x_k - x_{k-1}| = |x_{k-1} + g(x_{k-1}) - y|` being the residual of the
equation. A point stops once the first bound is below ``tolerance`` :math:`\cdot (1 + |y|)`
(Euclidean norms, per point). The default tolerance is :math:`s\, q/(1-q)` with
:math:`s = 10^{-13}` in float64 and ten machine epsilons otherwise (float32: about
:math:`1.2 \cdot 10^{-6}`): the iteration stops once the residual is below
:math:`s (1 + |y|)`, several hundred times float64's rounding of one step and ten times
float32's, so rounding noise cannot keep it from stopping, while the error stays far
below what a float64 round trip asks (:math:`10^{-8}`). The second bound says how many
steps that takes at most, :math:`k^* = 1 + \lceil \log(r_1 / r_\text{stop}) / \log(1/q) \rceil`
from the first residual :math:`r_1`; ``max_iterations=None`` allows :math:`2k^* + 10` (slack for
rounding, and for the power iteration's lag in training mode, where the weights' norms are
estimates). A point that has not stopped within the budget raises
:class:`~pyro_nflows.transforms.roots.InverseNotConverged` with the residual reached;
non-finite input raises ``ValueError``: never a silent answer. Cost: :math:`k` passes of
:math:`g` (converged points drop out of the batch once they are a quarter of those still
iterated), then, with autograd on, one more (below).

**Gradients through the inverse** (``log_prob`` of data). The iteration runs without
autograd; the result is one more step :math:`x = y - g(x^*)` with autograd on. Its
backward alone would give :math:`\partial x / \partial y = I`, not the implicit-function
derivative :math:`(I + J)^{-1}`, so a hook on :math:`x` first maps the incoming gradient
:math:`v` to :math:`w = (I + J)^{-\top} v`: with ``logdet="exact"`` (small :math:`D`) by a
direct solve with the Jacobian at :math:`x^*` (one pass carrying the Jacobian, then a
:math:`D \times D` solve per point), otherwise as the fixed point of
:math:`w \mapsto v - J^\top w` (the same contraction: one vector-Jacobian product per
step, the same stopping rule relative to :math:`|v|`). The step's backward then gives
:math:`\partial L/\partial y = w` and :math:`\partial L/\partial\theta = -(\partial g/\partial\theta)^\top w`,
the exact implicit-function gradients with respect to :math:`y`, the parameters and the
context. (Second derivatives through the inverse are not supported.)

**Log-determinant**, ``logdet=``:

- ``"exact"``: :math:`\log\det(I + J_g(x))` from the Jacobian (``torch.func.jacrev``
  batched by ``vmap``, or under ``torch.jit.trace``, which cannot trace those, one pass
  carrying the Jacobian) and ``slogdet``. Cost: about :math:`D` network passes and a
  :math:`D \times D` determinant per point; for small :math:`D`, and for evaluation.
- ``"series"`` (i-ResNet [1]): the power series truncated after :math:`n` =
  ``count_terms`` terms, with Hutchinson's trace estimator [3],

  .. math:: \log\det(I + J) = \sum_{k \ge 1} \frac{(-1)^{k+1}}{k} \operatorname{tr}(J^k)
            \approx \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k}\, v^\top J^k v,

  one probe :math:`v` per point (``probe``: Rademacher or Gaussian), :math:`v^\top J^k`
  by :math:`n` vector-Jacobian products, backpropagated through. Biased: the tail it drops
  is at most :math:`D q^{n+1} / ((n+1)(1-q))` in magnitude. Cost: :math:`n` products, and
  the memory of :math:`n` graphs.
- ``"roulette"`` (Residual Flows [2]): unbiased. The number of terms is random,
  :math:`N = m + G` with :math:`m` = ``count_exact_terms`` always computed and
  :math:`G \sim \operatorname{Geometric}(p)` (``roulette_p``, :math:`P(G \ge j) = (1-p)^j`),
  one :math:`N` per call, and each term is divided by the probability of reaching it:

  .. math:: \widehat{\log\det} = \sum_{k=1}^{N} \frac{(-1)^{k+1}}{k}\,
            \frac{v^\top J^k v}{P(N \ge k)}, \qquad
            E_{N,v}\bigl[\widehat{\log\det}\bigr] = \log\det(I + J).

  Its gradient is the Neumann-series estimator of [2],
  :math:`\partial \log\det(I+J) = \operatorname{tr}((I+J)^{-1}\partial J)
  \approx \bigl(\sum_{k=0}^{N} (-1)^k v^\top J^k / P(N \ge k)\bigr)\, \partial J\, v`,
  unbiased too: the vector in parentheses is accumulated without a graph alongside the
  estimate, and one more vector-Jacobian product with a graph carries the gradient
  (memory-efficient backpropagation: the memory of one graph whatever :math:`N`). Cost:
  :math:`N + 1` products, :math:`E[N] = m + (1-p)/p`. The default
  :math:`p = 1 - q` keeps the variance finite: as :math:`|v^\top J^k v| \le |v|^2 q^k`,
  the :math:`k`-th term's second moment is at most of order
  :math:`q^{2k} / (1-p)^k = q^k` (for Residual Flows' :math:`p = 1/2` that bound
  guarantees a finite variance only where :math:`q^2 < 1/2`).

References:

[1] Jens Behrmann, Will Grathwohl, Ricky T. Q. Chen, David Duvenaud, Jörn-Henrik
    Jacobsen. Invertible Residual Networks. ICML 2019. arXiv:1811.00995
[2] Ricky T. Q. Chen, Jens Behrmann, David Duvenaud, Jörn-Henrik Jacobsen. Residual
    Flows for Invertible Generative Modeling. NeurIPS 2019. arXiv:1906.02735
[3] Michael F. Hutchinson. A Stochastic Estimator of the Trace of the Influence Matrix
    for Laplacian Smoothing Splines. Communications in Statistics - Simulation and
    Computation 18(3), 1989.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch.func import jacrev, vmap

from pyro_nflows.nn.lipschitz import LipschitzFunction, LipschitzMLP
from pyro_nflows.nn.widths import default_hidden_dims
from pyro_nflows.transforms.base import ConditionalFlow, FlowTransform
from pyro_nflows.transforms.roots import InverseNotConverged
from pyro_nflows.validation import (
    check_choice,
    check_count,
    check_finite,
    check_input_dim,
    check_positive,
    check_unit_interval,
)

__all__ = [
    "ConditionalResidual",
    "ConditionedResidual",
    "Residual",
    "conditional_residual",
    "residual",
]

LOG_DETS = ("exact", "series", "roulette")
DIRECTIONS = ("iaf", "maf")
PROBES = ("rademacher", "gaussian")
LIPSCHITZ_HINT = "y = x + g(x) is invertible only for a contraction g (0.9 is the default; Residual Flows use 0.98)"


def _options(
    logdet: str,
    count_terms: int,
    count_exact_terms: int,
    roulette_p: float | None,
    probe: str,
    tolerance: float | None,
    max_iterations: int | None,
    direction: str,
) -> dict:
    """The options of a residual flow, checked (one place for the three classes)."""
    return dict(
        direction=check_choice("direction", direction, DIRECTIONS),
        logdet=check_choice("logdet", logdet, LOG_DETS),
        count_terms=check_count("count_terms", count_terms),
        count_exact_terms=check_count("count_exact_terms", count_exact_terms, minimum=0),
        roulette_p=None if roulette_p is None else check_unit_interval("roulette_p", roulette_p),
        probe=check_choice("probe", probe, PROBES),
        tolerance=None if tolerance is None else check_positive("tolerance", tolerance),
        max_iterations=None if max_iterations is None else check_count("max_iterations", max_iterations),
    )


def _default_step(dtype: torch.dtype) -> float:
    """The residual, relative to 1 + |y|, at which the default tolerance stops."""
    return 1e-13 if dtype == torch.float64 else 10 * torch.finfo(dtype).eps


def _iteration_budget(residual: torch.Tensor, limit: torch.Tensor, q: float) -> int:
    """``2 k* + 10``, ``k*`` the count after which the contraction bound guarantees every
    residual is below its limit, from the first residuals."""
    ratio = torch.where(residual > limit, residual / limit, torch.ones_like(residual))
    worst = float(ratio.max()) if ratio.numel() else 1.0
    needed = 1 + math.ceil(math.log(worst) / math.log(1 / q)) if worst > 1 else 1
    return 2 * needed + 10


def _check_first_step(residual: torch.Tensor, who: str) -> None:
    """``ValueError`` if the first step is not finite: the input is, so g is not."""
    finite = torch.isfinite(residual)
    if not bool(finite.all()):
        raise ValueError(
            f"{who}: the network g gave non-finite values at {int((~finite).sum())} of {finite.numel()} points; "
            "its parameters or power-iteration buffers hold NaN or inf (a diverged training step?)"
        )


class ConditionedResidual(FlowTransform):
    r"""A residual flow :math:`y = x + g(x, \text{context})` with a given Lipschitz network.

    :param net: the :class:`~pyro_nflows.nn.LipschitzMLP` :math:`g` (output size = input
        size, per-layer bound ``net.lipschitz`` in :math:`(0, 1)`).
    :param context: the context :math:`g` reads, if it takes one; its batch shape broadcasts
        against ``x``'s.
    :param logdet: ``"exact"``, ``"series"`` or ``"roulette"`` (see
        :mod:`pyro_nflows.transforms.residual_flow`).
    :param count_terms: terms of the ``"series"`` estimator.
    :param count_exact_terms: terms the ``"roulette"`` estimator always computes.
    :param roulette_p: the stopping probability of the ``"roulette"`` estimator's geometric
        number of further terms (default :math:`1 - q`).
    :param probe: the Hutchinson probes of the stochastic estimators, ``"rademacher"`` or
        ``"gaussian"``.
    :param tolerance: the inverse's bound on :math:`|x - x^*| / (1 + |y|)` (default:
        a residual of :math:`10^{-13}` relative in float64, ten epsilons in float32).
    :param max_iterations: the inverse's budget of fixed-point steps (default: twice what
        the contraction bound needs, plus 10).
    :param direction: ``"iaf"``: the forward map (noise to data, sampling) is the block
        :math:`y = x + g(x)` and the inverse solves it; ``"maf"``: the inverse (data to
        noise, scoring) is the block and the forward map solves it.

    The stochastic estimators draw their probes and :math:`N` from torch's global
    generator. ``last_inverse_iterations`` holds the fixed-point steps of the latest solve
    of the block (the inverse; the forward map with ``direction="maf"``), a diagnostic,
    ``None`` before the first.
    """

    def __init__(
        self,
        net: LipschitzMLP,
        context: torch.Tensor | None = None,
        *,
        logdet: str = "exact",
        count_terms: int = 10,
        count_exact_terms: int = 2,
        roulette_p: float | None = None,
        probe: str = "rademacher",
        tolerance: float | None = None,
        max_iterations: int | None = None,
        direction: str = "iaf",
        cache_size: int = 1,
    ):
        super().__init__(cache_size=cache_size)
        if net.output_dim != net.input_dim:
            raise ValueError(f"a residual flow needs g: R^D -> R^D, got a net from {net.input_dim} to {net.output_dim}")
        check_unit_interval("lipschitz", net.lipschitz, LIPSCHITZ_HINT)
        self.input_dim = net.input_dim
        self.net = net
        self.context = context
        options = _options(
            logdet, count_terms, count_exact_terms, roulette_p, probe, tolerance, max_iterations, direction
        )
        self.__dict__.update(options)
        self.last_inverse_iterations = None

    @property
    def contraction(self) -> float:
        r""":math:`q = c^K`, the Lipschitz bound of :math:`g` the inverse and the defaults use."""
        return self.net.lipschitz_bound

    def _parameter_versions(self) -> tuple:
        # The normalised weights depend on the power-iteration buffers too: bring them up
        # to date first (they change only when a weight has), then key on them as well.
        self.net.refresh()
        return (*super()._parameter_versions(), *self.net.buffer_versions())

    def _function(self) -> tuple[LipschitzFunction, torch.Tensor | None]:
        return self.net.function(), self.net.shift(self.context)

    def _broadcast(self, x: torch.Tensor, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` and the shift expanded to their common batch shape."""
        if shift is None:
            return x, None
        batch = torch.broadcast_shapes(x.shape[:-1], shift.shape[:-1])
        return x.expand(batch + x.shape[-1:]), shift.expand(batch + shift.shape[-1:])

    # The block x + g(x) is the forward map ("iaf", sampling in one pass) or the inverse
    # ("maf", scoring data in one pass); the other direction solves it.

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_block(x) if self.direction == "iaf" else self._solve_block(x, "forward")

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._solve_block(y, "inverse") if self.direction == "iaf" else self._apply_block(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.direction == "iaf":
            return self._block_log_det(x)
        return -self._block_log_det(y)

    def _apply_block(self, x: torch.Tensor) -> torch.Tensor:
        g, shift = self._function()
        return x + g(x, shift)

    # ----------------------------------------------------------------------------------
    # Solving the block
    # ----------------------------------------------------------------------------------

    def _solve_block(self, y: torch.Tensor, direction: str) -> torch.Tensor:
        """The ``x`` with ``x + g(x) = y``, by fixed-point iteration, with implicit gradients."""
        who = f"{type(self).__name__} {direction}"
        check_finite(y, who)
        g, shift = self._function()
        y, shift = self._broadcast(y, shift)
        rows = y.detach().reshape(-1, self.input_dim)
        shift_rows = None if shift is None else shift.detach().reshape(-1, shift.shape[-1])
        with torch.no_grad():

            def step(x, index, target, *shift):
                return target - g(x, *shift)

            aligned = (rows,) if shift_rows is None else (rows, shift_rows)
            x_star, self.last_inverse_iterations = self._solve(step, rows, 1 + rows.norm(dim=-1), who, aligned)
        x_star = x_star.reshape(y.shape)
        if not torch.is_grad_enabled():  # the solve met the tolerance: nothing to differentiate
            return x_star
        x = y - g(x_star, shift)  # one more step, with autograd on
        if x.requires_grad:
            x.register_hook(self._implicit_gradient(g.detach(), x_star, shift_rows, who))
        return x

    def _implicit_gradient(
        self, g: LipschitzFunction, x_star: torch.Tensor, shift_rows: torch.Tensor | None, who: str
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        r"""The hook mapping :math:`v = \partial L/\partial x` to :math:`(I + J)^{-\top} v`."""

        def hook(v: torch.Tensor | None) -> torch.Tensor | None:
            if v is None:  # an undefined gradient stays undefined
                return None
            v_rows = v.reshape(-1, self.input_dim)
            if self.logdet == "exact":  # Jacobians are affordable: solve (I + J)^T w = v directly
                z = x_star.detach().reshape(-1, self.input_dim)
                with torch.no_grad():
                    jacobian = g.value_and_jacobian(z, shift_rows)[1]
                    eye = torch.eye(self.input_dim, dtype=v.dtype, device=v.device)
                    return torch.linalg.solve((eye + jacobian).transpose(-1, -2), v_rows).reshape(v.shape)
            with torch.enable_grad():
                z = x_star.detach().reshape(-1, self.input_dim).requires_grad_()
                gz = g(z, shift_rows)

            def step(w, index, target):
                cotangent = w if index is None else torch.zeros_like(v_rows).index_copy_(0, index, w)
                (product,) = torch.autograd.grad(gz, z, cotangent, retain_graph=True)
                return target - (product if index is None else product[index])

            w, _ = self._solve(step, v_rows, v_rows.norm(dim=-1), f"{who} (its gradient)", (v_rows,))
            return w.reshape(v.shape)

        return hook

    def _solve(
        self,
        step: Callable[..., torch.Tensor],
        start: torch.Tensor,
        scale: torch.Tensor,
        who: str,
        aligned: tuple[torch.Tensor, ...] = (),
    ) -> tuple[torch.Tensor, int]:
        r"""Iterate :math:`z \leftarrow T(z)` on each row of ``start`` until
        :math:`\frac{q}{1-q}|T(z) - z| \le` tolerance :math:`\cdot` ``scale``; returns the
        rows and the count of steps.

        ``step(z, index, *aligned)`` computes :math:`T` on the rows still iterated: ``index``
        is ``None`` while that is every row, else their indices in ``start``; ``aligned``
        (tensors with one row per row of ``start``) arrive cut to those rows. The rows that
        have stopped drop out once they are a quarter of those iterated (until then they
        take further steps, which only shrink their error), so that most steps run on whole
        tensors instead of gathering and scattering rows."""
        q = self.contraction
        step_size = _default_step(start.dtype) if self.tolerance is None else self.tolerance * (1 - q) / q
        z, limit, index = start.clone(), step_size * scale, None
        current = z
        budget, iterations = self.max_iterations, 0
        while True:
            new = step(current, index, *aligned)
            residual = (new - current).norm(dim=-1)
            if iterations == 0:
                _check_first_step(residual, who)
                if budget is None:
                    budget = _iteration_budget(residual, limit, q)
            current, iterations = new, iterations + 1
            going = ~(residual <= limit)  # a NaN keeps going, into the budget's error
            still = int(going.sum())
            if still and iterations >= budget:
                self._not_converged(who, iterations, residual[going], limit[going], len(z), q)
            if 4 * (len(current) - still) < len(current) and still:
                continue
            if index is None:
                z = current
            else:
                z.index_copy_(0, index, current)
            if not still:
                return z, iterations
            keep = going.nonzero().squeeze(-1)
            index = keep if index is None else index[keep]
            current, limit, aligned = current[keep], limit[keep], tuple(a[keep] for a in aligned)

    def _not_converged(self, who, iterations, residual, limit, count, q) -> None:
        worst = int(torch.argmax(residual / limit))
        raise InverseNotConverged(
            f"{who} did not converge in {iterations} fixed-point iterations: {residual.numel()} of {count} points "
            f"still have a residual |x + g(x) - y| of up to {float(residual[worst]):.3g} (it must fall below "
            f"{float(limit[worst]):.3g} there, for the tolerance with Lipschitz bound q = {q:.3g}); raise "
            "max_iterations or tolerance"
        )

    # ----------------------------------------------------------------------------------
    # Log-determinant
    # ----------------------------------------------------------------------------------

    def _block_log_det(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log\det(I + J_g(x))`, the log-determinant of the block at its input ``x``."""
        if self.logdet == "exact":
            return self._exact_log_det(x)
        return self._stochastic_log_det(x)

    def _exact_log_det(self, x: torch.Tensor) -> torch.Tensor:
        g, shift = self._function()
        x, shift = self._broadcast(x, shift)
        batch, size = x.shape[:-1], self.input_dim
        rows = x.reshape(-1, size)
        if rows.shape[0] == 0:
            return x.new_zeros(batch)
        shift_rows = None if shift is None else shift.reshape(-1, shift.shape[-1])
        if torch.jit.is_tracing():
            jacobian = g.value_and_jacobian(rows, shift_rows)[1]
        else:
            jacobian = vmap(jacrev(g), in_dims=(0, None if shift_rows is None else 0))(rows, shift_rows)
        eye = torch.eye(size, dtype=x.dtype, device=x.device)
        return torch.linalg.slogdet(eye + jacobian).logabsdet.reshape(batch)

    def _stochastic_log_det(self, x: torch.Tensor) -> torch.Tensor:
        g, shift = self._function()
        x, shift = self._broadcast(x, shift)
        differentiate = torch.is_grad_enabled()
        with torch.enable_grad():
            # A fresh view to differentiate against: the vector-Jacobian products must not
            # reach x itself, whose hook (after an inverse) maps gradients to implicit ones.
            point = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
            gx = g(point, shift)
            probe = self._probe(gx)
            estimator = self._series if self.logdet == "series" else self._roulette
            estimate = estimator(gx, point, probe, differentiate)
        return estimate if differentiate else estimate.detach()

    def _probe(self, like: torch.Tensor) -> torch.Tensor:
        if self.probe == "gaussian":
            return torch.randn_like(like)
        return torch.empty_like(like).bernoulli_(0.5).mul_(2).sub_(1)

    def _series(self, gx: torch.Tensor, x: torch.Tensor, v: torch.Tensor, differentiate: bool) -> torch.Tensor:
        """The truncated series, backpropagated through (i-ResNet)."""
        row, total = v, gx.new_zeros(gx.shape[:-1])
        for k in range(1, self.count_terms + 1):
            (row,) = torch.autograd.grad(gx, x, row, create_graph=differentiate, retain_graph=True)
            total = total + ((-1) ** (k + 1) / k) * (row * v).sum(-1)
        return total

    def _roulette(self, gx: torch.Tensor, x: torch.Tensor, v: torch.Tensor, differentiate: bool) -> torch.Tensor:
        """The Russian-roulette estimate, with the Neumann-series gradient estimator."""
        exact, p = self.count_exact_terms, self.roulette_p
        p = 1 - self.contraction if p is None else p
        count = exact + int(torch.empty(()).geometric_(p)) - 1  # geometric_ counts from 1
        row, total, neumann = v, gx.new_zeros(gx.shape[:-1]), v
        for k in range(1, count + 1):
            (row,) = torch.autograd.grad(gx, x, row, retain_graph=True)  # v^T J^k, no graph
            survival = (1 - p) ** max(0, k - exact)  # P(N >= k)
            total = total + ((-1) ** (k + 1) / (k * survival)) * (row * v).sum(-1)
            neumann = neumann + ((-1) ** k / survival) * row
        if differentiate:
            # d/dtheta (n^T J v), n held fixed: the Neumann-series gradient, one graph.
            (product,) = torch.autograd.grad(gx, x, neumann, create_graph=True)
            surrogate = (product * v).sum(-1)
            total = total + (surrogate - surrogate.detach())
        return total

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, lipschitz={self.net.lipschitz}, logdet={self.logdet!r}, "
            f"direction={self.direction!r}"
        )


class Residual(ConditionedResidual, TransformModule):
    r"""A learnable invertible residual flow :math:`y = x + g(x)` (i-ResNet [1], Residual
    Flows [2]), :math:`g` a :class:`~pyro_nflows.nn.LipschitzMLP` with LipSwish
    activations whose every linear layer has spectral norm at most ``lipschitz``.

    :param input_dim: the event size :math:`D`.
    :param hidden_dims: the hidden widths of :math:`g`; default
        ``default_hidden_dims(input_dim, network="coupling")`` (like a coupling network, it
        maps the event to an output of its size).
    :param lipschitz: :math:`c \in (0, 1)`, the bound on each layer's spectral norm; 0.9
        (i-ResNet's) trades expressiveness per block against the inverse's speed, which
        slows as :math:`q = c^K` nears 1.
    :param logdet: ``"exact"`` (default: exact, and the cheapest for the small :math:`D`
        of most uses), ``"series"`` or ``"roulette"`` (unbiased and memory-efficient: for
        training in high dimensions).
    :param count_terms: ``"series"`` terms; 10 bounds the dropped tail by about
        :math:`0.01 D` nats at the default :math:`q = 0.9^3`.
    :param count_exact_terms: terms ``"roulette"`` always computes; 2, as in [2], carry
        most of the log-determinant and so cut its variance.
    :param roulette_p: ``"roulette"``'s stopping probability; default :math:`1 - q`,
        the largest that keeps its variance finite with margin.
    :param probe: ``"rademacher"`` (default: never a larger variance than Gaussian
        probes, Hutchinson's original) or ``"gaussian"``.
    :param tolerance: the inverse's bound on :math:`|x - x^*| / (1 + |y|)`; by default the
        iteration stops at a residual of :math:`10^{-13}` (float64) or ten epsilons
        (float32) relative, well above rounding and far below a round trip's needs.
    :param max_iterations: the inverse's budget of fixed-point steps; by default twice what
        the contraction bound says the tolerance needs, plus 10: exceeding it means the map
        is not the contraction it should be, which is reported, not hidden.
    :param direction: which direction is the block itself, one pass (the other solves it):
        ``"iaf"`` (default) the forward map, what guides and VAE posteriors sample and score
        their own samples with; ``"maf"`` the inverse, what a density model scores data with
        (Residual Flows' density models are built this way [2]; :func:`~pyro_nflows.density.fit`
        uses it).
    :param n_power_iterations: power-iteration steps per weight update in training
        mode for layers wider than 128 on both sides (smaller ones, and all in evaluation
        mode, get exact singular vectors, see :mod:`pyro_nflows.nn.lipschitz`); 1, as
        Miyato et al. and torch, since the vectors are warm-started.

    Example::

        >>> import pyro.distributions as dist
        >>> base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
        >>> flow = dist.TransformedDistribution(base, [Residual(2, (16, 16)) for _ in range(3)])
        >>> flow.log_prob(torch.tensor([[3.0, -1.0]])).shape  # data: inverted by fixed-point iteration
        torch.Size([1])

    Reference: [1], [2] in :mod:`pyro_nflows.transforms.residual_flow` (arXiv:1811.00995,
    arXiv:1906.02735).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] | None = None,
        *,
        lipschitz: float = 0.9,
        logdet: str = "exact",
        count_terms: int = 10,
        count_exact_terms: int = 2,
        roulette_p: float | None = None,
        probe: str = "rademacher",
        tolerance: float | None = None,
        max_iterations: int | None = None,
        n_power_iterations: int = 1,
        direction: str = "iaf",
        cache_size: int = 1,
    ):
        check_input_dim(input_dim)
        check_unit_interval("lipschitz", lipschitz, LIPSCHITZ_HINT)
        if hidden_dims is None:
            hidden_dims = default_hidden_dims(input_dim, network="coupling")
        net = LipschitzMLP(input_dim, hidden_dims, lipschitz=lipschitz, n_power_iterations=n_power_iterations)
        super().__init__(
            net, logdet=logdet, count_terms=count_terms, count_exact_terms=count_exact_terms, roulette_p=roulette_p,
            probe=probe, tolerance=tolerance, max_iterations=max_iterations, direction=direction,
            cache_size=cache_size,
        )


class ConditionalResidual(ConditionalFlow):
    r"""A residual flow :math:`y = x + g(x, c)` whose Lipschitz network also reads a context
    :math:`c` (a linear function of it shifts every layer's pre-activations, so :math:`g`
    stays :math:`q`-Lipschitz in :math:`x` for every context); ``condition(c)`` returns a
    :class:`ConditionedResidual`. Options as for :class:`Residual`; the default widths are
    ``default_hidden_dims(input_dim, context_dim, "coupling")``.
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Sequence[int] | None = None,
        *,
        lipschitz: float = 0.9,
        logdet: str = "exact",
        count_terms: int = 10,
        count_exact_terms: int = 2,
        roulette_p: float | None = None,
        probe: str = "rademacher",
        tolerance: float | None = None,
        max_iterations: int | None = None,
        n_power_iterations: int = 1,
        direction: str = "iaf",
    ):
        super().__init__(input_dim, context_dim)
        check_unit_interval("lipschitz", lipschitz, LIPSCHITZ_HINT)
        if hidden_dims is None:
            hidden_dims = default_hidden_dims(input_dim, context_dim, "coupling")
        self.net = LipschitzMLP(
            input_dim, hidden_dims, context_dim=context_dim, lipschitz=lipschitz, n_power_iterations=n_power_iterations
        )
        self.options = _options(
            logdet, count_terms, count_exact_terms, roulette_p, probe, tolerance, max_iterations, direction
        )

    def _condition(self, context: torch.Tensor) -> ConditionedResidual:
        return ConditionedResidual(self.net, context, **self.options)

    def extra_repr(self) -> str:
        options = self.options
        return (
            f"{super().extra_repr()}, lipschitz={self.net.lipschitz}, logdet={options['logdet']!r}, "
            f"direction={options['direction']!r}"
        )


def residual(
    input_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    lipschitz: float = 0.9,
    logdet: str = "exact",
    count_terms: int = 10,
    count_exact_terms: int = 2,
    roulette_p: float | None = None,
    probe: str = "rademacher",
    tolerance: float | None = None,
    max_iterations: int | None = None,
    n_power_iterations: int = 1,
    direction: str = "iaf",
) -> Residual:
    """A learnable invertible residual flow on vectors of size ``input_dim`` (see :class:`Residual`)."""
    return Residual(
        input_dim, hidden_dims, lipschitz=lipschitz, logdet=logdet, count_terms=count_terms,
        count_exact_terms=count_exact_terms, roulette_p=roulette_p, probe=probe, tolerance=tolerance,
        max_iterations=max_iterations, n_power_iterations=n_power_iterations, direction=direction,
    )


def conditional_residual(
    input_dim: int,
    context_dim: int,
    hidden_dims: Sequence[int] | None = None,
    *,
    lipschitz: float = 0.9,
    logdet: str = "exact",
    count_terms: int = 10,
    count_exact_terms: int = 2,
    roulette_p: float | None = None,
    probe: str = "rademacher",
    tolerance: float | None = None,
    max_iterations: int | None = None,
    n_power_iterations: int = 1,
    direction: str = "iaf",
) -> ConditionalResidual:
    """A residual flow whose Lipschitz network also reads a context of width ``context_dim``
    (see :class:`ConditionalResidual`)."""
    return ConditionalResidual(
        input_dim, context_dim, hidden_dims, lipschitz=lipschitz, logdet=logdet, count_terms=count_terms,
        count_exact_terms=count_exact_terms, roulette_p=roulette_p, probe=probe, tolerance=tolerance,
        max_iterations=max_iterations, n_power_iterations=n_power_iterations, direction=direction,
    )
