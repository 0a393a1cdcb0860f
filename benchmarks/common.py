"""What the benchmark scripts share."""

from __future__ import annotations

from importlib import metadata

import torch


def library_versions(distributions: dict[str, str]) -> str:
    """``"torch 2.x, name version, ..."`` for ``{name: distribution}``, saying which are missing."""
    parts = [f"torch {torch.__version__}"]
    for name, distribution in distributions.items():
        try:
            parts.append(f"{name} {metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)
