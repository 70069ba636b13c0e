"""The transport backends by name. Pure Python: the CLI lists the names without loading torch.

A backend's module is imported on first use, so that a missing optional dependency (nixl)
only matters to whoever picks that backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kv_transfer.transport import Transport

# name -> "module:Class"
_BACKENDS = {
    "nixl": "kv_transfer.backends.nixl:NixlTransport",
    "torch_dist": "kv_transfer.backends.torch_dist:TorchDistTransport",
    "shm": "kv_transfer.backends.shm:ShmTransport",
}


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def register_backend(name: str, target: str) -> None:
    """Add a backend: `target` is 'module:Class', a Transport subclass imported on first use."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _BACKENDS[name] = target


def load_backend(name: str) -> type[Transport]:
    """The Transport class registered as `name`, importing its module now."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown KV transfer backend {name!r}; choose one of {backend_names()}")
    module_name, class_name = _BACKENDS[name].split(":")
    backend: type[Transport] = getattr(importlib.import_module(module_name), class_name)
    return backend
