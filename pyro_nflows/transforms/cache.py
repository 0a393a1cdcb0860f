r"""The cache of a transform's recent ``(x, y)`` pairs (see :mod:`pyro_nflows.transforms.base`).

Torch's transforms remember the last pair only. A guide that reuses one
transform several times before its samples are scored, as the deep Markov
model's guide does (the same IAFs on every :math:`q(z_t \mid \dots)`, the
ELBO scoring :math:`z_1, \dots, z_T` after the guide has run), then inverts
every sample but the last. :class:`PairCache` remembers the latest pairs
instead, so each sample's inverse is its own input:

- keyed on the identity of the tensor a call *returned* (``id``), checked
  against a weak reference to it, so that a pair is forgotten as soon as that
  tensor is, and the cache never keeps a returned tensor (nor its graph) alive;
  it keeps the call's input until then, which the returned tensor's graph
  usually holds anyway;
- bounded twice: at most ``FlowTransform.max_cached_pairs`` pairs, and inputs
  of at most ``FlowTransform.max_cached_elements`` numbers in all, the oldest
  pairs going first (the newest is always kept, as torch's one-pair cache
  keeps it), so that a user who keeps many large batches of samples does not
  also keep every layer's inputs;
- valid for one state of the parameters only: every lookup passes the
  parameters' version counters, and a change empties the cache, so a value
  computed before an optimiser step is never returned after it;
- answering only the opposite direction (``t.inv(y)`` for a ``y = t(x)``,
  ``t(x)`` for an ``x = t.inv(y)``): a call in the same direction is computed
  afresh, so every tensor handed out is fresh or the caller's own;
- holding each call's log-determinant, when its computation gave one, for one
  ``log_abs_det_jacobian(x, y)`` of exactly that pair (then dropped, so that a
  value whose graph a ``backward`` freed is never handed out twice).

Cost: a dictionary lookup and a weak reference per call.

**Under** :func:`torch.compile` the cache is off (:func:`compiling`): a traced
call sees neither the identity of the tensors it will run on nor their version
counters, so each call computes, and its log-determinant is computed again
where it is asked for. A compiled function that samples and then scores its
own sample therefore runs the inverse; compile the two apart (or score by the
log-determinant of the forward pass) where the inverse is sequential.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["PairCache", "compiling"]


try:
    _is_compiling = torch.compiler.is_compiling
except AttributeError:  # pragma: no cover - torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling


def compiling() -> bool:
    """Whether the caller is being traced by :func:`torch.compile` (torch's
    ``torch.compiler.is_compiling``; ``torch._dynamo.is_compiling`` before torch 2.3)."""
    return _is_compiling()


@dataclass
class _Pair:
    returned: weakref.ref  # the tensor the call returned
    given: torch.Tensor  # the call's input
    forward: bool  # the call's direction
    log_det: torch.Tensor | None  # log|det dy/dx| at the pair, until taken
    elements: int  # given.numel(), counted once: the weak reference's callback touches no tensor


class PairCache:
    """The latest ``(input, output)`` pairs of a transform's calls, for one state of its
    parameters (module docstring)."""

    def __init__(self):
        self._pairs: OrderedDict[int, _Pair] = OrderedDict()
        self._versions: tuple | None = None
        self._elements = 0  # the numbers held in the kept inputs

    def __len__(self) -> int:
        return len(self._pairs)

    def clear(self) -> None:
        self._pairs.clear()
        self._versions, self._elements = None, 0

    def _current(self, versions: tuple) -> OrderedDict[int, _Pair]:
        if versions != self._versions:
            self.clear()
            self._versions = versions
        return self._pairs

    def _drop(self, key: int | None = None) -> None:
        """Forget the pair ``key`` (default: the oldest)."""
        pair = self._pairs.pop(key) if key is not None else self._pairs.popitem(last=False)[1]
        self._elements -= pair.elements

    def _find(self, returned: torch.Tensor, versions: tuple) -> _Pair | None:
        pair = self._current(versions).get(id(returned))
        return pair if pair is not None and pair.returned() is returned else None

    def input_of(self, value: torch.Tensor, forward: bool, versions: tuple) -> torch.Tensor | None:
        """The input of the kept call that returned ``value`` in the direction opposite
        to ``forward``, or ``None``."""
        pair = self._find(value, versions)
        return pair.given if pair is not None and pair.forward is not forward else None

    def add(
        self,
        given: torch.Tensor,
        returned: torch.Tensor,
        forward: bool,
        log_det: torch.Tensor | None,
        versions: tuple,
        max_pairs: int,
        max_elements: int,
    ) -> None:
        """Keep a call's pair, dropping the oldest beyond ``max_pairs`` pairs or
        ``max_elements`` numbers of input (never the new pair)."""
        pairs, key = self._current(versions), id(returned)
        if key in pairs:
            self._drop(key)
        pairs[key] = pair = _Pair(weakref.ref(returned, self._forget(key)), given, forward, log_det, given.numel())
        self._elements += pair.elements
        while len(pairs) > 1 and (len(pairs) > max_pairs or self._elements > max_elements):
            self._drop()

    def _forget(self, key: int):
        # The callback must not keep the cache alive, nor call into a tensor: it can run while
        # torch.jit.trace tears down its graph, where a tensor method is recorded (and crashed).
        cache = weakref.ref(self)

        def forget(reference: weakref.ref) -> None:
            kept = cache()
            pair = None if kept is None else kept._pairs.get(key)
            if pair is not None and pair.returned is reference:
                kept._drop(key)

        return forget

    def take_log_det(self, x: torch.Tensor, y: torch.Tensor, versions: tuple) -> torch.Tensor | None:
        """The log-determinant kept with the pair ``(x, y)`` (the same tensors), once."""
        for returned, given, forward in ((y, x, True), (x, y, False)):
            pair = self._find(returned, versions)
            if pair is not None and pair.forward is forward and pair.given is given and pair.log_det is not None:
                log_det, pair.log_det = pair.log_det, None
                return log_det
        return None
