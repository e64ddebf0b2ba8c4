"""imagestore: a content-addressed image store (OCI and Docker formats), a registry client, and
the public Python API of strata.

``Store`` (``api.py``) is the entry point: ``Store(root=None)`` opens a store and offers pull,
push, load, import, tag, remove, save, export, containers, commit and mounts.  The values it
returns and the errors it raises are exported here; ``docs/api.md`` is the reference.  The
registry's result types (``PullResult``, ``PushResult``) are imported on first use, so that
importing this package does not load the HTTP client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api import Store
from .archive import Loaded
from .containers import Container, MountRecord
from .errors import (
    Ambiguous,
    Conflict,
    ContainerNotFound,
    DigestMismatch,
    FuseUnavailable,
    ImageNotFound,
    InvalidImage,
    InvalidLayer,
    InvalidReference,
    MountFailed,
    OutputError,
    StoreError,
    StoreFull,
    Unsupported,
)
from .progress import ProgressEvent, ProgressFn
from .reference import Reference
from .store import Image, Removed

if TYPE_CHECKING:
    from .registry import AuthError, NotFound, PullResult, PushResult, RegistryError

__all__ = [
    "Ambiguous", "AuthError", "Conflict", "Container", "ContainerNotFound", "DigestMismatch",
    "FuseUnavailable", "Image", "ImageNotFound", "InvalidImage", "InvalidLayer",
    "InvalidReference", "Loaded", "MountFailed", "MountRecord", "NotFound", "OutputError",
    "ProgressEvent", "ProgressFn", "PullResult", "PushResult", "Reference", "RegistryError",
    "Removed", "Store", "StoreError", "StoreFull", "Unsupported",
]

_FROM_REGISTRY = ("AuthError", "NotFound", "PullResult", "PushResult", "RegistryError")


def __getattr__(name: str) -> Any:
    if name in _FROM_REGISTRY:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'imagestore' has no attribute {name!r}")
