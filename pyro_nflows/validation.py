"""Argument checks shared by every layer of the package.

Each raises ``ValueError`` with a message that says what was expected and what
was given, so that a user sees the mistake instead of a shape error from deep
inside torch.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_bool", "check_count", "check_event", "check_input_dim", "check_positive", "check_spline_from"]


def check_bool(name: str, value: bool) -> bool:
    """Return ``value`` if it is ``True`` or ``False``, else raise ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_count(name: str, value: int, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer >= ``minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a positive finite number, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_spline_from(value: str) -> str:
    """Return ``value`` if it names a side a spline flow can evaluate its spline
    from (``"z"``, the noise side, or ``"x"``, the data side), else raise ``ValueError``."""
    if value not in ("z", "x"):
        raise ValueError(
            "spline_from must be 'z' (the spline maps noise to data: cheap, exact sampling, for "
            f"guides and posteriors) or 'x' (it maps data to noise: for density estimation), got {value!r}"
        )
    return value


def check_input_dim(input_dim: int) -> int:
    """Return ``input_dim`` if it is an integer >= 1, else raise ``ValueError``."""
    return check_count("input_dim", input_dim)


def check_event(x: torch.Tensor, size: int, who: str, what: str = "input") -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor whose last dimension is ``size``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{who} expects a torch.Tensor {what}, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != size:
        raise ValueError(
            f"{who} expects {what}s whose last dimension is {size}, "
            f"got a tensor of shape {tuple(x.shape)}"
        )
