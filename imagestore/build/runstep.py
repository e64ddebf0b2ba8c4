"""RUN: a command in the stage's mount through the OCI runtime (``strata run``'s path).

Not wired yet: the runtime path (issue 16) is being merged onto core."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import Unsupported
from .dockerfile import Instruction

if TYPE_CHECKING:
    from .stage import StageBuilder


def run_step(sb: StageBuilder, inst: Instruction, where: str, step: int) -> bool:
    raise Unsupported(f"{where}: RUN needs the OCI runtime path of strata run")
