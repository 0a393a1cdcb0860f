"""Conditioners: the networks that produce a flow's parameters."""

from pyro_nflows.nn.dense import ContextNet, default_hidden_dims
from pyro_nflows.nn.made import MADE

__all__ = ["MADE", "ContextNet", "default_hidden_dims"]
