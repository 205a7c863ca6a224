"""Pruning methods, one module each, found through one registry.

A method is a `PruningMethod` subclass (see `models/methods/base.py`): its plan from a budget, its stage-1
selection and its stage-2 scoring. Each module under `models/methods/` ends with `METHOD = TheMethod()`.

To add a method, write `models/methods/<name>.py` and add `"<name>"` to `BUILTIN_MODULES` below: that is all.
The planner, the engine, the evaluation CLI and the service's validation read the registry. Code outside this
package (a plug-in, a test) calls `register_method(instance)` instead. Registration order is the order
`method_names()` lists.
"""

from __future__ import annotations

import importlib

from models.methods.base import PruningMethod, Stage1Selection, keep_every_token

BUILTIN_MODULES: tuple[str, ...] = (
    "none",
    "random",
    "pooling",
    "fastv",
    "visionzip",
    "nuwa",
    "nuwa_paper",
    "nuwa_stage1",
    "nuwa_stage2",
)
"""Modules of `models.methods` whose `METHOD` is registered at import, in this order."""

_REGISTRY: dict[str, PruningMethod] = {}


def register_method(method: PruningMethod) -> PruningMethod:
    """Make `method` available under `method.name` (refuses to replace an existing method)."""
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(method).__name__} needs a non-empty `name`")
    if name in _REGISTRY:
        raise ValueError(f"a pruning method named {name!r} is already registered")
    _REGISTRY[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method registered with `register_method` (for tests and plug-ins that clean up)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> PruningMethod:
    """The registered method called `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {method_names()}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order (built-ins first)."""
    return tuple(_REGISTRY)


for _module in BUILTIN_MODULES:
    register_method(importlib.import_module(f"{__name__}.{_module}").METHOD)


__all__ = [
    "BUILTIN_MODULES",
    "PruningMethod",
    "Stage1Selection",
    "get_method",
    "keep_every_token",
    "method_names",
    "register_method",
    "unregister_method",
]
