"""Conditioners: the networks that produce a flow's parameters."""

from pyro_nflows.nn.dense import ContextNet
from pyro_nflows.nn.made import MADE
from pyro_nflows.nn.widths import default_hidden_dims

__all__ = ["MADE", "ContextNet", "default_hidden_dims"]
