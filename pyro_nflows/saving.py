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

# The version of the file format; a file of another version is refused (what
# changed at each version is in CHANGELOG.md).
FORMAT_VERSION = 5


def write_model(module: nn.Module, config: dict, kind: str, path: str | Path) -> None:
    """Write ``module``'s weights and its constructor arguments ``config`` to ``path``."""
    payload = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "config": json.dumps(config),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    torch.save(payload, Path(path))


def read_model(cls: type, kind: str, path: str | Path, map_location=None) -> nn.Module:
    """Rebuild a ``cls`` written by :func:`write_model` with this ``kind``."""
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    what = f"{path} is not a model saved by {cls.__name__}.save"
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise ValueError(what)
    if payload.get("kind") != kind:
        raise ValueError(f"{what} (its kind is {payload.get('kind')!r}, not {kind!r})")
    found = payload.get("format")
    if found != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {found!r}; this version reads {FORMAT_VERSION} (CHANGELOG.md says what changed): "
            "fit or train the model again with this version"
        )
    model = cls(**json.loads(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model
