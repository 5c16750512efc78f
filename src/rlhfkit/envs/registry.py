"""Environments by name, like gymnasium's registry: `register(name, "module:Class", **defaults)`,
`make(name, **kwargs)`. Entry points are import strings, so listing or checking names imports nothing
heavy (the environment's own dependencies are imported when one is made)."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.errors import ConfigError


@dataclass
class EnvSpec:
    name: str
    entry_point: str                 # "module:Class" (or a factory function)
    kwargs: dict = field(default_factory=dict)
    doc: str = ""

    def load(self) -> Any:
        module, _, attr = self.entry_point.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"environment {self.name!r}: cannot import {self.entry_point} ({e})") from None


REGISTRY: dict[str, EnvSpec] = {}


def register(name: str, entry_point: str, doc: str = "", **kwargs: Any) -> None:
    if name in REGISTRY:
        raise ValueError(f"environment {name!r} is already registered")
    REGISTRY[name] = EnvSpec(name, entry_point, kwargs, doc)


def spec(name: str) -> EnvSpec:
    """The spec of a registered name, or of "module:Class" (your own environment)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        return EnvSpec(name, name)
    raise ConfigError(f"unknown environment {name!r} (registered: {', '.join(sorted(REGISTRY))}; your own: "
                      "module:Class)")


def check_kwargs(name: str, kwargs: dict) -> None:
    """Reject keyword arguments the environment does not take (at config-parse time)."""
    target = spec(name).load()
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    bad = [k for k in kwargs if k not in params]
    if bad:
        known = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise ConfigError(f"environment {name!r} takes no argument(s) {', '.join(bad)} (it takes: "
                          f"{', '.join(known) or 'none'})")


def make(name: str, **kwargs: Any) -> Any:
    s = spec(name)
    return s.load()(**{**s.kwargs, **kwargs})
