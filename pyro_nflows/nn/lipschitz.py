r"""Lipschitz networks: the residual branch :math:`g` of an invertible residual flow.

:class:`LipschitzMLP` is an MLP :math:`g = L_K \circ \phi \circ L_{K-1} \circ \dots \circ \phi \circ L_1`
whose linear layers :math:`L_k(h) = \hat W_k h + b_k` (:class:`LipschitzLinear`) each have
spectral norm at most :math:`c` and whose activation :math:`\phi` (:class:`LipSwish`) is
1-Lipschitz, so that :math:`\operatorname{Lip}(g) \le c^K \le c`. A context, when there is
one, shifts the pre-activations of every layer by a linear function of it; the shifts do not
depend on :math:`x`, so :math:`g(\cdot, \text{context})` keeps the bound in :math:`x`.

**Induced spectral normalisation** (Behrmann et al. [1], Chen et al. [2]). Each layer's
weight is the parametrization

.. math:: \hat W = W / \max\bigl(1, \hat\sigma(W) / c\bigr), \qquad \hat\sigma(W) = u^\top W v,

which leaves a weight whose spectral norm is already below :math:`c` alone and scales a
larger one down to :math:`c`. Torch's ``spectral_norm`` divides by :math:`\sigma` always,
i.e. it fixes the norm at 1 (:math:`W / \sigma`): it can neither set the constant
:math:`c < 1` that invertibility needs nor leave smaller weights alone, so
:class:`InducedSpectralNorm` is our own parametrization, registered with torch's machinery
(``torch.nn.utils.parametrize``). The gradient treats :math:`u, v` as constants, as
torch's does; then :math:`\partial\hat\sigma/\partial W = u v^\top`, the exact derivative
of :math:`\sigma` when :math:`u, v` are the top singular vectors.

The vectors :math:`u, v` are buffers (``state_dict`` saves them). They are refreshed only
when the weight has changed (its in-place version counter, as after an optimiser step or
``load_state_dict``, or its storage) or the mode has, never by merely using the layer, so a
forward pass, an inverse and a log-determinant taken between two updates all see one and
the same :math:`\hat W`. At each refresh:

- a matrix whose smaller side is at most ``exact_size`` (default 128), in either mode, and
  every matrix in evaluation mode, gets its exact top singular vectors from an SVD
  (``torch.linalg.svd``): then :math:`\hat\sigma = \sigma(W)` and the bound holds to
  rounding. For such matrices an SVD costs little next to a training step, and power
  iteration is not enough: it is warm-started from the last step's vectors, but the
  optimiser moves the weights' top singular directions faster than one or a few steps
  follow, and :math:`u^\top W v` only bounds :math:`\sigma(W)` below (benchmarks/README.md#residual-spectral-norm);
- a larger matrix in training mode gets ``n_power_iterations`` steps of power iteration
  (:math:`u \leftarrow Wv / |Wv|`, :math:`v \leftarrow W^\top u / |W^\top u|`, default 1, as
  Miyato et al. [3] and torch), warm-started from the saved vectors; the bound then holds
  only up to the iteration's lag (raise ``n_power_iterations``, or use evaluation mode,
  where it is exact).

Construction starts from the exact vectors too.

**LipSwish** (Chen et al. [2]): :math:`\phi(z) = z\, \operatorname{sigmoid}(\beta z) / 1.1`
with :math:`\beta = \max(\operatorname{softplus}(\beta'), 10^{-3})` learnable, one per unit. Its
derivative :math:`(s + \beta z\, s(1 - s)) / 1.1`, :math:`s = \operatorname{sigmoid}(\beta z)`,
lies in :math:`(-0.1, 1)` for every :math:`\beta` (:math:`\max_t \frac{d}{dt} t\,
\operatorname{sigmoid}(t) = 1.0998\ldots < 1.1`), so :math:`\phi` is 1-Lipschitz. Unlike
ReLU's, its derivative is smooth (the log-determinant's gradient differentiates it); unlike
:math:`\tanh`'s, it does not vanish for large inputs, so a layer can keep its Jacobian
near the bound.

:math:`\beta` is kept at least ``1e-3`` (``BETA_FLOOR``; there :math:`\phi` is already
within half a percent of the linear :math:`z / 2.2` on :math:`|z| < 10`), so that it can be folded into the
weights: with :math:`D_k = \operatorname{diag}(\beta_k)`,
:math:`\phi(z) = \operatorname{silu}(D_k z) D_k^{-1} / 1.1`, so the layer
:math:`D_k \hat W_k h + D_k b_k` feeds one fused ``silu`` whose :math:`D_k^{-1} / 1.1` is
folded into the columns of :math:`\hat W_{k+1}` (:meth:`LipschitzMLP.function`). The
function is the same; each hidden layer costs one activation kernel, forward and backward,
instead of four.

Cost: one pass of :math:`g` is one ordinary MLP pass (the normalised, folded weights are
computed once per call, :meth:`LipschitzMLP.function`); a weight update adds one SVD per
layer, or ``n_power_iterations`` matrix-vector product pairs for a large matrix in training.

References:

[1] Jens Behrmann, Will Grathwohl, Ricky T. Q. Chen, David Duvenaud, Jörn-Henrik
    Jacobsen. Invertible Residual Networks. ICML 2019. arXiv:1811.00995
[2] Ricky T. Q. Chen, Jens Behrmann, David Duvenaud, Jörn-Henrik Jacobsen. Residual
    Flows for Invertible Generative Modeling. NeurIPS 2019. arXiv:1906.02735
[3] Takeru Miyato, Toshiki Kataoka, Masanori Koyama, Yuichi Yoshida. Spectral
    Normalization for Generative Adversarial Networks. ICLR 2018. arXiv:1802.05957
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pyro_nflows.validation import check_count, check_hidden_dims, check_input_dim, check_positive

__all__ = ["InducedSpectralNorm", "LipSwish", "LipschitzFunction", "LipschitzLinear", "LipschitzMLP"]

# max_t d/dt [t sigmoid(t)] = 1.0998 (at t = 2.3994): dividing by 1.1 makes LipSwish 1-Lipschitz.
LIPSWISH_DIVISOR = 1.1
# The least beta of LipSwish: 1 / beta is folded into the next layer's weights (see above).
BETA_FLOOR = 1e-3
# Matrices whose smaller side is at most this get exact singular vectors in training too.
EXACT_SIZE = 128


def _weight_key(weight: torch.Tensor, training: bool):
    """What identifies the weight the power-iteration vectors were computed for:
    its in-place version, its storage and the mode (``None`` where a tensor has
    no storage, e.g. under ``torch.func`` transforms: then always refresh)."""
    try:
        return weight._version, weight.data_ptr(), weight.dtype, training
    except (RuntimeError, NotImplementedError):
        return None


class InducedSpectralNorm(nn.Module):
    r"""The parametrization :math:`W \mapsto W / \max(1, \hat\sigma(W) / c)` of a matrix,
    :math:`\hat\sigma(W) = u^\top W v` (see the module docstring for how :math:`u, v` are kept).

    :param weight: the matrix it will parametrize (its shape, dtype and device, and the
        initial exact singular vectors).
    :param lipschitz: the bound :math:`c > 0` on the spectral norm.
    :param n_power_iterations: power-iteration steps per weight update in training mode,
        for a matrix larger than ``exact_size``.
    :param exact_size: matrices whose smaller side is at most this get exact singular
        vectors (an SVD) at every update, in training mode too.

    Register it with ``torch.nn.utils.parametrize.register_parametrization`` (as
    :class:`LipschitzLinear` does), or call it on a matrix.
    """

    def __init__(
        self, weight: torch.Tensor, lipschitz: float = 0.9, n_power_iterations: int = 1, exact_size: int = EXACT_SIZE
    ):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"InducedSpectralNorm parametrizes matrices, got a weight of shape {tuple(weight.shape)}")
        self.lipschitz = check_positive("lipschitz", lipschitz)
        self.n_power_iterations = check_count("n_power_iterations", n_power_iterations)
        self.exact_size = check_count("exact_size", exact_size, minimum=0)
        u, v = _top_singular_vectors(weight.detach())
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self._key = None

    def update(self, weight: torch.Tensor) -> None:
        """Bring :math:`u, v` up to date for ``weight``: nothing if it has not changed
        since the last update (nor the mode), else an exact SVD or, for a matrix larger than
        ``exact_size`` in training mode, ``n_power_iterations`` power-iteration steps."""
        key = _weight_key(weight, self.training)
        if key is not None and key == self._key:
            return
        matrix = weight.detach()
        if not bool(torch.isfinite(matrix).all()):
            return  # a diverged weight: let the NaN show in the outputs (an SVD would raise)
        with torch.no_grad():
            if self.training and min(matrix.shape) > self.exact_size:
                u, v = self.u, self.v
                for _ in range(self.n_power_iterations):
                    u = F.normalize(torch.mv(matrix, v), dim=0, eps=1e-12)
                    v = F.normalize(torch.mv(matrix.T, u), dim=0, eps=1e-12)
            else:
                u, v = _top_singular_vectors(matrix)
            self.u.copy_(u)
            self.v.copy_(v)
        self._key = key

    def is_current(self, weight: torch.Tensor) -> bool:
        """Whether :math:`u, v` were last updated for ``weight`` as it is now."""
        key = _weight_key(weight, self.training)
        return key is not None and key == self._key

    def mark_current(self, weight: torch.Tensor) -> None:
        """Declare :math:`u, v` up to date for ``weight`` (after both were loaded together)."""
        self._key = _weight_key(weight, self.training)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        r""":math:`\hat\sigma(W) = u^\top W v`, differentiable in ``weight`` (not in :math:`u, v`)."""
        # Clones: the buffers are updated in place later, and autograd saves what it multiplies.
        return torch.dot(self.u.clone(), torch.mv(weight, self.v.clone()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.update(weight)
        return weight / torch.clamp(self.sigma(weight) / self.lipschitz, min=1.0)

    def extra_repr(self) -> str:
        return f"lipschitz={self.lipschitz}, n_power_iterations={self.n_power_iterations}, exact_size={self.exact_size}"


def _top_singular_vectors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The left and right singular vectors of the largest singular value."""
    left, _, right = torch.linalg.svd(matrix, full_matrices=False)
    return left[:, 0].contiguous(), right[0].contiguous()


def _mark_loaded(module: "LipschitzLinear", incompatible_keys) -> None:
    """After ``load_state_dict``: the loaded vectors belong to the loaded weight,
    unless some power-iteration vector was missing from the state (then refresh)."""
    if not any(key.endswith(("weight.0.u", "weight.0.v")) for key in incompatible_keys.missing_keys):
        module.normalization.mark_current(module.parametrizations.weight.original)


class LipschitzLinear(nn.Linear):
    r"""A linear layer :math:`h \mapsto \hat W h + b` whose weight is parametrized by
    :class:`InducedSpectralNorm`, so that :math:`\|\hat W\|_2 \le c`.

    ``weight`` is the normalised matrix; the free one is
    ``parametrizations.weight.original``. Saved by ``state_dict`` (with the power-iteration
    vectors) and, unlike torch's parametrized modules, also picklable as a whole
    (``torch.save(module)``), as a guide holding a flow is. Loading, copying, pickling and
    converting (``.double()``) keep the vectors as they are: the result is the same map.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        lipschitz: float = 0.9,
        n_power_iterations: int = 1,
        exact_size: int = EXACT_SIZE,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        normalization = InducedSpectralNorm(self.weight, lipschitz, n_power_iterations, exact_size)
        parametrize.register_parametrization(self, "weight", normalization)
        self.register_load_state_dict_post_hook(_mark_loaded)

    @property
    def normalization(self) -> InducedSpectralNorm:
        return self.parametrizations.weight[0]

    def refresh(self) -> None:
        """Bring the power-iteration vectors up to date (see :meth:`InducedSpectralNorm.update`)."""
        self.normalization.update(self.parametrizations.weight.original)

    def _apply(self, fn, recurse=True):
        # A conversion (.double(), .to(device)) moves the weight to new storage: the
        # converted vectors still belong to it, so keep them current rather than re-iterate
        # (which would change the map slightly wherever power iteration has not converged).
        current = self.normalization.is_current(self.parametrizations.weight.original)
        result = super()._apply(fn, recurse)
        if current:
            self.normalization.mark_current(self.parametrizations.weight.original)
        return result

    def __deepcopy__(self, memo):
        # A copy is the same map: its vectors are current for its weight if ours were.
        replica = self.__new__(type(self))
        memo[id(self)] = replica
        replica.__dict__ = copy.deepcopy(self.__dict__, memo)
        if self.normalization.is_current(self.parametrizations.weight.original):
            replica.normalization.mark_current(replica.parametrizations.weight.original)
        return replica

    def __reduce_ex__(self, protocol):
        # Torch's parametrized modules refuse pickling (their class is made at run time):
        # rebuild from the constructor's arguments and the very same tensors.
        norm = self.normalization
        tensors = (self.parametrizations.weight.original, self.bias, norm.u, norm.v)
        config = (
            self.in_features, self.out_features, norm.lipschitz, norm.n_power_iterations, norm.exact_size, self.training
        )
        return _rebuild_lipschitz_linear, (config, tensors)


def _rebuild_lipschitz_linear(config, tensors) -> LipschitzLinear:
    in_features, out_features, lipschitz, n_power_iterations, exact_size, training = config
    original, bias, u, v = tensors
    layer = LipschitzLinear(
        in_features, out_features, bias is not None, lipschitz=lipschitz, n_power_iterations=n_power_iterations,
        exact_size=exact_size,
    )
    layer.parametrizations.weight.original = original
    layer.bias = bias
    layer.normalization.u, layer.normalization.v = u, v
    layer.train(training)
    layer.normalization.mark_current(original)
    return layer


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


def lipswish(z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    r""":math:`z\, \operatorname{sigmoid}(\beta z) / 1.1`, 1-Lipschitz for every :math:`\beta > 0`."""
    return z * torch.sigmoid(beta * z) / LIPSWISH_DIVISOR


def lipswish_derivative(z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    r""":math:`\phi'(z) = (s + \beta z\, s (1 - s)) / 1.1`, :math:`s = \operatorname{sigmoid}(\beta z)`."""
    s = torch.sigmoid(beta * z)
    return (s + beta * z * s * (1 - s)) / LIPSWISH_DIVISOR


class LipSwish(nn.Module):
    r"""The LipSwish activation of Residual Flows [2], :math:`z\, \operatorname{sigmoid}(\beta z) / 1.1`,
    with :math:`\beta = \max(\operatorname{softplus}(\beta'), 10^{-3})` learnable (one per
    unit, initialised to 1: Swish, scaled), 1-Lipschitz for every :math:`\beta`.

    :param size: the number of units (one :math:`\beta` each; 1 shares one).
    """

    def __init__(self, size: int = 1, beta: float = 1.0):
        super().__init__()
        self.raw_beta = nn.Parameter(torch.full((check_count("size", size),), _inverse_softplus(beta)))

    @property
    def beta(self) -> torch.Tensor:
        return F.softplus(self.raw_beta).clamp_min(BETA_FLOOR)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return lipswish(z, self.beta)


class LipschitzFunction:
    r"""One evaluation's worth of a :class:`LipschitzMLP`: :math:`g(x, s)` as a pure
    function of ``x`` and the context shift ``s`` (from :meth:`LipschitzMLP.shift`), with
    the normalised weights computed, and the LipSwish slopes folded into them, once (so
    that ``torch.func`` transforms and fixed-point iterations do not recompute them): each
    hidden layer is a linear map and one ``silu``. Made by :meth:`LipschitzMLP.function`.
    """

    def __init__(self, weights, biases, shift_sizes):
        self.weights, self.biases, self.shift_sizes = weights, biases, shift_sizes

    def _shifts(self, shift):
        if shift is None:
            return [None] * len(self.weights)
        return shift.split(self.shift_sizes, dim=-1)

    def __call__(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        h, last = x, len(self.weights) - 1
        for k, (weight, bias, layer_shift) in enumerate(zip(self.weights, self.biases, self._shifts(shift))):
            h = F.linear(h, weight, bias)
            if layer_shift is not None:
                h = h + layer_shift
            if k < last:
                h = F.silu(h)
        return h

    def value_and_jacobian(
        self, x: torch.Tensor, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`g(x)` and :math:`\partial g / \partial x` (shape ``x.shape + (D,)``), in one
        forward pass carrying the Jacobian (:math:`J \leftarrow W_k J`, then
        :math:`J \leftarrow \operatorname{diag}(\operatorname{silu}') J`, with the folded
        weights): traceable by ``torch.jit.trace``, which cannot trace ``torch.func`` transforms."""
        h, jacobian, last = x, None, len(self.weights) - 1
        for k, (weight, bias, layer_shift) in enumerate(zip(self.weights, self.biases, self._shifts(shift))):
            pre = F.linear(h, weight, bias)
            if layer_shift is not None:
                pre = pre + layer_shift
            jacobian = weight.expand(pre.shape[:-1] + weight.shape) if jacobian is None else weight @ jacobian
            if k < last:
                s = torch.sigmoid(pre)
                jacobian = (s * (1 + pre * (1 - s))).unsqueeze(-1) * jacobian
                h = pre * s
            else:
                h = pre
        return h, jacobian

    def detach(self) -> "LipschitzFunction":
        """The same function with every tensor detached (for computations that differentiate
        only in ``x``)."""
        return LipschitzFunction(
            [w.detach() for w in self.weights], [b.detach() for b in self.biases], self.shift_sizes
        )


class LipschitzMLP(nn.Module):
    r"""An MLP :math:`g(x, \text{context})` with :math:`\operatorname{Lip}_x(g) \le c^K`,
    :math:`K` the number of linear layers (``len(hidden_dims) + 1``).

    :param input_dim: the size of :math:`x`.
    :param hidden_dims: widths of the hidden layers (each followed by :class:`LipSwish`).
    :param output_dim: the size of :math:`g`'s output (default ``input_dim``).
    :param context_dim: width of the context, if any: it shifts the pre-activations of
        every layer by a linear function of it (unconstrained: it does not touch the bound in x).
    :param lipschitz: :math:`c`, the bound on each layer's spectral norm.
    :param n_power_iterations: power-iteration steps per weight update in training mode,
        for layers larger than ``exact_size``.
    :param exact_size: layers whose smaller side is at most this get exact singular
        vectors at every update (see :class:`InducedSpectralNorm`).

    Example::

        >>> g = LipschitzMLP(3, (16, 16), lipschitz=0.9)
        >>> a, b = torch.randn(100, 3), torch.randn(100, 3)
        >>> bool(((g(a) - g(b)).norm(dim=-1) <= g.lipschitz_bound * (a - b).norm(dim=-1)).all())
        True
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int | None = None,
        *,
        context_dim: int | None = None,
        lipschitz: float = 0.9,
        n_power_iterations: int = 1,
        exact_size: int = EXACT_SIZE,
    ):
        super().__init__()
        self.input_dim = check_input_dim(input_dim)
        self.output_dim = input_dim if output_dim is None else check_count("output_dim", output_dim)
        self.hidden_dims = tuple(check_hidden_dims(hidden_dims))
        self.context_dim = None if context_dim is None else check_count("context_dim", context_dim)
        self.lipschitz = check_positive("lipschitz", lipschitz)
        widths = (self.input_dim, *self.hidden_dims, self.output_dim)
        self.layers = nn.ModuleList(
            LipschitzLinear(a, b, lipschitz=lipschitz, n_power_iterations=n_power_iterations, exact_size=exact_size)
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.activations = nn.ModuleList(LipSwish(width) for width in self.hidden_dims)
        self._shift_sizes = list(widths[1:])
        self.context_shift = None if context_dim is None else nn.Linear(context_dim, sum(self._shift_sizes))

    @property
    def lipschitz_bound(self) -> float:
        r""":math:`c^K`, a bound on the Lipschitz constant of :math:`g` in :math:`x`."""
        return self.lipschitz ** len(self.layers)

    def refresh(self) -> None:
        """Bring every layer's power-iteration vectors up to date for its current weight."""
        for layer in self.layers:
            layer.refresh()

    def buffer_versions(self) -> tuple[int, ...]:
        """The version counters of the power-iteration vectors (they change with the weights)."""
        return tuple(b._version for layer in self.layers for b in (layer.normalization.u, layer.normalization.v))

    def _slopes(self) -> list[torch.Tensor]:
        """Each layer's output scale in :meth:`function`'s folded form: the next activation's
        :math:`\beta` for a hidden layer, 1 for the output layer."""
        betas = [activation.beta for activation in self.activations]
        return betas + [self.layers[-1].bias.new_ones(self.output_dim)]

    def function(self) -> LipschitzFunction:
        r""":math:`g` with the current normalised weights, as a pure function of ``(x, shift)``:
        layer :math:`k` is :math:`\operatorname{diag}(\beta_k) \hat W_k
        \operatorname{diag}(1 / (1.1 \beta_{k-1}))` and :math:`\beta_k b_k` (the module
        docstring's folding)."""
        slopes, weights, biases = self._slopes(), [], []
        for k, layer in enumerate(self.layers):
            weight = layer.weight
            if k > 0:
                weight = weight / (LIPSWISH_DIVISOR * slopes[k - 1])
            weights.append(slopes[k].unsqueeze(-1) * weight)
            biases.append(slopes[k] * layer.bias)
        return LipschitzFunction(weights, biases, self._shift_sizes)

    def shift(self, context: torch.Tensor | None) -> torch.Tensor | None:
        """The context's shifts of every layer's pre-activations, concatenated, in
        :meth:`function`'s folded form (each hidden layer's times its :math:`\beta`;
        ``None`` without a context)."""
        if context is None:
            if self.context_shift is not None:
                raise ValueError(f"this LipschitzMLP reads a context of width {self.context_dim}; pass one")
            return None
        if self.context_shift is None:
            raise ValueError("this LipschitzMLP has no context_dim; it takes no context")
        scale = torch.cat(self._slopes())
        return F.linear(context, scale.unsqueeze(-1) * self.context_shift.weight, scale * self.context_shift.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.function()(x, self.shift(context))

    def extra_repr(self) -> str:
        return f"lipschitz={self.lipschitz}"
