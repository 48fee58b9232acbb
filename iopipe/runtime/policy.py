"""The failure policy: ``on_error="skip"`` drops failing items within a budget.

Under ``on_error="raise"`` (the default) nothing here runs: the stages raise
the first failure as a :class:`~iopipe.StageError`.  Under ``"skip"`` a stage
that sees an item fail calls :meth:`FailurePolicy.record` (loop thread), which
counts it in the stage's counters, logs one line on the ``"iopipe"`` logger and
raises :class:`~iopipe.TooManyFailures` once ``max_failures`` is exceeded.
The rules are in the "Failure policy" section of docs/design.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .errors import StageError, TooManyFailures, item_label
from .stats import StageCounters

__all__ = [
    "MAX_CAUSES",
    "MIN_ITEMS_FOR_FRACTION",
    "ON_ERROR",
    "FailurePolicy",
    "check_policy",
]

ON_ERROR = ("raise", "skip")
#: A fractional ``max_failures`` is checked only once this many items were seen
#: (and always at the end of the epoch): one early failure is not yet a rate.
MIN_ITEMS_FOR_FRACTION = 100
#: Causes kept per stage for the error raised past the budget.  Each holds its
#: traceback (and through it the frames' data), so an unbounded list could hold
#: a lot of memory; the counts stay exact.
MAX_CAUSES = 100

logger = logging.getLogger("iopipe")


def check_policy(on_error: Any, max_failures: Any) -> None:
    """Validate ``on_error`` and ``max_failures``.

    Raises:
        ValueError: an unknown ``on_error``; ``max_failures`` not an int >= 0, a
            float in (0, 1) or None; or ``max_failures`` given with ``on_error="raise"``.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if max_failures is None:
        return
    ok = not isinstance(max_failures, bool) and (
        (isinstance(max_failures, int) and max_failures >= 0)
        or (isinstance(max_failures, float) and 0 < max_failures < 1)
    )
    if not ok:
        raise ValueError(
            "max_failures must be an int >= 0 (a count), a float in (0, 1) (a fraction of "
            f"the items seen) or None (no limit), got {max_failures!r}"
        )
    if on_error != "skip":
        raise ValueError(
            f"max_failures={max_failures!r} applies only with on_error='skip', "
            f"got on_error={on_error!r}"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FailurePolicy:
    """The ``on_error="skip"`` budget of one pipeline (or DataLoader) for one epoch.

    Used from one thread (the loop thread; the consumer's, for a DataLoader).

    Args:
        max_failures: An int: items that may fail in the epoch.  A float in
            (0, 1): the share of the items seen so far that may fail, checked
            once ``MIN_ITEMS_FOR_FRACTION`` were seen and at the end of the
            epoch.  None: no limit.
        seen: Returns the items seen so far this epoch (the source's count);
            None: the owner adds them up in ``items_seen``.
    """

    def __init__(
        self, max_failures: int | float | None, seen: Callable[[], int] | None = None
    ) -> None:
        self.max_failures = max_failures
        self._seen = seen
        self.items_seen = 0
        self.total = 0
        self.counts: dict[str, int] = {}
        self.causes: dict[str, list[StageError]] = {}
        # The error raised once the budget was exceeded: raised again, the same
        # object, by any stage that fails an item while the epoch winds down, so
        # the consumer gets one error (tasks' duplicates are merged by identity).
        self.tripped: Exception | None = None

    def reset(self) -> None:
        """Start a new epoch's count."""
        self.total = 0
        self.counts = {}
        self.causes = {}
        self.tripped = None
        self.items_seen = 0

    def record(
        self,
        stage: str,
        counters: StageCounters | None,
        item: Any,
        exc: BaseException,
        n: int = 1,
        what: str = "item",
    ) -> None:
        """Count ``n`` skipped items of ``stage`` that failed with ``exc``; log one line.

        Raises:
            TooManyFailures: (or an ExceptionGroup of them, one per stage) the
                budget is exceeded.
        """
        if self.tripped is not None:
            raise self.tripped
        if counters is not None:
            counters.failures += n
        self.total += n
        self.counts[stage] = self.counts.get(stage, 0) + n
        kept = self.causes.setdefault(stage, [])
        if len(kept) < MAX_CAUSES:
            kept.append(StageError(stage, item, exc))
        label = item_label(item, 160)
        if n != 1:
            label += f" ({n} items)"
        logger.warning(
            "iopipe: stage %r skipped %s: %s (on_error='skip', %d skipped this epoch)",
            stage,
            f"{what} {label}" if what else label,
            _one_line(exc),
            self.total,
        )
        self.check(final=False)

    def seen(self) -> int:
        """Items seen so far this epoch."""
        return self._seen() if self._seen is not None else self.items_seen

    def exceeded(self, *, final: bool) -> bool:
        """Whether the failures so far exceed the budget (``final``: the epoch is over)."""
        limit = self.max_failures
        if limit is None or self.total == 0:
            return False
        if isinstance(limit, int):
            return self.total > limit
        seen = self.seen()
        if not final and seen < MIN_ITEMS_FOR_FRACTION:
            return False
        return self.total > limit * seen

    def check(self, *, final: bool) -> None:
        """Raise the error for an exceeded budget, with every collected cause."""
        if self.tripped is not None:
            raise self.tripped
        if self.exceeded(final=final):
            self.tripped = self.error()
            raise self.tripped

    def budget(self) -> str:
        limit = self.max_failures
        if isinstance(limit, float):
            return f"max_failures={limit!r} of {self.seen()} items seen"
        return f"max_failures={limit!r}"

    def error(self) -> Exception:
        """The exception for an exceeded budget: one per stage that skipped items."""
        budget = self.budget()
        errors = [
            TooManyFailures(stage, self.counts[stage], causes, budget)
            for stage, causes in self.causes.items()
        ]
        if len(errors) == 1:
            return errors[0]
        names = ", ".join(repr(e.stage) for e in errors)
        return ExceptionGroup(
            f"iopipe: {self.total} items failed in stages {names}, more than {budget} allows",
            errors,
        )
