"""The errors a build raises besides the store's own: ``BuildFileError`` lives with the
Dockerfile front end (``dockerfile.py``), ``CopySourceError`` with the sources
(``sources.py``); this module holds the one a RUN raises."""

from __future__ import annotations

from ..errors import StoreError

__all__ = ["BuildStepFailed"]


class BuildStepFailed(StoreError):
    """A RUN whose command failed: ``exit_status`` (docker's: 128+N when killed by signal N,
    126/127 when it cannot be executed or is not found) and ``output`` (its last lines).
    The message names the Dockerfile's line and the command."""

    def __init__(self, message: str, exit_status: int, output: str = "") -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.output = output
