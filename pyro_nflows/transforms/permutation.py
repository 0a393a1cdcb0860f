"""Pyro's :class:`~pyro.distributions.transforms.Permute`, made a module.

Pyro's ``Permute`` is a plain transform holding its permutation as an
attribute: it cannot sit in a :class:`~pyro.distributions.ComposeTransformModule`
(an ``nn.ModuleList``), and its permutation, random unless given, is not in any
``state_dict``, so a saved and reloaded flow would permute differently.
:class:`PermuteModule` keeps Pyro's maths (``_call``, ``_inverse``, the zero
log-determinant) and adds three things: it is a
:class:`~pyro.distributions.TransformModule`, the permutation is a buffer that
``state_dict`` saves, and inputs of the wrong width raise ``ValueError`` (Pyro's
would silently select a subset of a wider input).
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms import Permute

from pyro_nflows.transforms.base import FlowTransform
from pyro_nflows.validation import check_input_dim

__all__ = ["PermuteModule", "random_permutation"]


class PermuteModule(FlowTransform, Permute, TransformModule):
    """Permutes the coordinates of a vector, ``y = x[..., permutation]``;
    volume preserving, inverse by the inverse permutation.

    :param permutation: a 1-D tensor holding each of ``0 .. D-1`` once.
    """

    volume_preserving = True

    def __init__(self, permutation: torch.Tensor, cache_size: int = 1):
        permutation = torch.as_tensor(permutation)
        size = permutation.numel()
        if permutation.dim() != 1 or size < 1 or not torch.equal(
            torch.sort(permutation.long()).values, torch.arange(size)
        ):
            raise ValueError(f"permutation must hold each of 0 .. D-1 exactly once, got {permutation.tolist()}")
        super().__init__(permutation.long(), cache_size=cache_size)
        del self.permutation  # Permute stored it as a plain attribute; make it a buffer.
        self.register_buffer("permutation", permutation.long())
        self.input_dim = check_input_dim(size)

    @property
    def inv_permutation(self) -> torch.Tensor:
        # Recomputed (a cheap argsort) rather than Pyro's cached value, which
        # would go stale when load_state_dict replaces the permutation.
        return torch.argsort(self.permutation)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, permutation={self.permutation.tolist()}"


def random_permutation(input_dim: int, permutation: torch.Tensor | None = None, dim: int = -1) -> PermuteModule:
    """A :class:`PermuteModule` with the given permutation, or a random one:
    Pyro's ``permute(input_dim, permutation=None, dim=-1)`` as a module (only
    the last dimension, ``dim=-1``, is permuted here)."""
    check_input_dim(input_dim)
    if dim != -1:
        raise ValueError(
            f"dim={dim!r}: random_permutation permutes the last dimension (dim=-1); for another dimension use "
            "Pyro's permute(input_dim, permutation, dim=dim), whose permutation is not saved by state_dict"
        )
    if permutation is None:
        permutation = torch.randperm(input_dim)
    elif torch.as_tensor(permutation).numel() != input_dim:
        raise ValueError(
            f"permutation must have input_dim={input_dim} entries, got {torch.as_tensor(permutation).numel()}"
        )
    return PermuteModule(permutation)
