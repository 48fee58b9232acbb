"""Checking what a :class:`~iopipe.Pipeline` is built from: its keyword options, ``from_files`` paths.

The options themselves are documented on :class:`~iopipe.Pipeline`; each is
checked here, in the order the constructor takes them, before anything starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..control.autotune import check_budgets
from ..io.listing import list_files
from ..observe.verdict import check_monitoring
from ..runtime.budget import check_inflight_bytes
from ..runtime.policy import check_policy
from ..runtime.watchdog import check_seconds, check_stall_warning
from ..stages.source import EMPTY_HINT

__all__ = ["check_options", "file_items"]


def check_options(options: Mapping[str, Any]) -> None:
    """Validate the keyword options of :class:`Pipeline` (raises ValueError or TypeError)."""
    check_monitoring(options["stats_interval"], options["on_stats"])
    check_budgets(options["cpu_budget"], options["memory_budget_bytes"])
    check_policy(options["on_error"], options["max_failures"])
    group_size = options["group_size"]
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be an int >= 1 or None, got {group_size!r}")
    check_seconds("timeout", options["timeout"])
    handoff = options["handoff"]
    if not isinstance(handoff, int) or handoff < 1:
        raise ValueError(f"handoff must be an int >= 1, got {handoff!r}")
    use_uvloop = options["use_uvloop"]
    if use_uvloop is not None and not isinstance(use_uvloop, bool):
        raise TypeError(f"use_uvloop must be True, False or None, got {use_uvloop!r}")
    check_stall_warning(options["stall_warning"])
    check_inflight_bytes(options["max_inflight_bytes"])
    fuse = options["fuse"]
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True or False, got {fuse!r}")


def file_items(paths: Any, allow_empty: Any) -> list[Any]:
    """The items of :meth:`Pipeline.from_files`: ``paths`` listed (a pattern) or as given."""
    if not isinstance(allow_empty, bool):
        raise TypeError(f"allow_empty must be True or False, got {allow_empty!r}")
    if isinstance(paths, str | os.PathLike):
        return list_files(
            paths,
            allow_empty=allow_empty,
            hint=f"; {EMPTY_HINT}",
        )
    if isinstance(paths, Iterable):
        items = list(paths)
        if not items and not allow_empty:
            raise ValueError(f"paths is an empty list; {EMPTY_HINT}")
        return items
    raise TypeError(
        "paths must be a glob, a directory, a file or a list of paths and byte "
        f"ranges, got {type(paths).__name__}: {paths!r:.80}"
    )
