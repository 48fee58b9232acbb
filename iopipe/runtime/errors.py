"""iopipe's exception hierarchy.

Every error iopipe raises on its own account derives from :class:`IopipeError`.
Errors raised by user code or the OS inside a stage reach the consumer wrapped in
a :class:`StageError` whose ``__cause__`` is the original exception.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "IopipeError",
    "PipelineClosedError",
    "StageError",
    "TooManyFailures",
    "item_label",
    "show",
]


#: Values from input iopipe does not control (a config, a checkpoint header, an
#: index) shown in a message: bounded in length and depth (a 100 MB header can
#: hold a 16 MB list, or a list nested 900 deep, whose repr would recurse).
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxtuple = 3, 8, 4, 8
_SHOW.maxstring, _SHOW.maxlong, _SHOW.maxother = 200, 40, 80


def show(value: Any) -> str:
    """``repr(value)``, cut short: bounded in time, length and recursion."""
    return _SHOW.repr(value)


class IopipeError(Exception):
    """Base class of iopipe's errors."""


class PipelineClosedError(IopipeError):
    """The pipeline was closed; it cannot be iterated again."""


class StageError(IopipeError):
    """A stage failed on an item.

    Attributes:
        stage: Name of the stage that failed (for example ``"read"``).
        item: The item being processed (a path, an index, ...), or ``None`` when
            the failure was not tied to one item.
    """

    def __init__(self, stage: str, item: Any, cause: BaseException) -> None:
        where = f" on item {item_label(item)}" if item is not None else ""
        super().__init__(f"stage {stage!r} failed{where}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.item = item
        self.__cause__ = cause
        self.add_note(f"iopipe stage: {stage}, item: {item_label(item)}")

    def __reduce__(self) -> tuple[Any, ...]:
        cause = self.__cause__ if self.__cause__ is not None else RuntimeError("unknown")
        return (type(self), (self.stage, self.item, cause))


class TooManyFailures(StageError):
    """More items failed than ``max_failures`` allows under ``on_error="skip"``.

    Raised for the stage where items failed (so ``except iopipe.StageError``
    catches it); when items failed in several stages the pipeline raises an
    ``ExceptionGroup`` of one ``TooManyFailures`` per stage.  See the "Failure
    policy" section of docs/design.md.

    Attributes:
        stage: Name of the stage whose items failed.
        item: Always ``None`` (many items failed; see ``errors``).
        failures: Items this stage skipped this epoch.
        errors: The collected failures (at most the first 100), each a
            :class:`StageError` naming its item, caused by the original exception.
        budget: The budget that was exceeded, as text (``"max_failures=2"``).

    ``__cause__`` is an ``ExceptionGroup`` of ``errors``.
    """

    def __init__(
        self, stage: str, failures: int, errors: Sequence[StageError], budget: str
    ) -> None:
        shown = "" if len(errors) >= failures else f" (the first {len(errors)} kept)"
        IopipeError.__init__(
            self,
            f"stage {stage!r}: {failures} item(s) failed, more than {budget} allows "
            f"(on_error='skip'); the causes{shown} are in __cause__",
        )
        self.stage = stage
        self.item = None
        self.failures = failures
        self.errors = tuple(errors)
        self.budget = budget
        if self.errors:
            self.__cause__ = ExceptionGroup(
                f"{len(self.errors)} failure(s) in stage {stage!r}", list(self.errors)
            )
        self.add_note(f"iopipe stage: {stage}, {failures} item(s) skipped")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stage, self.failures, self.errors, self.budget))


def item_label(item: Any, limit: int = 200) -> str:
    """Return a short, readable description of ``item`` for error messages."""
    if isinstance(item, str | bytes | int):
        text = str(item) if not isinstance(item, bytes) else repr(item)
    elif type(item) is tuple and item and isinstance(item[0], str):  # subclasses: their repr
        text = ", ".join(str(x) for x in item)
    else:
        text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Interrupted(Exception):
    """A ``KeyboardInterrupt`` or ``SystemExit`` raised by user code in a job.

    Raised as itself in a job, it would stop the event loop (asyncio lets
    those two out of a task, through ``run_forever``): every later epoch would
    fail with "Event loop is closed".  It travels as this ordinary exception
    instead, never skipped under ``on_error="skip"``, and the consumer raises
    the original (see :func:`released`).  Picklable, for process pools.
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.exc,))


def shielded(fn: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` (in a worker); a KeyboardInterrupt or SystemExit leaves as :class:`Interrupted`."""
    try:
        return fn(*args)
    except Exception:
        raise
    except BaseException as exc:
        raise Interrupted(exc) from None


def released(exc: BaseException) -> BaseException:
    """What the consumer raises for ``exc``: the user's own KeyboardInterrupt or
    SystemExit when it carries one (with a note naming the stage and item), else ``exc``."""
    carried = exc.__cause__ if isinstance(exc, StageError) else exc
    if not isinstance(carried, Interrupted):
        return exc
    original = carried.exc
    if isinstance(exc, StageError):
        original.add_note(f"raised in iopipe stage {exc.stage!r}, item {item_label(exc.item)}")
    return original
