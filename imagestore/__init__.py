"""imagestore: a content-addressed image store (OCI and Docker formats) and registry client."""

from .store import Image, Store

__all__ = ["Image", "Store"]
