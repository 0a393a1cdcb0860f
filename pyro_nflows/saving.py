"""One file format for the package's saved models (``DensityModel``, ``VAE``).

A saved model is a dict written by :func:`torch.save`: the format version,
the model's kind, its constructor arguments as a JSON string, and its
``state_dict`` on the CPU. Reading uses ``torch.load(weights_only=True)``, so
nothing is unpickled, and the model is rebuilt from its JSON configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["FORMAT_VERSION", "read_model", "write_model"]

FORMAT_VERSION = 5
# What changed at each version, so that a refused file says why.
_CHANGES = {
    2: "the affine layers (MAF, IAF, RealNVP couplings) changed their log-scale bound, "
    "and MAF and RealNVP where their shift is added, so the same weights give another density",
    3: "IAF layers went back to the tanh log-scale bound, so the same IAF weights give another density",
    4: "spline autoregressive layers (NSF) evaluate their spline from the data side, so the same weights "
    "give another density",
    5: "spline coupling layers in fit's models evaluate their spline from the data side, so the same weights "
    "give another density",
}


def write_model(module: nn.Module, config: dict, kind: str, path: str | Path) -> None:
    """Write ``module``'s weights and its constructor arguments ``config`` to ``path``."""
    payload = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "config": json.dumps(config),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    torch.save(payload, Path(path))


def read_model(cls: type, kind: str, path: str | Path, map_location=None, *, kind_required: bool = True) -> nn.Module:
    """Rebuild a ``cls`` written by :func:`write_model` with this ``kind``.

    ``kind_required=False`` also accepts files written before the kind was
    recorded (a file of another kind is refused either way).
    """
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    what = f"{path} is not a model saved by {cls.__name__}.save"
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise ValueError(what)
    found = payload.get("kind")
    if found != kind and (kind_required or found is not None):
        raise ValueError(f"{what} (its kind is {found!r}, not {kind!r})")
    found_format = payload.get("format")
    if found_format != FORMAT_VERSION:
        why = ""
        if isinstance(found_format, int) and found_format < FORMAT_VERSION:
            changes = "; ".join(_CHANGES[v] for v in range(found_format + 1, FORMAT_VERSION + 1))
            why = f" (since then {changes}): fit or train the model again with this version"
        raise ValueError(f"{path} has format {found_format!r}; this version reads {FORMAT_VERSION}{why}")
    model = cls(**json.loads(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model
