"""Conditioners: the networks that produce a flow's parameters."""

from pyro_nflows.nn.dense import ContextNet, default_hidden_dims

__all__ = ["ContextNet", "default_hidden_dims"]
