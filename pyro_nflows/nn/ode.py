r"""The dynamics network of a continuous flow: a velocity field :math:`f(x, t)`,
or :math:`f(x, t, c)` with a context.

**Architecture.** An MLP whose hidden layers are FFJORD's *concat-squash*
layers [1]: time (and the context) enter every hidden layer through a gate
and a shift,

.. math:: h_l = \tanh\bigl((W_l h_{l-1} + b_l) \odot \sigma(A_l e + a_l) + B_l e\bigr),
          \qquad e = (t, c), \quad h_0 = x,

and the output layer is linear, :math:`f = W_{L} h_{L-1} + b_L + B_L e`.
Reasons: time modulates every layer, not only the first (concatenating
:math:`t` to the input alone leaves deeper layers time-independent), at the
cost of one small linear map from :math:`e`; the context conditions the
field the same way (a FiLM-style gate and shift per unit), so a wide context
does not widen the hidden layers; ``tanh`` is smooth, which the solver's
error control assumes (a kink, as in ReLU, forces small steps near it), and
its slope is at most 1; the output layer has no gate, so that
:math:`\partial f / \partial x = W_L D_{L-1} W_{L-1} \cdots D_1 W_1` with
per-point diagonal :math:`D_l = \operatorname{diag}(d_l)`,
:math:`d_l = \sigma(A_l e + a_l) \odot (1 - h_l^2)`, and the trace below has
a closed form. The part of the gates and shifts that comes from the context
is the same at every time, so :meth:`ODENet.prepare` computes it once per
solve; each evaluation then only adds :math:`t` times a column.

**Derivatives without autograd.** The flow needs, at every evaluation,
either the trace of :math:`\partial f/\partial x` or a product with it, and
the factorisation gives each as plain tensor operations (differentiable by
ordinary autograd, for training, and traceable by ``torch.jit.trace``, which
cannot trace ``torch.func``):

- :meth:`ODENet.velocity_and_trace`, the exact trace, by the cyclic property
  of the trace:

  .. math::

      \text{no hidden layer: } \operatorname{tr} W_1, \qquad
      \text{one: } d_1^\top \operatorname{diag}(W_1 W_2), \qquad
      \text{two: } d_2^\top \bigl(W_2 \odot (W_1 W_3)^\top\bigr) d_1 .

  The matrices in brackets depend on neither the point nor the time and are
  formed once per solve, so the exact trace costs about one extra
  matrix-vector product per point (the size of the second layer's), whatever
  :math:`D`, where autograd needs :math:`D` vector-Jacobian products. With
  three or more hidden layers the product has three point-dependent
  diagonals and no such form (:attr:`ODENet.has_closed_form_trace` is
  ``False``);
- :meth:`ODENet.velocity_and_jacobian`, the whole Jacobian for any depth: its
  :math:`D` columns pushed forward through the layers at once (forward-mode
  differentiation, batched as matrix products: the arithmetic of
  ``torch.func.jacfwd`` under ``vmap``, :math:`D` passes' worth);
- :meth:`ODENet.velocity_and_vjp`, :math:`v^\top \partial f/\partial x` for
  any depth: one backward sweep through the layers, about one pass
  (Hutchinson's estimator).

References:

[1] Will Grathwohl, Ricky T. Q. Chen, Jesse Bettencourt, Ilya Sutskever,
    David Duvenaud. FFJORD: Free-form Continuous Dynamics for Scalable
    Reversible Generative Models. ICLR 2019. arXiv:1810.01367
[2] Ricky T. Q. Chen, Yulia Rubanova, Jesse Bettencourt, David Duvenaud.
    Neural Ordinary Differential Equations. NeurIPS 2018. arXiv:1806.07366
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pyro_nflows.validation import check_count, check_hidden_dims, check_input_dim, check_positive

__all__ = ["ODENet", "Prepared"]


class Prepared(NamedTuple):
    """What the evaluations of one solve share (see :meth:`ODENet.prepare`),
    computed from the parameters (and the context) once per solve."""

    embedding: torch.Tensor
    time_column: torch.Tensor
    cycle: torch.Tensor | None


class ODENet(nn.Module):
    r"""A velocity field :math:`f(x, t)` (``context_dim=0``) or :math:`f(x, t, c)`:
    concat-squash hidden layers and a linear output (see :mod:`pyro_nflows.nn.ode`).

    :param input_dim: the event size :math:`D` (the field maps :math:`\mathbb{R}^D` to itself).
    :param hidden_dims: widths of the hidden layers; ``()`` gives an affine field.
    :param context_dim: width of the context (0: none).
    :param output_init_scale: the output layer's initial weights and bias are
        torch's default ones times this factor (default ``1e-2``): the flow
        starts near the identity, where a solve takes the fewest steps.

    ``forward(x, t, context=None)`` is :math:`f` itself, for points ``x`` of
    shape ``(..., D)`` at a scalar time ``t``. A solver calls :meth:`prepare`
    once and then :meth:`velocity` (or one of the ``velocity_and_*``
    methods) at every evaluation, on a flat batch ``(N, D)``.

    Example::

        >>> net = ODENet(3, (16, 16), context_dim=2)
        >>> net(torch.randn(5, 3), 0.5, torch.randn(5, 2)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        context_dim: int = 0,
        output_init_scale: float = 1e-2,
    ):
        super().__init__()
        self.input_dim = check_input_dim(input_dim)
        self.context_dim = check_count("context_dim", context_dim, minimum=0)
        self.hidden_dims = tuple(check_hidden_dims(hidden_dims))
        check_positive("output_init_scale", output_init_scale)
        widths = [input_dim, *self.hidden_dims]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(widths[-1], input_dim)
        with torch.no_grad():
            self.output.weight.mul_(output_init_scale)
            self.output.bias.mul_(output_init_scale)
        # One linear map from e = (t, c) to every gate, every hidden shift and the output shift.
        self._total = sum(self.hidden_dims)
        self.hyper = nn.Linear(1 + context_dim, 2 * self._total + input_dim)

    @property
    def has_closed_form_trace(self) -> bool:
        """Whether :meth:`velocity_and_trace` applies (at most two hidden layers)."""
        return len(self.hidden_dims) <= 2

    def prepare(self, context: torch.Tensor | None = None) -> Prepared:
        r"""What every evaluation of one solve shares, computed once: the
        time-independent part of the gates' and shifts' inputs :math:`A e + a`
        (the bias, plus the context's share when there is one: shape ``(K,)``
        without a context, ``context.shape[:-1] + (K,)`` with one), the column
        that multiplies :math:`t`, and the point-independent factor of the
        closed-form trace (``None`` for deeper networks)."""
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("this ODENet takes no context (context_dim=0), but one was given")
            embedding = self.hyper.bias
        elif context is None:
            raise ValueError(f"this ODENet needs a context of width {self.context_dim}, got none")
        else:
            embedding = F.linear(context, self.hyper.weight[:, 1:], self.hyper.bias)
        depth, w_out = len(self.layers), self.output.weight
        cycle = None
        if depth == 0:
            cycle = torch.diagonal(w_out).sum()
        elif depth == 1:
            cycle = (self.layers[0].weight * w_out.T).sum(-1)  # diag(W1 W2), shape (H1,)
        elif depth == 2:
            cycle = self.layers[1].weight * (self.layers[0].weight @ w_out).T  # W2 * (W1 W3)^T, (H2, H1)
        return Prepared(embedding, self.hyper.weight[:, 0], cycle)

    def _hidden(self, t: torch.Tensor, x: torch.Tensor, prepared: Prepared, slopes: list | None):
        """The last hidden layer's output and the output shift at time ``t``
        (each hidden layer's slopes :math:`d_l` appended to ``slopes``)."""
        hyper = prepared.embedding + t * prepared.time_column
        total = self._total
        gates = torch.sigmoid(hyper[..., :total])
        h, offset = x, 0
        for layer, width in zip(self.layers, self.hidden_dims):
            gate = gates[..., offset : offset + width]
            shift = hyper[..., total + offset : total + offset + width]
            h = torch.tanh(torch.addcmul(shift, F.linear(h, layer.weight, layer.bias), gate))
            if slopes is not None:
                slopes.append(torch.addcmul(gate, gate * h, h, value=-1))  # gate * (1 - h^2)
            offset += width
        return h, hyper[..., 2 * total :]

    def _output(self, h: torch.Tensor, out_shift: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.output.weight, self.output.bias) + out_shift

    def velocity(self, t: torch.Tensor, x: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """:math:`f(x, t)` for points ``x`` of shape ``(N, D)`` (any batch the prepared context broadcasts against)."""
        return self._output(*self._hidden(t, x, prepared, None))

    def velocity_and_trace(
        self, t: torch.Tensor, x: torch.Tensor, prepared: Prepared
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`f(x, t)` and the exact :math:`\operatorname{tr}\,\partial f/\partial x`
        (shape ``x.shape[:-1]``) in about one pass, for at most two hidden
        layers (:attr:`has_closed_form_trace`; formulas in :mod:`pyro_nflows.nn.ode`)."""
        if prepared.cycle is None:
            raise NotImplementedError(
                f"the closed-form trace needs at most two hidden layers, this ODENet has {len(self.hidden_dims)}: "
                "take the diagonal of velocity_and_jacobian instead"
            )
        slopes = []
        velocity = self._output(*self._hidden(t, x, prepared, slopes))
        if not slopes:
            trace = prepared.cycle.expand(x.shape[:-1])
        elif len(slopes) == 1:
            trace = slopes[0] @ prepared.cycle
        else:
            trace = torch.linalg.vecdot(slopes[0] @ prepared.cycle.T, slopes[1])
        return velocity, trace

    def velocity_and_jacobian(
        self, t: torch.Tensor, x: torch.Tensor, prepared: Prepared
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`f(x, t)` and :math:`\partial f/\partial x` (shape ``x.shape + (D,)``,
        entry ``[..., i, j]`` :math:`= \partial f_i/\partial x_j`), any depth:
        the :math:`D` columns pushed forward through the layers together."""
        slopes = []
        velocity = self._output(*self._hidden(t, x, prepared, slopes))
        jacobian = None  # the Jacobian of the current layer's output, (..., H_l, D)
        for layer, slope in zip(self.layers, slopes):
            product = layer.weight if jacobian is None else layer.weight @ jacobian
            jacobian = slope.unsqueeze(-1) * product
        if jacobian is None:
            return velocity, self.output.weight.expand(x.shape + (self.input_dim,))
        return velocity, self.output.weight @ jacobian

    def velocity_and_vjp(
        self, t: torch.Tensor, x: torch.Tensor, prepared: Prepared, vector: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`f(x, t)` and :math:`v^\top \partial f/\partial x` for vectors ``v``
        of ``x``'s shape, any depth: one backward sweep through the layers."""
        slopes = []
        velocity = self._output(*self._hidden(t, x, prepared, slopes))
        product = vector @ self.output.weight
        for layer, slope in zip(reversed(self.layers), reversed(slopes)):
            product = (product * slope) @ layer.weight
        return velocity, product

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() != 0:
            raise ValueError(f"t must be a scalar time, got a tensor of shape {tuple(t.shape)}")
        return self.velocity(t, x, self.prepare(context))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, hidden_dims={self.hidden_dims}, context_dim={self.context_dim}"
