"""What a stage gives a fused job: one :class:`FusedStep`, and what the step hands back.

A stage that can join a fused run (``Stage.fusable()``) makes one step per group
(``Stage.fused_step(group)``); the fused job runs the members' steps one after
another in one worker thread, and each member then accounts its own step
(``Stage.account_fused``) from the :class:`StepRun` it filled.  The driver
(:mod:`.fused`) knows this protocol only, never a concrete stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FusedStep", "StepRun"]


@dataclass(slots=True)
class StepRun:
    """What one step of a fused job did (filled in the worker thread).

    ``seconds`` is the step's wall time (set by the driver); the other fields are
    the step's own measurements: ``cpu`` thread CPU seconds, ``bytes`` read and
    page-cache ``misses`` (a read step), for its stage's counters and governors.
    """

    seconds: float = 0.0
    cpu: float = 0.0
    bytes: int = 0
    misses: int = 0


class FusedStep:
    """One member's part of a fused job on one group (runs in the worker thread)."""

    __slots__ = ()

    def run(self, items: list[Any], out: StepRun) -> tuple[list[Any], bool]:
        """Return the items after this step, and whether the job stops here.

        Stopping hands the rest of the group back to the loop: the stage's
        ``resume_fused`` finishes it there (a reader's items larger than one
        chunk, read in concurrent pieces), then the next steps follow.  A failure
        raises (an ``ItemFailure`` names the item).
        """
        raise NotImplementedError
