"""The store's error hierarchy.  Every error a user can cause is a ``StoreError`` whose message is
one line naming the problem; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: a request the store refuses or cannot complete."""


class InvalidReference(StoreError):
    """A string that is not a valid image reference, digest or ID."""


class ImageNotFound(StoreError):
    """No image, tag or digest matches the name given."""


class ContainerNotFound(StoreError):
    """No container matches the name or ID given."""


class Ambiguous(StoreError):
    """A short ID prefix matches more than one image or container."""


class Conflict(StoreError):
    """The operation would break something still in use (a tag, a container, a mount)."""


class DigestMismatch(StoreError):
    """Content whose digest or size differs from what its descriptor or config promised.

    Always fatal: the content never becomes visible in the store."""


class InvalidImage(StoreError):
    """A manifest, index, config or archive that is malformed or inconsistent (layer count vs
    diff_ids, unknown media type, missing blob, unsafe path)."""


class SeekableError(InvalidImage):
    """A TOC or chunk of a seekable layer that is malformed, inconsistent or does not match
    its digest (``seekable``)."""


class InvalidLayer(InvalidImage):
    """A layer tar that cannot be indexed safely (see ``unionfs.tarlayer.LayerError``)."""


class Unsupported(StoreError):
    """A valid but unsupported input: schema 1 manifests, unknown compression, a platform the
    image does not have."""


class StoreFull(StoreError):
    """The file system holding the store ran out of space; nothing partial was kept."""


class MountFailed(StoreError):
    """A mount could not be made, paused or taken down: the mountpoint is not an empty
    directory or is already a mount point, the mount daemon exited or did not answer within
    the timeout, or unmounting failed.  The message carries the daemon's own error."""


class FuseUnavailable(MountFailed):
    """FUSE cannot be used on this machine: ``/dev/fuse`` is missing, ``fusermount3`` is not
    installed, or the kernel refused the mount (permission denied, operation not permitted,
    no fuse device).  The message says which, in words fit for a test's skip reason."""


class OutputError(StoreError):
    """The file ``save`` or ``export`` writes to cannot be created or written (a directory,
    a missing parent, no permission, a full disk); nothing partial is left behind."""
