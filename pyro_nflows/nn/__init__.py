"""Conditioners: the networks that produce a flow's parameters."""

from pyro_nflows.nn.dense import ContextNet
from pyro_nflows.nn.lipschitz import (
    InducedSpectralNorm,
    LipschitzFunction,
    LipschitzLinear,
    LipschitzMLP,
    LipSwish,
)
from pyro_nflows.nn.made import MADE
from pyro_nflows.nn.ode import ODENet
from pyro_nflows.nn.widths import default_hidden_dims

__all__ = [
    "MADE",
    "ContextNet",
    "InducedSpectralNorm",
    "LipSwish",
    "LipschitzFunction",
    "LipschitzLinear",
    "LipschitzMLP",
    "ODENet",
    "default_hidden_dims",
]
