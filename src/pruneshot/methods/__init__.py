"""Registry of pruning methods. Adding a method = adding one module here that defines a
``PruningMethod`` subclass decorated with ``@register`` (with its options dataclass as ``options_class``),
then regenerating config/schema.yaml (``python -m pruneshot.methods.schema --write``)."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from pruneshot.methods.base import (
    ARMS,
    AdaptContext,
    MethodOptions,
    PruningMethod,
    SearchContext,
    SearchResult,
    TargetMethod,
    option,
    options_for,
)

REGISTRY: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make a method available under ``cls.name`` (its ``options_class`` checked here)."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    opts = cls.options_class
    if not (isinstance(opts, type) and issubclass(opts, MethodOptions) and dataclasses.is_dataclass(opts)):
        raise TypeError(f"method {cls.name!r}: options_class must be a MethodOptions dataclass, got {opts!r}")
    opts.specs()  # every field typed, described and with a default
    REGISTRY[cls.name] = cls
    return cls


_discovered = False
#: Modules of this package that define no method.
_NOT_METHODS = ("base", "scaling", "schema")


def _discover() -> None:
    """Import every module of this package once (a module imported directly registers only itself)."""
    global _discovered
    if _discovered:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in _NOT_METHODS:
            importlib.import_module(f"{__name__}.{mod.name}")
    _discovered = True


def get_method(name: str) -> PruningMethod:
    """An instance of the method registered as ``name``."""
    _discover()
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(sorted(REGISTRY))}") from None


def available() -> list[str]:
    """Names of all registered methods."""
    _discover()
    return sorted(REGISTRY)


__all__ = ["ARMS", "REGISTRY", "AdaptContext", "MethodOptions", "PruningMethod", "SearchContext", "SearchResult",
           "TargetMethod", "available", "get_method", "option", "options_for", "register"]
