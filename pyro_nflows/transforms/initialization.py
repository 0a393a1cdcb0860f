"""Data-dependent initialisation, shared by the element-wise and image
activation normalisations (:class:`~pyro_nflows.transforms.elementwise.ActNorm`,
:class:`~pyro_nflows.transforms.glow_flow.ActNorm2d`).

References:

[1] Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with
    Invertible 1x1 Convolutions. arXiv:1807.03039
"""

from __future__ import annotations

import torch

__all__ = ["ActNormInitialization"]


class ActNormInitialization:
    r"""Activation normalisation's data-dependent initialisation (Glow, Kingma & Dhariwal 2018, arXiv:1807.03039),
    for a module :math:`y = x e^{s} + t` whose parameters ``log_scale`` and
    ``shift`` hold one entry per column of :meth:`_initialization_points`:
    the first batch that passes through it, in either direction, sets them
    so that this batch comes out with zero mean and unit variance per column.

    :class:`ActNorm` standardises each coordinate; the image layer
    :class:`~pyro_nflows.transforms.glow_flow.ActNorm2d` each channel (its
    :meth:`_initialization_points` are the pixels). A module lists it
    before the class of its affine map and calls :meth:`_init_initialization`
    in ``__init__``; its ``_call`` and ``_inverse`` initialise, then run that map.
    """

    # What a column of _initialization_points is, for the error messages.
    _initialization_unit = "coordinates"

    def _init_initialization(self) -> None:
        self.register_buffer("initialized", torch.tensor(False))
        # A Python copy of the flag, so that a call does not read the buffer
        # (on a GPU, reading it would wait for the device at every call).
        self._known_initialized = False

    def _initialization_points(self, data: torch.Tensor) -> torch.Tensor:
        """``data`` as rows of shape ``(n, coordinates)``."""
        return data.reshape(-1, self.input_dim)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = bool(self.initialized)

    def _ensure_initialized(self, batch: torch.Tensor, direction: str) -> None:
        if not self._known_initialized:
            if not self.initialized:
                self.initialize(batch, direction)
            self._known_initialized = True

    # Each direction initialises first, then runs the affine map of the class after this one in the MRO.

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure_initialized(x, "forward")
        return super()._call(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._ensure_initialized(y, "inverse")
        return super()._inverse(y)

    @torch.no_grad()
    def initialize(self, data: torch.Tensor, direction: str = "forward") -> None:
        """Set scale and shift so that ``data`` mapped in ``direction``
        (``"forward"`` or ``"inverse"``) has zero mean and unit variance."""
        self._check(data, "initialisation batch")
        points = self._initialization_points(data)
        who = type(self).__name__
        if points.shape[0] < 2:
            raise ValueError(
                f"{who} is initialised from the first batch that passes through it and "
                f"needs at least 2 points, got a tensor of shape {tuple(data.shape)}; "
                "pass a batch first, or call initialize(data) with a batch"
            )
        mean, std = points.mean(0), points.std(0)
        constant = torch.nonzero(std == 0).flatten().tolist()
        if constant:
            raise ValueError(
                f"{who} cannot initialise from a batch in which {self._initialization_unit} {constant} "
                "are constant (their scale would be infinite)"
            )
        if direction == "forward":  # y = e^s x + t standardised: e^s = 1/std, t = -mean/std
            self.log_scale.copy_(-std.log())
            self.shift.copy_(-mean / std)
        elif direction == "inverse":  # x = e^{-s} (y - t) standardised: e^s = std, t = mean
            self.log_scale.copy_(std.log())
            self.shift.copy_(mean)
        else:
            raise ValueError(f"direction must be 'forward' or 'inverse', got {direction!r}")
        self.initialized.fill_(True)
        self._known_initialized = True
