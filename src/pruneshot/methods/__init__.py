"""Registry of pruning methods. Adding a method = adding one module here that defines a
``PruningMethod`` subclass decorated with ``@register``; nothing else changes."""

from __future__ import annotations

import importlib
import pkgutil

from pruneshot.methods.base import AdaptContext, PruningMethod, SearchContext, SearchResult, TargetMethod

REGISTRY: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make a method available under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


_discovered = False


def _discover() -> None:
    """Import every module of this package once (a module imported directly registers only itself)."""
    global _discovered
    if _discovered:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
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


__all__ = ["REGISTRY", "AdaptContext", "PruningMethod", "SearchContext", "SearchResult", "TargetMethod", "available",
           "get_method", "register"]
