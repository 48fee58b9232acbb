"""iopipe's exception hierarchy.

Every error iopipe raises on its own account derives from :class:`IopipeError`.
Errors raised by user code or the OS inside a stage reach the consumer wrapped in
a :class:`StageError` whose ``__cause__`` is the original exception.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IopipeError", "PipelineClosedError", "StageError", "item_label"]


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


def item_label(item: Any, limit: int = 200) -> str:
    """Return a short, readable description of ``item`` for error messages."""
    if isinstance(item, str | bytes | int):
        text = str(item) if not isinstance(item, bytes) else repr(item)
    elif isinstance(item, tuple) and item and isinstance(item[0], str):
        text = ", ".join(str(x) for x in item)
    else:
        text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."
