"""A context network: an MLP from a context vector to the parameters of a flow.

Conditional flows (``Conditional<X>``) use it to turn a context (an encoder's
hidden layer, say) into the tensors that ``Conditioned<X>`` takes. The network
itself is Pyro's :class:`~pyro.nn.DenseNN`; this module adds what every
conditional flow needs around it: a width check on the context, and outputs
reshaped to the parameter shapes (``(K, D)`` reflection vectors, say) with the
context's batch shape in front. (The flow that owns the network checks the
context's width, so that the error names the flow.)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pyro.nn import DenseNN
from torch import nn

from pyro_nflows.validation import check_count, check_hidden_dims

__all__ = ["ContextNet"]


class ContextNet(nn.Module):
    """An MLP mapping a context of width ``context_dim`` to tensors of the given shapes.

    :param context_dim: width of the context vector.
    :param hidden_dims: widths of the hidden layers; empty for a linear map
        from the context (as the amortized posteriors of the VAE papers use).
    :param param_shapes: one shape per output tensor, without batch dimensions.

    ``forward(context)`` returns a tuple with one tensor per shape, each of shape
    ``context.shape[:-1] + param_shape``.
    """

    def __init__(
        self,
        context_dim: int,
        hidden_dims: Sequence[int],
        param_shapes: Sequence[tuple[int, ...]],
    ):
        super().__init__()
        self.context_dim = check_count("context_dim", context_dim)
        hidden_dims = check_hidden_dims(hidden_dims)
        self.param_shapes = [tuple(int(s) for s in shape) for shape in param_shapes]
        sizes = [math.prod(shape) for shape in self.param_shapes]
        # One output block per parameter; an empty block (a 1-D triangular
        # matrix has no strictly lower entries) gets one dummy unit.
        blocks = [max(size, 1) for size in sizes]
        if hidden_dims:
            self.net = DenseNN(context_dim, list(hidden_dims), blocks)
        else:  # no hidden layer: one linear map from the context (DenseNN needs a hidden layer)
            self.net = nn.Linear(context_dim, sum(blocks))
        self._blocks = blocks
        self._sizes = sizes
        self.hidden_dims = tuple(hidden_dims)

    @property
    def last_width(self) -> int:
        """The width of the last hidden layer (the context's, with none): how many units each output sums."""
        return self.hidden_dims[-1] if self.hidden_dims else self.context_dim

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.net(context)
        if isinstance(self.net, nn.Linear):
            outputs = outputs.split(self._blocks, dim=-1)
        elif len(self._sizes) == 1:
            outputs = (outputs,)
        batch = context.shape[:-1]
        return tuple(
            out[..., :size].reshape(batch + shape)
            for out, size, shape in zip(outputs, self._sizes, self.param_shapes)
        )
