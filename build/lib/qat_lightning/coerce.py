"""One way to turn what callers hold (a dataclass, a dict, Hydra's DictConfig) into a validated config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def as_config(cls: type[T], cfg: Any, what: str) -> T:
    """`cls(**cfg)` for a mapping or DictConfig; unknown keys are an error, so a typo never falls back to a default."""
    if isinstance(cfg, cls):
        return cfg
    if not isinstance(cfg, Mapping):
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
    if not isinstance(cfg, Mapping):
        raise ValueError(f"expected a {cls.__name__} or a mapping of its fields, got {type(cfg).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - names
    if unknown:
        raise ValueError(f"unknown {what} config key(s) {sorted(unknown)}; valid: {', '.join(sorted(names))}")
    return cls(**cfg)
