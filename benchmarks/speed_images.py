"""Speed cases of the image flows (``event_dim = 3``): Glow's 1x1 convolution against Pyro's
``GeneralizedChannelPermute`` and nflows' ``OneByOneConvolution``, and the emerging and periodic
convolutions each way (no other library has them).

``benchmarks/speed.py`` runs them with its other cases (this module appends them to its
``CASES``); select them with ``python benchmarks/speed.py --filter conv``. Every case is a batch
of 16 images of 64 channels, 32 x 32 pixels, in float32.

- ``conv1x1 fwd+bwd``: ours ``conv1x1(64)`` (``W = P L U``, the LU form) computes ``y`` and the
  log-determinant ``H W sum(s)``, then backpropagates ``sum(y^2) + sum(ladj)``. Pyro's
  ``GeneralizedChannelPermute(64)`` is the same map (``P L U``, stored as one dense ``LU``
  matrix): it is given our ``P``, ``L`` and ``U`` and checked to agree before timing. nflows'
  ``OneByOneConvolution(64)`` applies its own permutation to the input before ``L U`` and keeps
  the diagonal through a softplus, so it cannot be given our map; it is timed on its own
  parameters (the same arithmetic: a ``C x C`` matrix on every pixel, its log-determinant from
  the diagonal).
- ``emerging_conv`` and ``periodic_conv`` (kernel 3), with parameters moved off the identity:
  ``fwd+bwd`` and ``inv+bwd`` as above in each direction, and each direction alone under
  ``no_grad`` (what sampling does with the forward). The emerging convolution's default direction is ``"maf"``:
  its inverse (data to noise) is the two masked convolutions, its forward the two substitutions
  by anti-diagonals; the periodic one's both directions are a product in the Fourier domain.
  The goal of issue 14 is an inverse within 10x of the forward; the report divides the cases'
  times by hand (benchmarks/README.md#image-speed).
"""

from __future__ import annotations

from typing import Callable, List

import torch

from benchmarks.speed import CASES as SPEED_CASES
from benchmarks.speed import (
    Case,
    Contestants,
    Step,
    copy_,
    fwd_bwd,
    nflows_style,
    optional_import,
    peer_steps,
    pyro_style,
    randomize_,
    same,
)

BATCH, CHANNELS, SIDE = 16, 64, 32


def _images() -> torch.Tensor:
    return torch.randn(BATCH, CHANNELS, SIDE, SIDE)


def conv1x1_setup() -> Callable[[], Contestants]:
    def setup() -> Contestants:
        from pyro.distributions import transforms as pyro_transforms

        from pyro_nflows.transforms import conv1x1

        x = _images()
        ours = conv1x1(CHANNELS)
        randomize_(ours, scale=0.1)
        reference = ours._call(x)

        def pyro_step() -> Step:
            t = pyro_transforms.GeneralizedChannelPermute(CHANNELS)
            with torch.no_grad():
                lower, upper = ours.lu_factors()
                permutation = ours.matrix() @ torch.linalg.inv(lower @ upper)  # W (L U)^-1 = P, to rounding
                t.permutation.copy_(permutation.round())
            copy_(t.LU, torch.tril(lower, -1) + upper)
            same(reference, t._call(x), "pyro GeneralizedChannelPermute", atol=1e-3)
            same(ours.log_abs_det_jacobian(x, reference), t.log_abs_det_jacobian(x, reference), "pyro log-det",
                 atol=1e-2)
            return fwd_bwd(t, pyro_style(t, x))

        def nflows_step() -> Step:
            conv = optional_import("nflows.transforms.conv")
            t = conv.OneByOneConvolution(CHANNELS, using_cache=False)
            randomize_(t, scale=0.1)
            return fwd_bwd(t, nflows_style(t, x))

        return Contestants(ours=fwd_bwd(ours, pyro_style(ours, x)),
                           peers=peer_steps(pyro=pyro_step, nflows=nflows_step))  # zuko: no image flows

    return setup


def _moved(name: str) -> torch.nn.Module:
    from pyro_nflows.transforms import emerging_conv, periodic_conv

    layer = {"emerging_conv": emerging_conv, "periodic_conv": periodic_conv}[name](CHANNELS)
    randomize_(layer, scale=0.02)  # small moves keep the convolution well conditioned at 64 channels
    return layer


def own_conv_setup(name: str, inverse: bool) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        x = _images()
        layer = _moved(name)
        back = layer._inverse(layer._call(x)) if not inverse else layer._call(layer._inverse(x))
        same(back, x, f"{name} round trip", atol=1e-3)
        return Contestants(ours=fwd_bwd(layer, pyro_style(layer, x, inverse)), peers={})

    return setup


def own_no_grad_setup(name: str, inverse: bool) -> Callable[[], Contestants]:
    def setup() -> Contestants:
        v = _images()
        layer = _moved(name)
        direction = layer._inverse if inverse else layer._call

        def step() -> None:
            with torch.no_grad():
                direction(v)

        return Contestants(ours=step, peers={})

    return setup


SHAPE = f"C={CHANNELS} {SIDE}x{SIDE} B={BATCH}"
CASES: List[Case] = [
    Case(f"conv1x1 fwd+bwd {SHAPE}", conv1x1_setup(), target=[("pyro", 1.0), ("nflows", 1.0)]),
]
for _name in ("emerging_conv", "periodic_conv"):
    CASES += [
        Case(f"{_name} fwd+bwd {SHAPE}", own_conv_setup(_name, inverse=False)),
        Case(f"{_name} inv+bwd {SHAPE}", own_conv_setup(_name, inverse=True)),
        Case(f"{_name} forward (no grad) {SHAPE}", own_no_grad_setup(_name, inverse=False)),
        Case(f"{_name} inverse (no grad) {SHAPE}", own_no_grad_setup(_name, inverse=True)),
    ]

SPEED_CASES.extend(CASES)  # one list, speed.py's: its table runs these after its own
