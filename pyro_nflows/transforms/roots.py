r"""Roots of increasing scalar functions, many at once: the numerical inverses
of planar and Sylvester flows reduce to these.

:func:`monotone_root` solves :math:`f(t) = 0` elementwise for an increasing
:math:`f`, given a bracket :math:`[a, b]` with :math:`f(a) \le 0 \le f(b)`.
Each iteration takes a Newton step, and falls back to bisection wherever the
Newton step would leave the current bracket; the bracket shrinks every
iteration. So it converges quadratically near a simple root and never
diverges; near a nearly flat root (slope close to 0) Newton converges only
linearly, and ``max_iterations`` bounds the work.

If some element has not converged after ``max_iterations``, it raises
:class:`InverseNotConverged` instead of returning a wrong answer.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["InverseNotConverged", "monotone_root"]


class InverseNotConverged(ArithmeticError):
    """A numerical inverse did not reach its tolerance."""


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-6


@torch.compiler.disable  # a data-dependent loop: torch.compile runs it as it is, between graphs
def monotone_root(
    function: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    lower: torch.Tensor,
    upper: torch.Tensor,
    tolerance: float | None = None,
    max_iterations: int = 100,
    who: str = "the inverse",
) -> torch.Tensor:
    r"""Solve :math:`f(t) = 0` elementwise for an increasing :math:`f`.

    :param function: maps ``t`` to ``(f(t), f'(t))``, elementwise.
    :param lower: a lower end of the bracket, :math:`f(\text{lower}) \le 0`.
    :param upper: an upper end of the bracket, :math:`f(\text{upper}) \ge 0`.
    :param tolerance: stop once every Newton step or bracket is below
        ``tolerance * (1 + |t|)``; default ``1e-12`` in float64, ``1e-6`` in float32.
    :param who: named in the error message.
    :raises InverseNotConverged: if some element has not converged.

    Runs without building an autograd graph; a caller that needs gradients
    through the root uses the implicit function theorem (one more Newton
    step with gradients on recovers them exactly at the root).
    """
    if tolerance is None:
        tolerance = _tolerance(lower.dtype)
    with torch.no_grad():
        lower, upper = (bound.clone() for bound in torch.broadcast_tensors(lower.detach(), upper.detach()))
        t = 0.5 * (lower + upper)
        for _ in range(max_iterations):
            value, slope = function(t)
            # Shrink the bracket with the sign of f at t.
            below = value < 0
            lower = torch.where(below, t, lower)
            upper = torch.where(below, upper, t)
            newton = t - value / slope
            inside = (newton > lower) & (newton < upper) & torch.isfinite(newton)
            step_to = torch.where(inside, newton, 0.5 * (lower + upper))
            # Where f(t) == 0, or the Newton step is below t's resolution, t is
            # the root to working precision: stay. (t is now an end of the
            # bracket, so the strict test above would bisect away from it; an
            # inclusive test instead lets rounding noise in f bounce the
            # iterate between the two ends of the bracket without end.)
            step_to = torch.where((value == 0) | (newton == t), t, step_to)
            scale = 1 + step_to.abs()
            done = ((step_to - t).abs() <= tolerance * scale) | ((upper - lower) <= tolerance * scale) | (value == 0)
            t = step_to
            if bool(done.all()):
                return t
    worst = (upper - lower).abs().max().item()
    raise InverseNotConverged(
        f"{who} did not converge in {max_iterations} iterations "
        f"(widest remaining bracket {worst:.3g}, tolerance {tolerance:.3g})"
    )
