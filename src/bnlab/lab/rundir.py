"""Configurations and run directories, shared by ``bnlab compare`` and ``bnlab run``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from bnlab._io import write_json

__all__ = ["ConfigError", "config_from_dict", "open_run_dir"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is out of range or unknown; raised before any work starts."""


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """``cls(**d)`` for a config dataclass, refusing keys it does not have (JSON lists
    become tuples)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config keys for {cls.__name__}: {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def open_run_dir(run_dir: Path, record: dict[str, Any] | None, resume: bool) -> dict[str, Any]:
    """Start a run directory with ``record`` as its ``config.json``, or, on resume, return
    the stored record. A new run never writes into a directory that holds anything."""
    stored = run_dir / "config.json"
    if resume:
        if not stored.is_file():
            raise ConfigError(f"cannot resume: {stored} does not exist")
        return json.loads(stored.read_text())
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} to continue "
                          "it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(stored, record)
    return record
