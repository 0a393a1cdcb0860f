"""Argument checks shared by every layer of the package.

Each raises ``ValueError`` with a message that says what was expected and what
was given, so that a user sees the mistake instead of a shape error from deep
inside torch.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_count",
    "check_event",
    "check_finite",
    "check_hidden_dims",
    "check_kernel_size",
    "check_input_dim",
    "check_positive",
    "check_rows",
    "check_spline_from",
    "check_spline_order",
    "check_unit_interval",
]


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


def check_hidden_dims(hidden_dims, minimum_layers: int = 0) -> list[int]:
    """Return ``hidden_dims`` as a list of widths if it is a sequence of at least
    ``minimum_layers`` integers >= 1 (such as ``(64, 64)``), else raise ``ValueError``."""
    if isinstance(hidden_dims, (str, bytes)) or not isinstance(hidden_dims, (list, tuple, range)):
        raise ValueError(
            f"hidden_dims must be a sequence of layer widths such as (64, 64), got {hidden_dims!r}"
        )
    widths = [check_count("every entry of hidden_dims", width) for width in hidden_dims]
    if len(widths) < minimum_layers:
        raise ValueError(f"hidden_dims must hold at least {minimum_layers} width(s), got {hidden_dims!r}")
    return widths


def check_kernel_size(kernel_size: int) -> int:
    """Return ``kernel_size`` if it is an odd integer >= 1 (a kernel centred on
    its pixel), else raise ``ValueError``."""
    kernel_size = check_count("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the kernel is centred on the pixel), got {kernel_size}")
    return kernel_size


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


def check_spline_order(order: str) -> str:
    """Return ``order`` if it is ``"quadratic"``, the spline kind the package
    implements; Pyro's ``order="linear"`` (linear rational splines) raises
    ``NotImplementedError`` saying what to pass instead."""
    if order != "quadratic":
        raise NotImplementedError(
            f"order={order!r}: only rational-quadratic splines (order='quadratic', Durkan et al. 2019) are "
            "implemented here; Pyro's default, order='linear' (linear rational splines), is not. "
            "Pass order='quadratic'"
        )
    return order


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


def check_finite(value: torch.Tensor, who: str, what: str = "input") -> None:
    """Raise ``ValueError`` unless every entry of ``value`` is finite (for the
    numerical inverses, which are defined only for finite points)."""
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{who} got a non-finite {what} ({bad} of {value.numel()} entries are NaN or inf); "
            "the inverse is defined only for finite points"
        )


def check_rows(
    data, name: str, columns: int | None = None, min_rows: int = 1, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``data`` (a tensor or array of rows) as a floating tensor of shape
    ``(rows, columns)``, or ``ValueError`` naming the fault: the wrong number
    of dimensions or columns, NaN or infinite entries (the first rows and the
    columns holding them), fewer than ``min_rows`` rows. Integer data becomes
    ``dtype`` (default: torch's default dtype)."""
    tensor = torch.as_tensor(data)
    if not tensor.is_floating_point():
        tensor = tensor.to(dtype or torch.get_default_dtype())
    width = "columns" if columns is None else str(columns)
    if tensor.dim() != 2 or (columns is not None and tensor.shape[1] != columns):
        raise ValueError(f"{name} must be a 2-D array of shape (n, {width}), got shape {tuple(tensor.shape)}")
    if tensor.shape[1] < 1:
        raise ValueError(f"{name} has no columns")
    bad = ~torch.isfinite(tensor)
    if bad.any():
        bad_rows = torch.nonzero(bad.any(1)).flatten().tolist()
        bad_columns = torch.nonzero(bad.any(0)).flatten().tolist()
        raise ValueError(
            f"{name} holds NaN or infinite values in {len(bad_rows)} rows "
            f"(first rows: {bad_rows[:10]}) and columns {bad_columns[:10]}; remove or impute them"
        )
    if len(tensor) < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} row{'s' if min_rows > 1 else ''}, got {len(tensor)}")
    return tensor


def check_choice(name: str, value, choices: tuple) -> str:
    """Return ``value`` if it is one of ``choices`` (names such as solvers or
    estimators), else raise ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_unit_interval(name: str, value: float, hint: str = "") -> float:
    """Return ``value`` as a float if it is a number strictly between 0 and 1
    (a contraction's Lipschitz constant, a probability that may be neither 0
    nor 1), else raise ``ValueError``; ``hint``, if given, ends the message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        ending = f"; {hint}" if hint else ""
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}{ending}")
    return float(value)
