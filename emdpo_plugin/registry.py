"""Registries of trainer types, data builders and policy backends, filled from entry points.

Built-ins register through this package's own entry points (pyproject.toml), exactly like a
third-party plugin would, so there is one lookup path for everything.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from .errors import EmdpoError

TRAINERS = "openrlhf.trainers"
DATA_BUILDERS = "openrlhf.data_builders"
POLICY_BACKENDS = "openrlhf.policy_backends"


@lru_cache(maxsize=None)
def _entry_points(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def names(group: str) -> list[str]:
    """Registered names in `group`, sorted."""
    return sorted(_entry_points(group))


def load_reference(ref: str) -> Any:
    """Import a `package.module:attribute` reference (used for user-supplied builders)."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise EmdpoError(f"expected a 'module:function' reference, got {ref!r}")
    try:
        obj = import_module(module)
    except ImportError as exc:
        raise EmdpoError(f"cannot import module {module!r} from reference {ref!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise EmdpoError(f"module {module!r} has no attribute {attr!r} (reference {ref!r})") from exc
    return obj


def get(group: str, name: str) -> Any:
    """Load the object registered as `name` in `group`; a `module:attr` name is imported directly."""
    if ":" in name:
        return load_reference(name)
    eps = _entry_points(group)
    if name not in eps:
        kind = group.split(".")[-1].replace("_", " ").rstrip("s")
        known = ", ".join(sorted(eps)) or "none"
        raise EmdpoError(f"unknown {kind} {name!r} (registered: {known})")
    return eps[name].load()
