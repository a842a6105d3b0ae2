"""Registries of plug-ins by name, and loading a user's class by dotted path.

Every seam (``Env``, tool-call parser, ``Engine``, ``Compactor``, ``Judge``) has a registry. A
config value is either a registered name or ``package.module:Attr`` (``package.module.Attr``
works too); both are resolved at start-up, and a miss raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

from relayrl.config import ConfigError

T = TypeVar("T")


def import_dotted(path: str) -> Any:
    """Import ``pkg.mod:Attr`` or ``pkg.mod.Attr``; raise ImportError/AttributeError as is."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{path!r} is not a dotted path like 'my_pkg.my_module:MyClass'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Name -> factory, with a fallback to dotted import paths."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, name: str, config_key: str) -> Callable[..., T]:
        """Find ``name`` in the registry or import it; ``config_key`` names the field in errors."""
        if name in self._entries:
            return self._entries[name]
        if "." in name or ":" in name:
            try:
                return import_dotted(name)
            except (ImportError, AttributeError) as e:
                raise ConfigError(
                    f"{config_key}: cannot import {name!r} ({e}). Check the module is installed "
                    f"or on PYTHONPATH and the name is spelled 'package.module:Class'."
                ) from None
        known = ", ".join(self.names()) or "(none)"
        raise ConfigError(
            f"{config_key}: unknown {self.kind} {name!r}. Use one of: {known}, or a dotted path "
            "'package.module:Class' to your own."
        )


envs: Registry[Any] = Registry("environment")
parsers: Registry[Any] = Registry("tool-call parser")
engines: Registry[Any] = Registry("engine")
