"""What the benchmark scripts share."""

from __future__ import annotations

import json
import os
from importlib import metadata
from typing import Callable, Hashable

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


class FinishedRows:
    """The finished rows of a long benchmark, kept in a JSON-lines file so that a
    run cut short resumes where it stopped.

    Each line is ``{"settings": ..., "row": ...}``; only rows measured under the
    same ``settings`` (a JSON-able dict) are reused. ``key`` maps a row to what
    identifies it (say its task, flow and seed). With ``path=None`` nothing is
    read or written and every row is run.
    """

    def __init__(self, path: str | None, settings: dict, key: Callable[[dict], Hashable]):
        self.path, self.settings, self.key = path, settings, key
        self.rows: dict = {}
        if path and os.path.exists(path):
            with open(path) as handle:
                for line in handle:
                    entry = json.loads(line) if line.strip() else None
                    if entry and entry["settings"] == settings:
                        self.rows[key(entry["row"])] = entry["row"]

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    def get(self, key: Hashable) -> dict | None:
        return self.rows.get(key)

    def add(self, row: dict) -> None:
        """Keep ``row`` and append it to the file (one line, flushed at once)."""
        self.rows[self.key(row)] = row
        if self.path:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"settings": self.settings, "row": row}) + "\n")
