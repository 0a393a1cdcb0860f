r"""The default hidden widths of the package's conditioners, in one place.

Every network that computes a flow's parameters has two hidden layers whose
width :math:`h` grows with the larger of the event size :math:`D` and the
context width :math:`C` (0 without a context), by a rule that depends on
what the network does:

==============  ================================================  ==========================================
``network``     :math:`h`                                         used by
==============  ================================================  ==========================================
``"context"``   :math:`10 \max(D, C)`                             the ``ContextNet`` of a conditional flow
``"coupling"``  :math:`\min(512, \max(64, 10 \max(D, C)))`        coupling and residual flows' networks
``"made"``      :math:`\max(64, 4 \max(D, C))`                    MADEs (MAF, IAF, NSF)
``"ode"``       :math:`\min(512, \max(64, 10 D))`                 continuous flows' velocity fields
==============  ================================================  ==========================================

The context network's rule is Pyro's, for the drop-in. The coupling
network's is capped so that image-sized inputs do not get millions of
weights per layer. A residual flow's Lipschitz network reuses it: like a
coupling network, it maps the event to an output of the event's size.
A velocity field's width follows :math:`D` alone: its context enters
through one linear map to the gates and shifts of every layer (see
:mod:`pyro_nflows.nn.ode`), so a wide context does not call for wider
layers.
"""

from __future__ import annotations

from pyro_nflows.validation import check_count

__all__ = ["NETWORKS", "default_hidden_dims"]

NETWORKS = ("context", "coupling", "made", "ode")


def default_hidden_dims(input_dim: int, context_dim: int | None = None, network: str = "context") -> tuple[int, int]:
    """Two hidden layers of the width the module docstring's table gives for ``network``.

    >>> default_hidden_dims(3), default_hidden_dims(3, network="coupling"), default_hidden_dims(3, 20, network="made")
    ((30, 30), (64, 64), (80, 80))
    """
    size = max(check_count("input_dim", input_dim), check_count("context_dim", context_dim or 0, minimum=0))
    if network == "context":
        width = 10 * size
    elif network == "coupling":
        width = min(512, max(64, 10 * size))
    elif network == "made":
        width = max(64, 4 * size)
    elif network == "ode":
        width = min(512, max(64, 10 * input_dim))
    else:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    return (width, width)
