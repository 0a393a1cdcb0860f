r"""What the package's image transforms share: events of shape :math:`(C, H, W)`.

An image transform maps tensors of shape ``batch + (C, H, W)`` (``event_dim
= 3``, as Pyro's ``Normal(...).to_event(3)``) and its
``log_abs_det_jacobian`` has shape ``batch``: the log-determinant of the map
of the whole image, flattened. :class:`ImageTransform` is the base class of
the convolutional flows (:mod:`~pyro_nflows.transforms.conv`): the
:class:`~pyro_nflows.transforms.base.FlowTransform` cache and log-determinant
hand-over, with the event check of an image instead of a vector's, so that an
image with the wrong number of channels (or, where a layer needs it, an odd
height or width) gets a ``ValueError`` naming the shape expected.
"""

from __future__ import annotations

import torch
from torch.distributions import constraints

from pyro_nflows.transforms.base import FlowTransform
from pyro_nflows.validation import check_count

__all__ = ["IMAGE", "ImageTransform", "check_image", "flatten_batch", "image_shape"]

# The domain and codomain of every image transform.
IMAGE = constraints.independent(constraints.real, 3)


def image_shape(channels: int | None, even: bool = False) -> str:
    """The expected shape in words: ``"(..., 3, H, W)"``, with ``" with even H and W"`` if ``even``."""
    text = f"(..., {'C' if channels is None else channels}, H, W)"
    return text + " with even H and W" if even else text


def check_image(x: torch.Tensor, channels: int | None, who: str, what: str = "input", even: bool = False) -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor of shape ``(..., channels, H, W)``
    (any number of channels for ``channels=None``; even ``H`` and ``W`` if ``even``)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{who} expects a torch.Tensor {what}, got {type(x).__name__}")
    wrong = x.dim() < 3 or (channels is not None and x.shape[-3] != channels)
    if not wrong and even:
        wrong = x.shape[-2] % 2 == 1 or x.shape[-1] % 2 == 1
    if wrong:
        raise ValueError(
            f"{who} expects {what}s of shape {image_shape(channels, even)} (an image event, event_dim = 3), "
            f"got a tensor of shape {tuple(x.shape)}"
        )


def flatten_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """``x`` of shape ``batch + (C, H, W)`` as ``(N, C, H, W)`` (what ``torch.nn.functional``'s
    convolutions take), and ``batch``; ``flat.reshape(batch + flat.shape[1:])`` undoes it."""
    batch = x.shape[:-3]
    return x.reshape((-1,) + x.shape[-3:]), batch


class ImageTransform(FlowTransform):
    r"""Base class of the package's image transforms (``event_dim = 3``).

    A subclass sets the channels it takes and gives (``channels``, and
    ``out_channels`` where they differ; ``None`` for any) and whether it
    needs an even height and width on its input or output side
    (``even_input``, ``even_output``), and implements the directions as a
    :class:`~pyro_nflows.transforms.base.FlowTransform` does (``_call``,
    ``_inverse``, ``log_abs_det_jacobian``, or the joint
    ``_call_and_log_det`` / ``_inverse_and_log_det``), on tensors of shape
    ``batch + (C, H, W)``, with log-determinants of shape ``batch``.

    Every public call checks the image's shape (a ``ValueError`` naming the
    shape expected), its dtype against the parameters', and its batch shape
    against a conditioned transform's context.
    """

    domain = IMAGE
    codomain = IMAGE
    even_input = False
    even_output = False

    def __init__(self, channels: int | None, out_channels: int | None = None, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.channels = None if channels is None else check_count("channels", channels)
        self.out_channels = self.channels if out_channels is None else check_count("out_channels", out_channels)

    _event_dims = 3

    def _check_event(self, x: torch.Tensor, what: str) -> None:
        who = type(self).__name__
        if what == "output":
            check_image(x, self.out_channels, who, what, self.even_output)
        else:
            check_image(x, self.channels, who, what, self.even_input)

    def _zero_log_det(self, x: torch.Tensor) -> torch.Tensor:
        """A log-determinant of 0 for each image of ``x``."""
        return x.new_zeros(x.shape[:-3])

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
