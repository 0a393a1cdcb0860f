r"""MADE: a masked autoencoder whose outputs for coordinate :math:`i` depend
only on the coordinates before :math:`i` in a chosen order (Germain et al. [1]).

Every unit carries a *degree*. Input :math:`i` has degree
:math:`d_i \in \{1, \dots, D\}`, its position in the ordering; a hidden unit
of degree :math:`d` may see inputs of degree :math:`\le d` (through the units
of the layers before it, also of degree :math:`\le d`); the outputs of input
:math:`i` see hidden units of degree :math:`< d_i`. Hidden degrees run over
:math:`1 .. D-1` (from :math:`0` when there is a context: degree-0 units see
only the context, so even the first coordinate is conditioned on it). The
context, when there is one, feeds every unit of the first layer.

**Sorted degrees, and one-pass inversion.** Here every hidden layer's units
are *sorted by degree*, so the units of degree :math:`d` are one contiguous
block in every layer (inputs and outputs keep the caller's coordinate order,
so the ordinary forward pass needs no gathers). An autoregressive
flow's sequential direction computes coordinate :math:`k` from the
parameters that coordinates :math:`< k` produce. Done naively (Pyro, zuko,
nflows) that is one full network pass per coordinate, :math:`D` passes. But
a unit of degree :math:`d` depends only on inputs of degree :math:`\le d`:
once coordinate :math:`d` is final, the degree-:math:`d` block of every layer
is final too, and never changes again. :meth:`MADE.invert` therefore
computes each block exactly once, when it becomes final: the whole inversion
costs the arithmetic of about one network pass, in :math:`D` small steps.
:meth:`MADE.invert_reference` is the naive loop, kept as the reference.

References:

[1] Mathieu Germain, Karol Gregor, Iain Murray, Hugo Larochelle. MADE: Masked
    Autoencoder for Distribution Estimation. arXiv:1502.03509
[2] George Papamakarios, Theo Pavlakou, Iain Murray. Masked Autoregressive
    Flow for Density Estimation. arXiv:1705.07057
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pyro_nflows.validation import check_count, check_event, check_hidden_dims, check_positive

__all__ = ["MADE"]

# Up to this many points, the in-place sequential path runs on one thread
# (measured: benchmarks/README.md#one-thread-sampling).
SINGLE_THREAD_MAX_POINTS = 4096


@contextlib.contextmanager
def _one_thread_for_small_batches(count: int) -> Iterator[None]:
    """torch's intra-op threads set to 1 while the in-place sequential path
    runs on at most ``SINGLE_THREAD_MAX_POINTS`` points, restored after.

    Each step's matrix products are small (a block of a few hidden units by
    ``count`` points), so up to a few thousand points a second thread costs
    more in hand-over than it saves (measured:
    benchmarks/README.md#one-thread-sampling). The setting is process-wide,
    so torch work running meanwhile in another Python thread also gets one
    thread for that time.
    """
    threads = torch.get_num_threads()
    if threads == 1 or count > SINGLE_THREAD_MAX_POINTS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ordering(input_dim: int, ordering) -> torch.Tensor:
    """The coordinates in the order they are generated."""
    if isinstance(ordering, str):
        if ordering == "natural":
            return torch.arange(input_dim)
        if ordering == "reversed":
            return torch.arange(input_dim - 1, -1, -1)
        raise ValueError(f"ordering must be 'natural', 'reversed' or a permutation tensor, got {ordering!r}")
    order = torch.as_tensor(ordering).long()
    if order.dim() != 1 or not torch.equal(torch.sort(order).values, torch.arange(input_dim)):
        raise ValueError(f"ordering must hold each of 0 .. {input_dim - 1} once, got {order.tolist()}")
    return order


def _hidden_degrees(width: int, low: int, high: int) -> torch.Tensor:
    """``width`` degrees spread evenly over ``low .. high``, sorted."""
    if high < low:
        return torch.full((width,), low, dtype=torch.long)
    return low + (torch.arange(width) * (high - low + 1)) // width


class MADE(nn.Module):
    r"""A masked MLP giving ``param_dim`` parameters per coordinate, each
    depending only on the coordinates before it in ``ordering``.

    :param input_dim: :math:`D`.
    :param hidden_dims: widths of the hidden layers.
    :param param_dim: parameters per coordinate :math:`P` (2 for an affine map).
    :param context_dim: width of an optional context that feeds every unit of
        the first layer.
    :param ordering: ``"natural"``, ``"reversed"`` or a permutation of
        ``0 .. D-1`` (the order in which coordinates are generated).
    :param output_init_scale: the output layer starts at torch's default
        initialisation times this factor, with zero biases. The default,
        1e-2, makes a flow built on the MADE start near the identity.

    ``forward(x, context=None)`` returns shape ``x.shape[:-1] + (D, P)``,
    coordinates in their original order.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        param_dim: int,
        context_dim: int | None = None,
        ordering="natural",
        nonlinearity: Callable[[torch.Tensor], torch.Tensor] = F.relu,
        output_init_scale: float = 1e-2,
    ):
        super().__init__()
        self.input_dim = check_count("input_dim", input_dim)
        self.param_dim = check_count("param_dim", param_dim)
        self.context_dim = None if context_dim is None else check_count("context_dim", context_dim)
        hidden_dims = check_hidden_dims(hidden_dims)
        if not hidden_dims:
            raise ValueError("MADE needs at least one hidden layer")
        output_init_scale = check_positive("output_init_scale", output_init_scale)
        self.nonlinearity = nonlinearity
        order = _ordering(input_dim, ordering)
        self.register_buffer("order", order)
        self.register_buffer("inverse_order", torch.argsort(order))

        # Degrees. Inputs and outputs stay in the caller's coordinate order
        # (coordinate i has degree position(i) + 1), so forward() needs no
        # gathers; hidden units are sorted by degree, so the units of one
        # degree are a contiguous block (see invert()).
        low = 0 if context_dim is not None else 1
        input_degrees = torch.argsort(order) + 1
        degrees = [input_degrees] + [_hidden_degrees(h, low, input_dim - 1) for h in hidden_dims]
        output_degrees = input_degrees.repeat_interleave(param_dim)

        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        sizes = [input_dim] + hidden_dims + [input_dim * param_dim]
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layer = nn.Linear(fan_in, fan_out)
            if index == len(hidden_dims):  # the output layer starts small: flows start near the identity
                layer.weight.data.mul_(output_init_scale)
                layer.bias.data.zero_()
            self.weights.append(layer.weight)
            self.biases.append(layer.bias)
            if index < len(hidden_dims):
                mask = degrees[index + 1][:, None] >= degrees[index][None, :]
            else:
                mask = output_degrees[:, None] > degrees[-1][None, :]
            self.register_buffer(f"mask{index}", mask.to(torch.get_default_dtype()))
        self.context_weight = None
        if context_dim is not None:
            self.context_weight = nn.Parameter(nn.Linear(context_dim, hidden_dims[0]).weight.data.clone())

        # For invert(): where the block of each degree ends in each layer,
        # ends[l][d] = number of units of hidden layer l with degree <= d, and
        # the output rows of the coordinates in generation order.
        self._ends = [
            torch.searchsorted(degree, torch.arange(input_dim + 1), right=True).tolist() for degree in degrees[1:]
        ]
        self.register_buffer("sorted_rows", (order[:, None] * param_dim + torch.arange(param_dim)).flatten())

    def masked_weights(self) -> list[torch.Tensor]:
        return [weight * getattr(self, f"mask{i}") for i, weight in enumerate(self.weights)]

    def _context_term(self, context: torch.Tensor | None, batch: torch.Size) -> torch.Tensor | None:
        if self.context_dim is None:
            if context is not None:
                raise ValueError("this MADE was built without a context; pass context_dim to use one")
            return None
        if context is None:
            raise ValueError(f"this MADE needs a context of width {self.context_dim}")
        check_event(context, self.context_dim, "MADE", "context")
        return F.linear(context, self.context_weight).expand(batch + (self.context_weight.shape[0],))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        check_event(x, self.input_dim, "MADE")
        weights = self.masked_weights()
        h = x
        for index, (weight, bias) in enumerate(zip(weights, self.biases)):
            h = F.linear(h, weight, bias)
            if index == 0:
                term = self._context_term(context, x.shape[:-1])
                if term is not None:
                    h = h + term
            if index < len(weights) - 1:
                h = self.nonlinearity(h)
        return h.reshape(h.shape[:-1] + (self.input_dim, self.param_dim))

    def invert(
        self,
        w: torch.Tensor,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        context: torch.Tensor | None = None,
        step_into: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        r"""Solve :math:`u_i = \mathrm{step}(w_i, \theta_i(u_{<i}))` for
        :math:`u`, where :math:`\theta = \mathrm{MADE}(u)`, in about one
        network pass of arithmetic (see the module docstring).

        :param w: shape ``(..., D)``.
        :param step: ``step(w_i, theta_i)`` with ``w_i`` of shape ``(B,)`` and
            ``theta_i`` of shape ``(B, P)`` returns ``u_i`` of shape ``(B,)``.
        :param context: optional, broadcasting against ``w``'s batch shape.
        :param step_into: optional in-place version of ``step`` for the path
            without gradients: ``step_into(w_i, theta, out)`` with ``theta`` of
            its ``P`` rows of shape ``(B,)`` (scratch space it may overwrite) writes ``u_i``
            into ``out``. At small sizes a step costs its number of operations,
            so this is worth having for the common maps (see ``AffineMap``).

        Without gradients, every block is written in place into preallocated
        activations; the weight blocks and buffer views are built once and kept
        while no parameter changes (repeated sampling pays for them once). With
        gradients, the blocks are kept as separate tensors joined by ``cat``,
        so that autograd sees every step.
        """
        check_event(w, self.input_dim, "MADE")
        batch = w.shape[:-1]
        flat_w = w.reshape(-1, self.input_dim)
        count = flat_w.shape[0]
        term = self._context_term(context, batch)
        context_term = None if term is None else term.reshape(count, -1).mT  # (H1, B)
        if torch.is_grad_enabled():
            # (D, B), rows in generation order (index_select rather than plain
            # indexing; measured: benchmarks/README.md#made-invert-steps)
            rows = flat_w.mT.index_select(0, self.order)
            u = self._invert_tracked(rows, step, context_term, self._plan())
        else:
            columns = flat_w.unbind(-1)  # read in place: no transposed copy
            with _one_thread_for_small_batches(count):
                u = self._invert_in_place([columns[i] for i in self.order.tolist()], step, context_term, step_into)
        return u.mT.index_select(1, self.inverse_order).reshape(w.shape)

    def _plan(self) -> list:
        """For each coordinate k in generation order: the hidden blocks that
        become final at step k, as ``(layer, start, end, below, weight, bias)``
        (units ``start:end`` of ``layer`` read the first ``below`` rows of the
        layer before), and the output rows ``(below, weight, bias)`` of
        coordinate k."""
        weights = self.masked_weights()
        weights[0] = weights[0][:, self.order]
        weights[-1] = weights[-1][self.sorted_rows]
        biases = [bias[:, None] for bias in self.biases]
        biases[-1] = biases[-1][self.sorted_rows]
        plan = []
        for k in range(self.input_dim):
            blocks = []
            for layer, ends in enumerate(self._ends):
                start, end = (ends[k - 1] if k > 0 else 0), ends[k]
                if end > start:
                    below = k if layer == 0 else self._ends[layer - 1][k]
                    blocks.append(
                        (layer, start, end, below, weights[layer][start:end, :below], biases[layer][start:end])
                    )
            below = self._ends[-1][k]
            rows = slice(k * self.param_dim, (k + 1) * self.param_dim)
            plan.append((blocks, (below, weights[-1][rows, :below], biases[-1][rows])))
        return plan

    def _workspace(self, count: int, like: torch.Tensor) -> tuple:
        """Activation buffers for ``count`` points and, per step, the views of
        them each block reads and writes, with the plan's weight blocks: built
        once and kept while the parameters, dtype, device and batch size stay."""
        key = (count, like.dtype, like.device) + tuple((p.data_ptr(), p._version) for p in self.parameters())
        if getattr(self, "_workspace_key", None) == key:
            return self._workspace_cache
        inputs = like.new_empty(self.input_dim, count)
        hidden = [like.new_empty(weight.shape[0], count) for weight in self.weights[:-1]]
        theta = like.new_empty(self.param_dim, count)
        steps = []
        for blocks, (below, weight, bias) in self._plan():
            operations = [
                (
                    layer,
                    start,
                    end,
                    block_weight,
                    block_bias,
                    (inputs if layer == 0 else hidden[layer - 1])[:rows],
                    hidden[layer][start:end],
                )
                for layer, start, end, rows, block_weight, block_bias in blocks
            ]
            steps.append((operations, weight, bias, hidden[-1][:below]))
        self._workspace_cache = (inputs, inputs.unbind(0), theta, theta.unbind(0), theta.mT, steps)
        self._workspace_key = key
        return self._workspace_cache

    def __getstate__(self) -> dict:
        """Copies and pickles leave the sampling workspace behind: it holds
        views of the parameters taken under ``no_grad``, which a copy would
        detach from the copied parameters (and ``copy.deepcopy`` refuses once
        the parameters have been updated in place)."""
        state = self.__dict__.copy()
        state.pop("_workspace_cache", None)
        state.pop("_workspace_key", None)
        return state

    def _invert_in_place(self, w_rows, step, context_term, step_into) -> torch.Tensor:
        """``w_rows``: the D coordinates of ``w`` in generation order, shape ``(B,)`` each."""
        inputs, input_rows, theta, theta_rows, theta_by_point, steps = self._workspace(w_rows[0].shape[0], w_rows[0])
        relu = self.nonlinearity is F.relu
        for w_k, u_k, (operations, weight, bias, last) in zip(w_rows, input_rows, steps):
            for layer, start, end, block_weight, block_bias, source, target in operations:
                if layer == 0 and context_term is not None:
                    block_bias = block_bias + context_term[start:end]
                torch.addmm(block_bias, block_weight, source, out=target)
                if relu:
                    target.relu_()
                else:
                    target.copy_(self.nonlinearity(target))
            torch.addmm(bias, weight, last, out=theta)
            if step_into is None:
                u_k.copy_(step(w_k, theta_by_point))
            else:
                step_into(w_k, theta_rows, u_k)
        return inputs  # invert() copies it out before the buffers are reused

    def _invert_tracked(self, flat_w, step, context_term, plan) -> torch.Tensor:
        inputs: list[torch.Tensor] = []
        hidden: list[list[torch.Tensor]] = [[] for _ in self.weights[:-1]]

        def joined(blocks: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(blocks) if blocks else flat_w.new_zeros(0, flat_w.shape[1])

        for k, (blocks, (_below, weight, bias)) in enumerate(plan):
            for layer, start, end, _rows, block_weight, block_bias in blocks:
                source = joined(inputs if layer == 0 else hidden[layer - 1])
                if layer == 0 and context_term is not None:
                    block_bias = block_bias + context_term[start:end]
                hidden[layer].append(self.nonlinearity(torch.addmm(block_bias, block_weight, source)))
            theta = torch.addmm(bias, weight, joined(hidden[-1]))
            inputs.append(step(flat_w[k], theta.mT)[None, :])
        return torch.cat(inputs)

    def invert_reference(
        self,
        w: torch.Tensor,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same solution as :meth:`invert` by the naive loop: one full
        network pass per coordinate (what other libraries do)."""
        flat_w = w.reshape(-1, self.input_dim)
        flat_context = (
            None if context is None else context.expand(w.shape[:-1] + context.shape[-1:]).reshape(flat_w.shape[0], -1)
        )
        u = torch.zeros_like(flat_w)
        for k in self.order.tolist():
            theta = self.forward(u, flat_context)[:, k, :]
            u = u.clone()
            u[:, k] = step(flat_w[:, k], theta)
        return u.reshape(w.shape)
