"""imagestore: a content-addressed image store (OCI and Docker formats), a registry client, and
the public Python API of strata.

``Store`` (``api.py``) is the entry point, the one public class: ``Store(root=None)`` opens a
store and offers everything the ``strata`` command does — pull, push, load, import, tag,
remove, save, export, containers, commit, mounts, run, check.  The values it returns and the
errors it raises are exported here; ``docs/api.md`` is the reference, ``docs/architecture.md``
the map of the modules behind it.

Caveats:
* The names below are imported on first use (PEP 562), so that importing a submodule — the
  CLI, the pytest plugin that every pytest session loads — does not pay for the whole API, nor
  the registry's HTTP client for anything but pull and push.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the one place it is written (pyproject.toml reads it)
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Store
    from .archive import Loaded
    from .build.builder import BuildEvent, BuildProgress
    from .build.dockerfile import BuildFileError
    from .build.errors import BuildStepFailed
    from .build.sources import CopySourceError
    from .containers import Container, RunState
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
    from .images import Image, Removed
    from .mounts import MountRecord
    from .progress import ProgressEvent, ProgressFn
    from .reference import Reference
    from .registry import AuthError, NotFound, PullResult, PushResult, RegistryError
    from .runner import RunResult
    from .runtime import RunError
    from .targets import Directories

_WHERE = {
    "Store": "api", "Loaded": "archive", "Container": "containers", "RunState": "containers",
    "MountRecord": "mounts", "Directories": "targets", "ProgressEvent": "progress",
    "ProgressFn": "progress", "Reference": "reference", "Image": "images", "Removed": "images",
    "RunError": "runtime", "RunResult": "runner",
    "BuildEvent": "build.builder", "BuildProgress": "build.builder",
    "BuildFileError": "build.dockerfile", "CopySourceError": "build.sources",
    "BuildStepFailed": "build.errors",
    **dict.fromkeys(("AuthError", "NotFound", "PullResult", "PushResult", "RegistryError"),
                    "registry"),
    **dict.fromkeys(("Ambiguous", "Conflict", "ContainerNotFound", "DigestMismatch",
                     "FuseUnavailable", "ImageNotFound", "InvalidImage", "InvalidLayer",
                     "InvalidReference", "MountFailed", "OutputError", "StoreError",
                     "StoreFull", "Unsupported"), "errors"),
}

__all__ = [
    "Ambiguous", "AuthError", "BuildEvent", "BuildFileError", "BuildProgress", "BuildStepFailed",
    "Conflict", "Container", "ContainerNotFound", "CopySourceError", "DigestMismatch",
    "Directories", "FuseUnavailable", "Image", "ImageNotFound", "InvalidImage", "InvalidLayer",
    "InvalidReference", "Loaded", "MountFailed", "MountRecord", "NotFound", "OutputError",
    "ProgressEvent", "ProgressFn", "PullResult", "PushResult", "Reference", "RegistryError",
    "Removed", "RunError", "RunResult", "RunState", "Store", "StoreError", "StoreFull",
    "Unsupported",
]


def lazy_attribute(package: str, where: dict[str, str], namespace: dict[str, Any],
                   name: str) -> Any:
    """A package's PEP 562 ``__getattr__``: ``name`` from the submodule ``where`` names for it,
    imported on first use and kept in the package's ``namespace``."""
    module = where.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", package), name)
    namespace[name] = value
    return value


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _WHERE, globals(), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
